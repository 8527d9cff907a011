"""nuScenes table records: deterministic tokens and the fixed tables (category, attribute, visibility, sensor).

Field names and value conventions follow the nuScenes schema as nuscenes-devkit 1.2.0 reads it: sizes are
[width, length, height], rotations are [w, x, y, z] quaternions, timestamps are microseconds, and every translation,
size and rotation is written as floats.
"""
from __future__ import annotations

import hashlib

import numpy as np

TABLES = ["category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
          "scene", "sample", "sample_data", "sample_annotation", "map"]

# nuScenes categories with their lidarseg indices
CATEGORIES = [
    ("animal", 1, "All animals, e.g. cats, rats, dogs, deer, birds."),
    ("human.pedestrian.adult", 2, "Adult subcategory."),
    ("human.pedestrian.child", 3, "Child subcategory."),
    ("human.pedestrian.construction_worker", 4, "Construction worker"),
    ("human.pedestrian.personal_mobility", 5, "A small electric or self-propelled vehicle."),
    ("human.pedestrian.police_officer", 6, "Police officer."),
    ("human.pedestrian.stroller", 7, "Strollers."),
    ("human.pedestrian.wheelchair", 8, "Wheelchairs."),
    ("movable_object.barrier", 9, "Temporary road barrier placed in the scene in order to redirect traffic."),
    ("movable_object.debris", 10, "Movable object that is left on the driveable surface."),
    ("movable_object.pushable_pullable", 11, "Objects that a pedestrian may push or pull."),
    ("movable_object.trafficcone", 12, "All types of traffic cone."),
    ("static_object.bicycle_rack", 13, "Area or device intended to park or secure the bicycles in a row."),
    ("vehicle.bicycle", 14, "Human or electric powered 2-wheeled vehicle designed to travel at lower speeds."),
    ("vehicle.bus.bendy", 15, "Bendy bus subcategory."),
    ("vehicle.bus.rigid", 16, "Rigid bus subcategory."),
    ("vehicle.car", 17, "Vehicle designed primarily for personal use, e.g. sedans, hatch-backs, wagons, vans."),
    ("vehicle.construction", 18, "Vehicles primarily designed for construction."),
    ("vehicle.emergency.ambulance", 19, "All types of ambulances."),
    ("vehicle.emergency.police", 20, "All types of police vehicles."),
    ("vehicle.motorcycle", 21, "Gasoline or electric powered 2-wheeled vehicle designed to move rapidly."),
    ("vehicle.trailer", 22, "Any vehicle trailer, both for trucks, cars and bikes."),
    ("vehicle.truck", 23, "Vehicles primarily designed to haul cargo including pick-ups, lorrys, trucks."),
]
ATTRIBUTES = [
    ("vehicle.moving", "Vehicle is moving."),
    ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary but has an intent to move."),
    ("vehicle.parked", "Vehicle is stationary (usually for longer duration) with no immediate intent to move."),
    ("cycle.with_rider", "There is a rider on the bicycle or motorcycle."),
    ("cycle.without_rider", "There is NO rider on the bicycle or motorcycle."),
    ("pedestrian.sitting_lying_down", "The human is sitting or lying down."),
    ("pedestrian.standing", "The human is standing."),
    ("pedestrian.moving", "The human is moving."),
]
VISIBILITY = [
    ("1", "v0-40", "visibility of whole object is between 0 and 40%"),
    ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
    ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
    ("4", "v80-100", "visibility of whole object is between 80 and 100%"),
]


def token(seed: int, *parts) -> str:
    """A 32-hex token derived from the seed and the record's names."""
    key = "/".join(["drivejepa-synth", str(seed)] + [str(p) for p in parts])
    return hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()


def quaternion_yaw(yaw: float) -> list[float]:
    return [round(float(np.cos(yaw / 2)), 10), 0.0, 0.0, round(float(np.sin(yaw / 2)), 10)]


def quaternion_matrix(m: np.ndarray) -> list[float]:
    """[w, x, y, z] of a rotation matrix (via pyquaternion, the devkit's own quaternion type)."""
    from pyquaternion import Quaternion

    q = Quaternion(matrix=m)
    return [round(float(v), 10) for v in q.elements]


def fixed_tables(seed: int, sensors: list[tuple[str, str]]) -> dict[str, list]:
    """Tables shared by every scene. ``sensors`` = (channel, modality)."""
    return {
        "category": [dict(token=token(seed, "category", n), name=n, description=d, index=i)
                     for n, i, d in CATEGORIES],
        "attribute": [dict(token=token(seed, "attribute", n), name=n, description=d) for n, d in ATTRIBUTES],
        "visibility": [dict(token=t, level=lvl, description=d) for t, lvl, d in VISIBILITY],
        "sensor": [dict(token=token(seed, "sensor", ch), channel=ch, modality=mod) for ch, mod in sensors],
    }


def visibility_token(fraction: float) -> str:
    return "1" if fraction < 0.4 else "2" if fraction < 0.6 else "3" if fraction < 0.8 else "4"
