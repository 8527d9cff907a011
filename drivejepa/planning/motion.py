"""Plans in physical controls, and the one conversion from a plan to the model's actions and to a trajectory.

A plan is a sequence of controls, one per key-frame interval (0.5 s): the ego's speed over the interval (m/s: the
chord speed, the distance between the start and the end position over dt, which is the action's own speed column)
and its yaw rate (rad/s). Each interval is driven on a circular arc: the heading turns by ``yaw_rate * dt`` and the
chord, ``speed * dt`` long, points half way between the start and end headings, so the motion is

    dx = v dt cos(w dt / 2),   dy = v dt sin(w dt / 2),   dyaw = w dt

and ``frames.action_from_motion`` (the project's one action builder) turns it into the action (dx, dy, dyaw, speed,
yaw_rate), whose speed and yaw-rate columns are the controls again. Action recovery, the planner, the baselines and
every plan drawn as a trajectory go through :func:`controls_to_actions` and :func:`integrate`; the visualisation's
manoeuvres (``visualization/geometry.py``) do too.

Feasibility (:func:`feasible`): speeds within [0, max_speed] and within the acceleration limits of the previous
interval's speed; the yaw rate within the yaw-rate limit, the curvature limit (a stopped car cannot turn) and the
lateral-acceleration limit. Every function takes numpy arrays or torch tensors (any leading batch axes), except the
single-pose helpers :func:`compose` (a pose moved by a motion) and :func:`relative` (its inverse), which the
closed-loop simulator (``driving/``) uses too.
"""
from __future__ import annotations

import numpy as np

from drivejepa.data.frames import action_from_motion

CONTROLS = ("speed", "yaw_rate")


def _torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _namespace(x):
    """(array module, its concatenate) for ``x``: torch for tensors, numpy for anything else."""
    if _torch(x):
        import torch

        return torch, torch.cat
    return np, np.concatenate


def controls_to_motion(controls, dt: float):
    """Controls ``[..., K, 2]`` (speed, yaw rate) -> motions ``[..., K, 3]`` (dx, dy, dyaw in each interval's start
    ego frame) on circular arcs."""
    xp, _ = _namespace(controls)
    controls = controls if xp is not np else np.asarray(controls, dtype=np.float64)
    v, w = controls[..., 0], controls[..., 1]
    dyaw = w * dt
    chord = v * dt
    return xp.stack([chord * xp.cos(dyaw / 2), chord * xp.sin(dyaw / 2), dyaw], -1)


def controls_to_actions(controls, dt: float):
    """Controls ``[..., K, 2]`` -> the model's actions ``[..., K, 5]`` (dx, dy, dyaw, speed, yaw_rate)."""
    return action_from_motion(controls_to_motion(controls, dt), dt)


def actions_to_controls(actions):
    """Actions ``[..., K, 5]`` -> controls ``[..., K, 2]``: their speed and yaw-rate columns."""
    return actions[..., 3:5]


def integrate(actions):
    """Actions ``[..., K, >=3]`` (dx, dy, dyaw in each step's start ego frame) -> poses ``[..., K + 1, 3]`` (x, y,
    yaw) in the ego frame of the first step, starting at the origin."""
    xp, cat = _namespace(actions)
    d = actions[..., :3] if xp is not np else np.asarray(actions, dtype=np.float64)[..., :3]
    heading = xp.cumsum(d[..., 2], -1)
    before = cat([xp.zeros_like(heading[..., :1]), heading[..., :-1]], -1)
    c, s = xp.cos(before), xp.sin(before)
    x = xp.cumsum(c * d[..., 0] - s * d[..., 1], -1)
    y = xp.cumsum(s * d[..., 0] + c * d[..., 1], -1)
    poses = xp.stack([x, y, heading], -1)
    return cat([xp.zeros_like(poses[..., :1, :]), poses], -2)


def compose(pose, motion) -> np.ndarray:
    """The pose (x, y, yaw) reached from ``pose`` (x, y, yaw) by ``motion`` (dx, dy, dyaw in ``pose``'s frame):
    :func:`integrate` of the two steps (a pose is the motion from the origin)."""
    steps = np.stack([np.asarray(pose, dtype=np.float64)[:3], np.asarray(motion, dtype=np.float64)[:3]])
    return integrate(steps)[-1]


