"""Materials of the synthetic world (lidar intensity band and camera colours each) and the kinds of agents in it.

Intensity bands are disjoint, so a lidar return's intensity tells which material it hit.
"""
from __future__ import annotations

import dataclasses

GRASS, ROAD, SIDEWALK, MARKING, BUILDING, VEHICLE, PEDESTRIAN, POLE, BARRIER, CONE = range(1, 11)


@dataclasses.dataclass(frozen=True)
class Material:
    name: str
    intensity: tuple[int, int]                  # lidar intensity band [lo, hi]
    colours: tuple[tuple[int, int, int], ...]   # RGB base colours (faces are shaded by 0.55-1.0)


MATERIALS = {
    ROAD: Material("road", (3, 10), ((72, 73, 78),)),
    GRASS: Material("grass", (12, 20), ((78, 124, 56),)),
    SIDEWALK: Material("sidewalk", (24, 34), ((176, 170, 158),)),
    BUILDING: Material("building", (40, 60), ((150, 84, 64), (205, 180, 130), (110, 125, 160))),
    BARRIER: Material("barrier", (64, 80), ((225, 225, 120),)),
    PEDESTRIAN: Material("pedestrian", (84, 96), ((200, 60, 120), (40, 40, 110), (110, 70, 40))),
    VEHICLE: Material("vehicle", (100, 140), ((170, 28, 30), (30, 60, 170), (225, 185, 30), (20, 140, 150),
                                             (110, 40, 130), (30, 30, 34))),
    POLE: Material("pole", (150, 170), ((45, 85, 75),)),
    CONE: Material("cone", (180, 200), ((245, 110, 20),)),
    MARKING: Material("marking", (210, 250), ((236, 236, 232),)),
}

# ---- agent kinds: nuScenes category, size (w, l, h) mean and spread, material --------------------------------------
AGENT_TYPES = {
    "car": ("vehicle.car", (1.95, 4.6, 1.7), (0.1, 0.35, 0.15), VEHICLE),
    "truck": ("vehicle.truck", (2.5, 7.5, 3.0), (0.1, 1.0, 0.3), VEHICLE),
    "bus": ("vehicle.bus.rigid", (2.9, 11.0, 3.4), (0.05, 0.8, 0.1), VEHICLE),
    "bicycle": ("vehicle.bicycle", (0.65, 1.75, 1.7), (0.05, 0.1, 0.05), PEDESTRIAN),
    "pedestrian": ("human.pedestrian.adult", (0.67, 0.73, 1.75), (0.05, 0.05, 0.08), PEDESTRIAN),
    "barrier": ("movable_object.barrier", (2.4, 0.5, 1.0), (0.1, 0.05, 0.05), BARRIER),
    "cone": ("movable_object.trafficcone", (0.42, 0.42, 1.0), (0.03, 0.03, 0.05), CONE),
}
