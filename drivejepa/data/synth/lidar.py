"""LIDAR_TOP: a spinning 32-beam scan (Velodyne HDL-32E geometry) ray-cast against the world.

Rays are laid out as [azimuth column, beam]; a box is only tested against the columns and beams its silhouette can
cover, which keeps a 35k-ray scan against a few hundred boxes at a few tens of milliseconds. Points are written in
the sensor frame as the devkit's float32 x5 ``.pcd.bin`` (x, y, z, intensity 0-255, ring index 0-31).

As on the real car, the lowest beams hit the ego's own roof around the sensor mount: about a fifth of a scan lies
within 0.7 m (|x|, |y|) of the sensor, the returns the devkit's ``remove_close(1.0)`` drops. Other sensors do not see
the ego's body.
"""
from __future__ import annotations

import numpy as np

from drivejepa.data.synth.materials import GRASS, MATERIALS, VEHICLE
from drivejepa.data.synth.world import MAP_RESOLUTION, World

ELEVATIONS = np.radians(np.linspace(-30.67, 10.67, 32))
AZIMUTH_STEPS = 1084                 # 0.33 degree columns: ~34.7k rays a sweep like the real sensor
MAX_RANGE = 80.0
TRANSLATION = (0.943, 0.0, 1.84)     # ego frame, metres (nuScenes-like roof mount)
YAW = -np.pi / 2                     # sensor x points to the ego's right, y forward (as in nuScenes)
GROUND_ID = -2
BODY_HALF = (0.7, 0.7, 0.02)         # the ego's roof around the sensor mount, half extents (m, sensor-centred)
BODY_DROP = 0.3                      # its top this far below the sensor


def sensor_directions(steps: int = AZIMUTH_STEPS) -> np.ndarray:
    """Unit ray directions in the sensor frame, [steps, 32, 3]."""
    phi = np.arange(steps) * (2 * np.pi / steps)
    ce, se = np.cos(ELEVATIONS), np.sin(ELEVATIONS)
    return np.stack([np.cos(phi)[:, None] * ce[None], np.sin(phi)[:, None] * ce[None],
                     np.broadcast_to(se[None], (steps, 32))], axis=-1)


