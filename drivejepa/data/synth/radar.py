"""The five radars: returns on agents and structures in the devkit's binary ``.pcd`` format.

A return sits inside the box it came from, at the radar's height (z = 0 in the sensor frame, as in nuScenes), and
only if nothing blocks the line of sight. ``vx_comp, vy_comp`` are the object's velocity over ground and ``vx, vy``
the velocity relative to the moving sensor, both in the sensor frame. Valid returns carry flags the devkit's
default filters keep (invalid_state 0, dyn_prop < 7, ambig_state 3); a few clutter returns carry invalid states and
are dropped by those filters, as in the real data.
"""
from __future__ import annotations

import numpy as np

from drivejepa.data.synth.lidar import slab_many
from drivejepa.data.synth.materials import BARRIER, BUILDING, CONE, PEDESTRIAN, POLE, VEHICLE
from drivejepa.data.synth.world import World

# name: (translation in the ego frame, yaw in degrees)
RADARS = {
    "RADAR_FRONT": ((3.41, 0.0, 0.5), 0.0),
    "RADAR_FRONT_LEFT": ((2.42, 0.80, 0.5), 90.0),
    "RADAR_FRONT_RIGHT": ((2.42, -0.80, 0.5), -90.0),
    "RADAR_BACK_LEFT": ((-0.56, 0.62, 0.5), 150.0),
    "RADAR_BACK_RIGHT": ((-0.56, -0.62, 0.5), -150.0),
}
FOV = np.radians(60.0)                # half angle
MAX_RANGE = 80.0
FIELDS = ["x", "y", "z", "dyn_prop", "id", "rcs", "vx", "vy", "vx_comp", "vy_comp", "is_quality_valid",
          "ambig_state", "x_rms", "y_rms", "invalid_state", "pdh0", "vx_rms", "vy_rms"]
DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("dyn_prop", "i1"), ("id", "<i2"), ("rcs", "<f4"),
                  ("vx", "<f4"), ("vy", "<f4"), ("vx_comp", "<f4"), ("vy_comp", "<f4"), ("is_quality_valid", "i1"),
                  ("ambig_state", "i1"), ("x_rms", "i1"), ("y_rms", "i1"), ("invalid_state", "i1"), ("pdh0", "i1"),
                  ("vx_rms", "i1"), ("vy_rms", "i1")])
RCS = {VEHICLE: 8.0, PEDESTRIAN: -6.0, BUILDING: 22.0, POLE: 3.0, BARRIER: 6.0, CONE: -4.0}


def sensor_pose(world: World, t: float, name: str):
    xy, yaw, vel = world.ego_pose(t)
    tr, a = RADARS[name]
    c, s = np.cos(yaw), np.sin(yaw)
    o = np.array([xy[0] + c * tr[0] - s * tr[1], xy[1] + s * tr[0] + c * tr[1], tr[2]])
    return o, yaw + np.radians(a), vel


