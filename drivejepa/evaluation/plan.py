"""Planning an evaluation in the driver: every window of the evaluated scenes and its shuffled-action partner.

The driver reads only small arrays (actions, validity, frame indices), so the shuffled-action baseline's partners
(drivejepa/baselines.py: a seeded derangement of every evaluated window) do not depend on how scenes are grouped over
workers.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa.baselines import shuffled_sources
from drivejepa.errors import UserError
from drivejepa.evaluation.latents import window_starts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SceneJob:
    scene: str
    path: str
    role: str                                   # "eval": latents, rollouts and labels; "train": latents and labels
    starts: Optional[np.ndarray] = None         # window starts (eval scenes)
    shuffled_actions: Optional[np.ndarray] = None  # [W, Tc-1+H, 5] past and future actions of other windows
    departing: Optional[np.ndarray] = None      # [W] bool: the window's actions depart from the previous one


def departing_windows(actions: np.ndarray, valid: np.ndarray, starts: np.ndarray, horizon: int, dx: float,
                      dyaw: float) -> np.ndarray:
    """[W] bool: window s departs when two consecutive valid actions among a_{s-1}..a_{s+H-1} (the last context
    frame's action, then the future ones) differ by at least ``dx`` metres in dx or ``dyaw`` radians in dyaw: the
    future motion is not the past motion continued, so only the actions can tell it."""
    out = np.zeros(len(starts), dtype=bool)
    for i, s in enumerate(np.asarray(starts, dtype=np.int64)):
        lo = max(int(s) - 1, 0)
        a, ok = actions[lo:s + horizon], valid[lo:s + horizon]
        pair = ok[1:] & ok[:-1]
        change = np.abs(np.diff(a[:, [0, 2]], axis=0))
        out[i] = bool(np.any(pair & ((change[:, 0] >= dx) | (change[:, 1] >= dyaw))))
    return out


def plan_jobs(shard_dir: str | Path, eval_scenes: list[str], train_scenes: list[str], context: int, horizon: int,
              shuffle_seed: int, departure: tuple[float, float] = (0.3, 0.03)) -> tuple[list[SceneJob], dict]:
    """Jobs for every readable scene, with the windows of the eval scenes, the shuffled-action assignment and which
    windows depart (``departing_windows`` with ``departure`` = (dx, dyaw) thresholds).

    A shard that cannot be read is skipped and listed in ``plan["skipped"]`` with the reason."""
    from drivejepa.data.shards import check_scene, load_manifest, shard_path

    manifest = load_manifest(shard_dir)
    jobs, window_ids, window_actions, skipped, descriptions = [], [], [], [], {}
    for scene in eval_scenes:
        path = shard_path(shard_dir, scene)
        try:
            shard = check_scene(shard_dir, scene, manifest)
        except (UserError, OSError) as exc:
            log.warning("skipping scene %s: %s", scene, exc)
            skipped.append({"scene": scene, "role": "eval", "reason": str(exc)})
            continue
        meta_idx = shard.meta.get("frame_indices")
        starts = window_starts(shard.frames, context, horizon, np.asarray(shard.arrays["action_valid"]),
                               None if meta_idx is None else np.asarray(meta_idx))
        actions = np.asarray(shard.arrays["actions"], dtype=np.float32)
        for s in starts:
            window_ids.append((scene, int(s)))
            window_actions.append(actions[s - context + 1:s + horizon])
        descriptions[scene] = shard.meta.get("description", "")
        departing = departing_windows(actions, np.asarray(shard.arrays["action_valid"], dtype=bool), starts, horizon,
                                      *departure)
        jobs.append(SceneJob(scene, str(path), "eval", starts, departing=departing))
    if not window_ids:
        raise UserError(f"{shard_dir}: no evaluation window of {context} context + {horizon} future consecutive key "
                        f"frames in scenes {eval_scenes[:5]}{'...' if len(eval_scenes) > 5 else ''}")
    perm = shuffled_sources(len(window_ids), shuffle_seed)
    shuffled = np.stack(window_actions)[perm]
    pos = 0
    for job in jobs:
        n = len(job.starts)
        job.shuffled_actions = shuffled[pos:pos + n]
        pos += n
    for scene in train_scenes:
        path = shard_path(shard_dir, scene)
        try:
            check_scene(shard_dir, scene, manifest)
        except (UserError, OSError) as exc:
            log.warning("skipping train scene %s: %s", scene, exc)
            skipped.append({"scene": scene, "role": "train", "reason": str(exc)})
            continue
        jobs.append(SceneJob(scene, str(path), "train"))
    plan = {"windows": len(window_ids), "permutation_seed": shuffle_seed,
            "shuffled_source": [list(window_ids[j]) for j in perm], "descriptions": descriptions, "skipped": skipped}
    return jobs, plan