def slab(origin: np.ndarray, dirs: np.ndarray, centre, half, yaw):
    """Ray / upright-box intersection. Returns (t_enter, t_exit, axis of the entry face) for each ray."""
    c, s = np.cos(yaw), np.sin(yaw)
    o = origin - centre
    ol = np.array([c * o[0] + s * o[1], -s * o[0] + c * o[1], o[2]])
    dl = np.stack([c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (-half - ol) * inv
        t2 = (half - ol) * inv
    tlo = np.minimum(t1, t2)
    thi = np.maximum(t1, t2)
    axis = np.argmax(tlo, axis=1)
    return tlo.max(axis=1), thi.min(axis=1), np.abs(dl[np.arange(len(dl)), axis])


def slab_many(origin: np.ndarray, dirs: np.ndarray, centre, half, yaw):
    """Entry and exit distances of rays [R] through boxes [B], both [B, R]."""
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    o = origin[None] - centre                                            # [B, 3]
    ol = np.stack([c[:, 0] * o[:, 0] + s[:, 0] * o[:, 1], -s[:, 0] * o[:, 0] + c[:, 0] * o[:, 1], o[:, 2]], 1)
    dl = np.stack([c * dirs[None, :, 0] + s * dirs[None, :, 1], -s * dirs[None, :, 0] + c * dirs[None, :, 1],
                   np.broadcast_to(dirs[None, :, 2], c.shape[:1] + dirs.shape[:1])], axis=-1)   # [B, R, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (-half[:, None] - ol[:, None]) * inv
        t2 = (half[:, None] - ol[:, None]) * inv
    return np.minimum(t1, t2).max(axis=-1), np.maximum(t1, t2).min(axis=-1)


def sensor_pose(world: World, t: float):
    """Lidar origin (world) and yaw at time t."""
    xy, yaw, _ = world.ego_pose(t)
    c, s = np.cos(yaw), np.sin(yaw)
    o = np.array([xy[0] + c * TRANSLATION[0] - s * TRANSLATION[1], xy[1] + s * TRANSLATION[0] + c * TRANSLATION[1],
                  TRANSLATION[2]])
    return o, yaw + YAW


def scan(world: World, t: float, rng: np.random.Generator, dirs_sensor: np.ndarray):
    """One sweep at time t. Returns (points [N, 5] float32 in the sensor frame, agent index per point (-1 = none),
    visibility per agent: fraction of the rays that would reach it that do)."""
    steps = dirs_sensor.shape[0]
    nb = len(ELEVATIONS)
    origin, psi = sensor_pose(world, t)
    c, s = np.cos(psi), np.sin(psi)
    ds = dirs_sensor.reshape(-1, 3)
    dw = np.stack([c * ds[:, 0] - s * ds[:, 1], s * ds[:, 0] + c * ds[:, 1], ds[:, 2]], axis=1)
    n = len(dw)
    t_best = np.full(n, np.inf)
    hit_id = np.full(n, -1)
    cos_inc = np.ones(n)
    down = dw[:, 2] < -1e-6
    t_best[down] = -origin[2] / dw[down, 2]
    hit_id[down] = GROUND_ID
    cos_inc[down] = -dw[down, 2]
    far = t_best > MAX_RANGE
    t_best[far], hit_id[far] = np.inf, -1

    centre, half, yaw, mats, _, agent = world.boxes(t)             # agents other than the ego, structures
    roof = origin - np.array([0.0, 0.0, BODY_DROP + BODY_HALF[2]])
    centre, half = np.concatenate([centre, roof[None]]), np.concatenate([half, [BODY_HALF]])
    yaw, mats, agent = np.append(yaw, psi), np.append(mats, VEHICLE), np.append(agent, -1)
    dstep = 2 * np.pi / steps
    would = np.zeros(len(centre))
    for b in range(len(centre)):
        rel = centre[b, :2] - origin[:2]
        dist = float(np.hypot(*rel))
        diag = float(np.hypot(half[b, 0], half[b, 1]))
        if dist - diag > MAX_RANGE:
            continue
        cb, sb = np.cos(yaw[b]), np.sin(yaw[b])
        lx, ly = -(cb * rel[0] + sb * rel[1]), -(-sb * rel[0] + cb * rel[1])   # origin in box frame
        qx, qy = np.clip(lx, -half[b, 0], half[b, 0]), np.clip(ly, -half[b, 1], half[b, 1])
        r_min = float(np.hypot(lx - qx, ly - qy))
        if r_min < 1e-6:
            cols = np.arange(steps)
        else:
            cx = np.array([1, 1, -1, -1]) * half[b, 0]
            cy = np.array([1, -1, 1, -1]) * half[b, 1]
            wx = centre[b, 0] + cb * cx - sb * cy - origin[0]
            wy = centre[b, 1] + sb * cx + cb * cy - origin[1]
            a_c = np.arctan2(rel[1], rel[0])
            delta = np.angle(np.exp(1j * (np.arctan2(wy, wx) - a_c)))
            lo = int(np.floor((a_c + delta.min() - psi) / dstep))
            hi = int(np.ceil((a_c + delta.max() - psi) / dstep))
            cols = np.arange(lo, hi + 1) % steps
        r_max = dist + diag
        zb, zt = centre[b, 2] - half[b, 2] - origin[2], centre[b, 2] + half[b, 2] - origin[2]
        el_lo = np.arctan2(zb, max(r_min, 1e-6) if zb < 0 else r_max)
        el_hi = np.arctan2(zt, max(r_min, 1e-6) if zt > 0 else r_max)
        b0 = int(np.searchsorted(ELEVATIONS, el_lo - 0.01))
        b1 = int(np.searchsorted(ELEVATIONS, el_hi + 0.01))
        if b1 <= b0:
            continue
        idx = (cols[:, None] * nb + np.arange(b0, b1)[None]).ravel()
        tin, tout, cinc = slab(origin, dw[idx], centre[b], half[b], yaw[b])
        reach = (tout >= tin) & (tin > 1e-3) & (tin < MAX_RANGE)
        would[b] = reach.sum()
        hit = reach & (tin < t_best[idx])
        sel = idx[hit]
        t_best[sel] = tin[hit]
        hit_id[sel] = b
        cos_inc[sel] = cinc[hit]

    valid = hit_id != -1
    rain = world.weather == "rain"
    if rain:                                         # rain: fewer returns, more so far away, and noisier ranges
        keep_p = 0.85 - 0.35 * np.clip(t_best / MAX_RANGE, 0, 1)
        valid &= rng.random(n) < keep_p
    sel = np.flatnonzero(valid)
    rng_t = t_best[sel] + rng.normal(0.0, 0.06 if rain else 0.015, len(sel))
    pts = ds[sel] * rng_t[:, None]

    ids = hit_id[sel]
    material = np.empty(len(sel), dtype=np.int64)
    on_box = ids >= 0
    material[on_box] = mats[ids[on_box]]
    gp = origin[None] + dw[sel[~on_box]] * t_best[sel[~on_box], None]
    grid = world.material_grid
    H, W = grid.shape
    col = np.round(gp[:, 0] / MAP_RESOLUTION).astype(np.int64)
    row = np.round(H - gp[:, 1] / MAP_RESOLUTION).astype(np.int64)
    inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
    gm = np.full(len(gp), GRASS, dtype=np.int64)
    gm[inside] = grid[row[inside], col[inside]]
    material[~on_box] = gm
    lo = np.array([MATERIALS[m].intensity[0] if m in MATERIALS else 0 for m in range(max(MATERIALS) + 1)])
    hi = np.array([MATERIALS[m].intensity[1] if m in MATERIALS else 0 for m in range(max(MATERIALS) + 1)])
    frac = np.clip(cos_inc[sel] * 0.8 + rng.normal(0.0, 0.08, len(sel)) + 0.1, 0, 1)
    intensity = np.round(lo[material] + frac * (hi[material] - lo[material]))
    ring = (sel % nb).astype(np.float64)
    out = np.concatenate([pts, intensity[:, None], ring[:, None]], axis=1).astype(np.float32)

    point_agent = np.where(on_box, agent[np.maximum(ids, 0)], -1)
    nearest = np.bincount(ids[on_box], minlength=len(centre))
    visibility = {}
    for b in np.flatnonzero(agent >= 0):
        if would[b] > 0:
            visibility[int(agent[b])] = float(nearest[b] / would[b])
    return out, point_agent, visibility