def scan(world: World, t: float, name: str, rng: np.random.Generator) -> np.ndarray:
    """Radar returns at time t as a structured array in the sensor frame (dtype DTYPE)."""
    origin, psi, ego_vel = sensor_pose(world, t, name)
    centre, half, yaw, mats, _, agent = world.boxes(t)
    _, _, vel, _ = world.state(t)
    c, s = np.cos(psi), np.sin(psi)
    rel = centre[:, :2] - origin[:2]
    dist = np.hypot(rel[:, 0], rel[:, 1])
    bearing = np.angle(np.exp(1j * (np.arctan2(rel[:, 1], rel[:, 0]) - psi)))
    ok = (dist < MAX_RANGE) & (dist > 1.0) & (np.abs(bearing) < FOV) & ((agent >= 0) | (dist < 60.0))
    cand = []                                          # (box, x, y) of each candidate return
    for b in np.flatnonzero(ok):
        mat = int(mats[b])
        if agent[b] >= 0:
            n = 1 + int(dist[b] < 35) + int(dist[b] < 15) if mat == VEHICLE else int(rng.random() < 0.8)
        else:
            n = int(rng.random() < (0.6 if mat == BUILDING else 0.3)) * (1 + int(mat == BUILDING))
        if n == 0:
            continue
        cb, sb = np.cos(yaw[b]), np.sin(yaw[b])
        lx, ly = -(cb * rel[b, 0] + sb * rel[b, 1]), -(-sb * rel[b, 0] + cb * rel[b, 1])   # sensor in box frame
        hx, hy = half[b, 0], half[b, 1]
        m = np.minimum([hx, hy], 0.3) * 0.6
        for _ in range(n):
            qx = np.clip(lx + rng.uniform(-0.4, 0.4) * hx, -hx + m[0], hx - m[0])
            qy = np.clip(ly + rng.uniform(-0.4, 0.4) * hy, -hy + m[1], hy - m[1])
            cand.append((b, centre[b, 0] + cb * qx - sb * qy, centre[b, 1] + sb * qx + cb * qy))
    rows = []
    if cand:
        own = np.array([k[0] for k in cand])
        d = np.array([[k[1] - origin[0], k[2] - origin[1], 0.0] for k in cand])
        rng_d = np.linalg.norm(d, axis=1)
        dirs = d / rng_d[:, None]
        near = np.flatnonzero(dist - np.hypot(half[:, 0], half[:, 1]) < rng_d.max())
        tin, tout = slab_many(origin, dirs, centre[near], half[near], yaw[near])       # [B, R]
        blocked = ((tout >= tin) & (tin > 1e-3) & (tin < rng_d[None]) & (near[:, None] != own[None])).any(axis=0)
        for k in np.flatnonzero(~blocked):
            b = own[k]
            mat = int(mats[b])
            v = vel[agent[b]] if agent[b] >= 0 else np.zeros(2)
            rel_v = v - ego_vel
            moving = np.hypot(*v) > 0.5
            oncoming = moving and float(v @ d[k, :2]) < 0
            x_s, y_s = c * d[k, 0] + s * d[k, 1], -s * d[k, 0] + c * d[k, 1]
            rows.append((x_s, y_s, 0.0, 2 if oncoming else (0 if moving else 1), len(rows),
                         RCS.get(mat, 5.0) + rng.normal(0, 2.0),
                         c * rel_v[0] + s * rel_v[1], -s * rel_v[0] + c * rel_v[1],
                         c * v[0] + s * v[1], -s * v[0] + c * v[1], 1, 3, 19, 19, 0, 1, 3, 3))
    for _ in range(int(rng.integers(1, 4))):           # clutter the default filters drop
        r, a = rng.uniform(5, 60), rng.uniform(-FOV, FOV)
        rows.append((r * np.cos(a), r * np.sin(a), 0.0, 1, len(rows), rng.normal(-5, 3), -ego_vel @ [c, s],
                     ego_vel @ [s, -c], 0.0, 0.0, 0, int(rng.integers(0, 3)), 19, 19,
                     int(rng.choice([1, 2, 6, 14])), 7, 3, 3))
    return np.array(rows, dtype=DTYPE)


def encode_pcd(points: np.ndarray) -> bytes:
    """The devkit's radar .pcd: ASCII header, packed little-endian records and one trailing byte."""
    if len(points) == 0:                               # the devkit reads a NaN first point as an empty cloud
        points = np.zeros(1, dtype=DTYPE)
        points["x"] = np.nan
    header = "\n".join([
        "# .PCD v0.7 - Point Cloud Data file format",
        "VERSION 0.7",
        "FIELDS " + " ".join(FIELDS),
        "SIZE 4 4 4 1 2 4 4 4 4 4 1 1 1 1 1 1 1 1",
        "TYPE F F F I I F F F F F I I I I I I I I",
        "COUNT 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1",
        f"WIDTH {len(points)}",
        "HEIGHT 1",
        "VIEWPOINT 0 0 0 1 0 0 0",
        f"POINTS {len(points)}",
        "DATA binary",
    ]) + "\n"
    return header.encode("ascii") + points.astype(DTYPE).tobytes() + b"\n"
