"""Planar ego motion: poses (x, y, yaw), motions between them, and the 20 Hz track that realises a key-frame action.

An action is the shard's (dx, dy, dyaw, speed, yaw_rate): the ego motion from key frame i to i+1 in frame i's ego
coordinates (``frames.action_from_motion`` builds it). The simulator realises it at the traffic simulation's 20 Hz:
a cubic Hermite curve from where the ego is to the commanded pose, leaving along the ego's heading and arriving along
the commanded one, travelled at the constant speed that reaches it on time. So the motion between the two key frames
is the commanded one, whatever happens in between.
"""
from __future__ import annotations

import numpy as np

from drivejepa.planning.motion import compose, relative, wrap


def hermite_track(start, end, steps: int) -> np.ndarray:
    """[steps, 3] poses after each of ``steps`` equal time steps from ``start`` to ``end`` (both x, y, yaw): a cubic
    Hermite curve whose end tangents are the two headings (scaled by the chord), sampled at equal parameter steps,
    heading along the curve. A target behind the start is reached in reverse (tangents and headings flipped); a
    target within a millimetre is reached by turning on the spot."""
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    u = np.arange(1, steps + 1, dtype=np.float64)[:, None] / steps
    turn = wrap(end[2] - start[2])
    chord = float(np.hypot(*(end[:2] - start[:2])))
    if chord < 1e-3:
        xy = start[:2] + u * (end[:2] - start[:2])
        return np.concatenate([xy, start[2] + u * turn], axis=1)
    ahead = relative(start, end)[0] >= 0.0
    sign = 1.0 if ahead else -1.0
    t0 = sign * chord * np.array([np.cos(start[2]), np.sin(start[2])])
    t1 = sign * chord * np.array([np.cos(end[2]), np.sin(end[2])])
    h00, h10, h01, h11 = 2 * u ** 3 - 3 * u ** 2 + 1, u ** 3 - 2 * u ** 2 + u, -2 * u ** 3 + 3 * u ** 2, u ** 3 - u ** 2
    xy = h00 * start[:2] + h10 * t0 + h01 * end[:2] + h11 * t1
    d00, d10, d01, d11 = 6 * u ** 2 - 6 * u, 3 * u ** 2 - 4 * u + 1, -6 * u ** 2 + 6 * u, 3 * u ** 2 - 2 * u
    tangent = sign * (d00 * start[:2] + d10 * t0 + d01 * end[:2] + d11 * t1)
    heading = np.arctan2(tangent[:, 1], tangent[:, 0])
    # continuous with the start heading (the target's heading may differ from it by more than pi after wrapping)
    heading = start[2] + np.unwrap(np.concatenate([[0.0], wrap(heading - start[2])]))[1:]
    heading[-1] = start[2] + turn
    return np.concatenate([xy, heading[:, None]], axis=1)


def extend(track: np.ndarray, previous) -> np.ndarray:
    """One more step after ``track`` [N, 3] repeating its last step's motion (``previous``: the pose before
    track[0], used when N is 1)."""
    before = track[-2] if len(track) > 1 else np.asarray(previous, dtype=np.float64)
    return compose(track[-1], relative(before, track[-1]))


def action_from_relative(pose, dt: float) -> np.ndarray:
    """The action (dx, dy, dyaw, speed, yaw_rate) of moving from the origin to ``pose`` (x, y, yaw in the start
    frame) in ``dt`` seconds, built by ``frames.action_from_motion``."""
    from drivejepa.data.frames import action_from_motion

    return action_from_motion(np.asarray(pose, dtype=np.float64)[:3], dt).astype(np.float64)
