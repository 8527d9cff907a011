"""Planning windows read from shards: what a decision at key frame ``s`` knows and what the log did next.

A window at ``s`` has its context (key frames ``s - Tc + 1 .. s``), the ego's past actions, its current speed (the
last interval's), the route command (derived from the logged position at ``command_seconds``: ``route.py``), and for
scoring the logged future: ego poses ``s .. s + H`` and the annotated agent boxes of frames ``s + 1 .. s + H``, all
in the ego frame of ``s``. Windows are those of the evaluation (``evaluation.latents.window_starts``: consecutive key
frames, valid actions); a counterfactual branch scene contributes the window at its branch frame, the moment its ego
departs from what its past predicts (its earlier windows are its parent's).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from drivejepa.planning.route import command_from_offset


@dataclasses.dataclass
class Windows:
    scene: list[str]                   # [W]
    start: np.ndarray                  # [W] key frame index s in the shard
    branch: np.ndarray                 # [W] bool: a counterfactual branch's departure window
    past: np.ndarray                   # [W, P, 5] actions a_{s-P} .. a_{s-1} (the earliest repeated before frame 0)
    speed_now: np.ndarray              # [W] m/s
    cruise_speed: np.ndarray           # [W] m/s: the highest of the last reference_seconds (costs.cruise_speed)
    command: np.ndarray                # [W] index into route.COMMANDS
    truth: np.ndarray                  # [W, H + 1, 3] logged ego poses x, y, yaw in the ego frame of s
    actions: np.ndarray                # [W, H, 5] logged actions a_s .. a_{s+H-1}
    boxes: np.ndarray                  # [W, H, M, 5] agent boxes (x, y, yaw, length, width) of s+1 .. s+H
    box_mask: np.ndarray               # [W, H, M]

    def __len__(self) -> int:
        return len(self.start)

    def take(self, index) -> "Windows":
        index = np.asarray(index, dtype=np.int64)
        return Windows(**{f.name: ([getattr(self, f.name)[i] for i in index] if f.name == "scene"
                                   else getattr(self, f.name)[index]) for f in dataclasses.fields(self)})


def relative_poses_2d(ego_pose: np.ndarray, s: int, frames: np.ndarray) -> np.ndarray:
    """[K, 3] (x, y, yaw) of key frames ``frames`` in the ego frame of key frame ``s``."""
    rel = np.linalg.inv(ego_pose[s])[None] @ ego_pose[frames]
    return np.stack([rel[:, 0, 3], rel[:, 1, 3], np.arctan2(rel[:, 1, 0], rel[:, 0, 0])], axis=1)


def scene_windows(shard, context: int, horizon: int, past_steps: int, cfg, agent_ids: np.ndarray,
                  starts: Optional[np.ndarray] = None) -> Windows:
    """Every window of one shard (or those at ``starts``); ``cfg`` is a ``config.PlanConfig``."""
    from drivejepa.boxes import planar_boxes
    from drivejepa.data.synth.scenarios import branch_of
    from drivejepa.evaluation.latents import window_starts
    from drivejepa.evaluation.probes import agent_mask
    from drivejepa.planning.costs import cruise_speed

    a = shard.arrays
    n = shard.frames
    frames = np.asarray(shard.meta.get("frame_indices", np.arange(n)))
    actions = np.asarray(a["actions"], dtype=np.float32)
    poses = np.asarray(a["ego_pose"], dtype=np.float64)
    branch = branch_of(shard.meta.get("description", ""))
    if starts is None:
        starts = window_starts(n, context, horizon, np.asarray(a["action_valid"], dtype=bool), frames)
        if branch is not None:
            starts = starts[frames[starts] == branch["frame"]]
    starts = np.asarray(starts, dtype=np.int64)
    keep = agent_mask(np.asarray(a["box_labels"]), np.asarray(a["box_mask"]), agent_ids)
    boxes = planar_boxes(np.asarray(a["boxes"], dtype=np.float64))
    k_cmd = min(horizon, max(1, round(cfg.command_seconds / cfg.frame_seconds)))
    w, m = len(starts), boxes.shape[1]
    out = Windows(scene=[shard.meta["scene"]] * w, start=starts, branch=np.full(w, branch is not None),
                  past=np.zeros((w, past_steps, 5), np.float32), speed_now=np.zeros(w, np.float32),
                  cruise_speed=np.zeros(w, np.float32),
                  command=np.zeros(w, np.int64), truth=np.zeros((w, horizon + 1, 3)),
                  actions=np.zeros((w, horizon, 5), np.float32), boxes=np.zeros((w, horizon, m, 5)),
                  box_mask=np.zeros((w, horizon, m), bool))
    for i, s in enumerate(starts):
        idx = np.clip(np.arange(s - past_steps, s), 0, None)
        out.past[i] = actions[idx]
        out.speed_now[i] = actions[s - 1, 3] if s >= 1 else 0.0
        out.cruise_speed[i] = cruise_speed(actions[:s, 3], cfg) if s >= 1 else 0.0
        future = np.arange(s, s + horizon + 1)
        out.truth[i] = relative_poses_2d(poses, s, future)
        out.actions[i] = actions[s:s + horizon]
        for k in range(1, horizon + 1):
            rel = np.linalg.inv(poses[s]) @ poses[s + k]
            b = boxes[s + k]
            xy = b[:, :2] @ rel[:2, :2].T + rel[:2, 3]
            out.boxes[i, k - 1] = np.column_stack([xy, b[:, 2] + np.arctan2(rel[1, 0], rel[0, 0]), b[:, 3:5]])
            out.box_mask[i, k - 1] = keep[s + k]
        out.command[i] = command_from_offset(out.truth[i, k_cmd, 1], cfg.command_threshold)
    return out


def concatenate(parts: list[Windows]) -> Optional[Windows]:
    """One Windows of many (boxes padded to the largest count with mask False); None when empty."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    m = max(p.boxes.shape[2] for p in parts)

    def pad(x, value):
        extra = m - x.shape[2]
        return x if extra == 0 else np.concatenate([x, np.full((*x.shape[:2], extra, *x.shape[3:]), value,
                                                                dtype=x.dtype)], axis=2)

    return Windows(scene=[s for p in parts for s in p.scene], start=np.concatenate([p.start for p in parts]),
                   branch=np.concatenate([p.branch for p in parts]), past=np.concatenate([p.past for p in parts]),
                   speed_now=np.concatenate([p.speed_now for p in parts]),
                   cruise_speed=np.concatenate([p.cruise_speed for p in parts]),
                   command=np.concatenate([p.command for p in parts]), truth=np.concatenate([p.truth for p in parts]),
                   actions=np.concatenate([p.actions for p in parts]),
                   boxes=np.concatenate([pad(p.boxes, 0.0) for p in parts]),
                   box_mask=np.concatenate([pad(p.box_mask, False) for p in parts]))
