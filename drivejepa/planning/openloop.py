"""Open-loop planning metrics on logged windows, the nuScenes planning protocol, both averaging conventions labelled.

For each window the planner (or a baseline) plans from what the decision knows; its trajectory is compared with the
logged one:

- L2 (metres) between planned and logged ego positions;
- collision rate: the share of windows whose planned ego box (``PlanConfig.ego_length`` x ``ego_width``) overlaps an
  annotated agent box of that future key frame (``boxes.boxes_overlap``, the project's one overlap test).

Papers mix two protocols, so both are reported, each labelled: ``uniad`` takes the value at t (UniAD), ``stp3`` the
mean over the 0.5 s steps up to t (ST-P3, VAD). Methods side by side: the world-model planner, constant velocity (the
current speed held straight ahead), the ego-status MLP (``ego_mlp.py``) and the logged expert (L2 = 0 by definition;
its collision rate is the annotation's own, a sanity line).
"""
from __future__ import annotations

import numpy as np

from drivejepa.boxes import boxes_overlap, ego_boxes

PROTOCOLS = {"uniad": "the value at t (UniAD)", "stp3": "the mean over the 0.5 s steps up to t (ST-P3, VAD)"}
SECONDS = (1.0, 2.0, 3.0)                   # the protocol's horizons


def step_of(seconds: float, dt: float) -> int:
    return int(round(seconds / dt))


def by_protocol(per_step: np.ndarray, seconds, dt: float) -> dict:
    """A per-step mean ``[H]`` (step k at k * dt seconds) -> {"uniad": [value at t], "stp3": [mean of steps <= t]};
    None where t lies beyond the horizon."""
    out: dict = {"uniad": [], "stp3": []}
    for t in seconds:
        k = step_of(t, dt)
        ok = 1 <= k <= len(per_step)
        out["uniad"].append(float(per_step[k - 1]) if ok else None)
        out["stp3"].append(float(np.mean(per_step[:k])) if ok else None)
    return out


def l2_errors(pred_xy: np.ndarray, truth_xy: np.ndarray) -> np.ndarray:
    """[W, H] distances between planned and logged positions (steps 1..H)."""
    return np.linalg.norm(np.asarray(pred_xy, np.float64) - np.asarray(truth_xy, np.float64), axis=-1)


def collisions(poses: np.ndarray, boxes: np.ndarray, box_mask: np.ndarray, cfg) -> np.ndarray:
    """Bool [W, H]: whether the ego box at planned poses ``[W, H + 1, 3]`` (steps 1..H used) overlaps any real
    agent box of that step (``boxes`` ``[W, H, M, 5]``, ``box_mask`` ``[W, H, M]``)."""
    ego = ego_boxes(np.asarray(poses)[:, 1:], cfg.ego_length, cfg.ego_width, cfg.ego_center_ahead)
    if boxes.shape[2] == 0:
        return np.zeros(ego.shape[:2], dtype=bool)
    hit = boxes_overlap(ego[:, :, None, :], boxes) & box_mask
    return hit.any(axis=-1)


def score(poses: np.ndarray, windows, cfg, seconds) -> dict:
    """L2 and collision rate of planned poses ``[W, H + 1, 3]`` on ``windows`` under both protocols."""
    dt = cfg.frame_seconds
    err = l2_errors(poses[:, 1:, :2], windows.truth[:, 1:, :2])
    col = collisions(poses, windows.boxes, windows.box_mask, cfg)
    return {"l2_m": by_protocol(err.mean(axis=0), seconds, dt),
            "collision_rate": by_protocol(col.mean(axis=0), seconds, dt)}
