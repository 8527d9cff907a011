"""Action sequences to roll the world model out under: the recorded ones, simple manoeuvres, or a user's file.

An action is (dx, dy, dyaw, speed, yaw_rate) as in the shards. Manoeuvres start from what the ego was doing at the
start frame (its speed and yaw rate) and are driven on circular arcs, ``dt`` seconds a step (the key-frame
interval).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from drivejepa.errors import UserError
from drivejepa.visualization.geometry import arc_action

PRESETS = ("keep", "brake", "accelerate", "left", "right")
BRAKE = 3.0          # m/s^2
ACCELERATE = 1.5     # m/s^2
MAX_SPEED = 30.0     # m/s
TURN_RATE = 0.3      # rad/s


def preset_actions(name: str, speed: float, yaw_rate: float, horizon: int, dt: float) -> np.ndarray:
    """[horizon, 5] actions of a named manoeuvre starting at ``speed`` m/s and ``yaw_rate`` rad/s."""
    if name not in PRESETS:
        raise UserError(f"unknown action preset '{name}' (choose from {', '.join(PRESETS)} or give a file)")
    out = []
    v, w = float(speed), float(yaw_rate)
    for _ in range(horizon):
        if name == "brake":
            v = max(0.0, v - BRAKE * dt)
        elif name == "accelerate":
            v = min(MAX_SPEED, v + ACCELERATE * dt)
        elif name == "left":
            w = TURN_RATE
        elif name == "right":
            w = -TURN_RATE
        out.append(arc_action(v, w, dt))
    return np.stack(out).astype(np.float32)


def load_action_file(path: str | Path, horizon: int, dt: float) -> np.ndarray:
    """Actions from a .json (a list of [dx, dy, dyaw(, speed, yaw_rate)] rows) or .npy file; rows with three
    values get speed and yaw rate from ``dt``. Must hold at least ``horizon`` rows."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            rows = np.load(path, allow_pickle=False)
        elif path.suffix == ".json":
            rows = np.asarray(json.loads(path.read_text()), dtype=np.float64)
        else:
            raise UserError(f"{path}: action files must be .json or .npy")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read actions ({exc})") from exc
    if rows.ndim != 2 or rows.shape[1] not in (3, 5):
        raise UserError(f"{path}: actions must be rows of 3 (dx, dy, dyaw) or 5 (+ speed, yaw_rate) numbers, "
                        f"got shape {list(rows.shape)}")
    if len(rows) < horizon:
        raise UserError(f"{path}: {len(rows)} actions for a horizon of {horizon}")
    if not np.all(np.isfinite(rows)):
        raise UserError(f"{path}: actions contain NaN or infinite values")
    rows = rows[:horizon]
    if rows.shape[1] == 3:
        from drivejepa.data.frames import action_from_motion

        rows = action_from_motion(rows, dt)
    return rows.astype(np.float32)


def action_sequences(spec: str, recorded: np.ndarray, speed: float, yaw_rate: float, horizon: int,
                     dt: float) -> dict[str, np.ndarray]:
    """The selected sequence (first) and every counterfactual, by name: 'recorded', the presets, and a file's stem."""
    seqs = {"recorded": np.asarray(recorded, dtype=np.float32)}
    for name in PRESETS:
        seqs[name] = preset_actions(name, speed, yaw_rate, horizon, dt)
    if spec in seqs:
        return {spec: seqs[spec], **{k: v for k, v in seqs.items() if k != spec}}
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--actions {spec}: neither a preset (recorded, {', '.join(PRESETS)}) nor an existing file")
    return {f"file:{path.stem}": load_action_file(path, horizon, dt), **seqs}