def relative(pose_a, pose_b) -> np.ndarray:
    """(dx, dy, dyaw) of ``pose_b`` in ``pose_a``'s frame (dyaw wrapped to (-pi, pi]): the inverse of
    :func:`compose`."""
    dx, dy = float(pose_b[0]) - float(pose_a[0]), float(pose_b[1]) - float(pose_a[1])
    c, s = np.cos(pose_a[2]), np.sin(pose_a[2])
    return np.array([c * dx + s * dy, -s * dx + c * dy, wrap(float(pose_b[2]) - float(pose_a[2]))])


def wrap(angle):
    """Angles wrapped to (-pi, pi]."""
    return -((-np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi)


def constant_velocity_controls(speed, horizon: int):
    """The constant-velocity extrapolation as controls ``[..., horizon, 2]``: the current speed (``[...]``, the last
    interval's speed) held, straight ahead (the velocity vector does not turn)."""
    if _torch(speed):
        import torch

        v = speed[..., None].expand(*speed.shape, horizon)
        return torch.stack([v, torch.zeros_like(v)], dim=-1)
    v = np.repeat(np.asarray(speed, dtype=np.float64)[..., None], horizon, axis=-1)
    return np.stack([v, np.zeros_like(v)], axis=-1)


def resume_controls(speed, cruise, accel: float, horizon: int, dt: float):
    """Controls ``[B, horizon, 2]`` (torch) that speed up from ``speed`` ``[B]`` toward ``cruise`` ``[B]`` at
    ``accel`` m/s^2 and hold it, straight ahead (the IDM's free-road acceleration; an ego at or above its cruise
    speed keeps its speed)."""
    import torch

    t = torch.arange(1, horizon + 1, device=speed.device, dtype=speed.dtype) * dt
    v = torch.minimum(speed[:, None] + accel * t, torch.maximum(cruise, speed)[:, None])
    return torch.stack([v, torch.zeros_like(v)], dim=-1)


def trend_controls(speed, accel, decay: float, horizon: int, dt: float):
    """Controls ``[B, horizon, 2]`` (torch) that keep the ego's acceleration now (``accel`` ``[B]`` m/s^2 from
    ``speed`` ``[B]``), fading by ``decay`` each step, straight ahead, never below a stop: an ego that is braking
    goes on braking less and less, one that is speeding up settles (the motion a comfortable driver continues)."""
    import torch

    fade = decay ** torch.arange(horizon, device=speed.device, dtype=speed.dtype)
    v = (speed[:, None] + (accel[:, None] * fade * dt).cumsum(-1)).clamp(min=0.0)
    return torch.stack([v, torch.zeros_like(v)], dim=-1)


def feasible(controls, speed_now, limits, dt: float):
    """Controls ``[..., K, 2]`` (torch) moved into the feasible set, step by step from ``speed_now`` (``[...]``, or a
    number): speed within [0, max_speed] and within [-max_decel, max_accel] * dt of the previous interval's speed;
    |yaw rate| within max_yaw_rate, max_curvature * speed and max_lateral_accel / speed. ``limits`` is a
    ``config.ControlLimits``."""
    import torch

    v_prev = torch.as_tensor(speed_now, dtype=controls.dtype, device=controls.device)
    v_prev = v_prev.expand(controls.shape[:-2]) if v_prev.dim() == 0 else v_prev
    speeds = []
    for k in range(controls.shape[-2]):
        v = torch.minimum(torch.maximum(controls[..., k, 0], v_prev - limits.max_decel * dt),
                          v_prev + limits.max_accel * dt).clamp(0.0, limits.max_speed)
        speeds.append(v)
        v_prev = v
    v = torch.stack(speeds, dim=-1)
    w_max = torch.minimum(limits.max_curvature * v, limits.max_lateral_accel / v.clamp(min=1e-3))
    w_max = w_max.clamp(max=limits.max_yaw_rate)
    w = torch.maximum(torch.minimum(controls[..., 1], w_max), -w_max)
    return torch.stack([v, w], dim=-1)

