"""Plain numpy geometry for the views: box corners, rigid transforms, ego paths from poses and from actions.

Conventions follow the shards: ego frame x forward, y left, z up (metres); a box is x, y, z (centre), w (extent
along the box's y), l (extent along its heading x), h, yaw (about z), vx, vy; an action is dx, dy, dyaw (motion to the
next key frame in the current ego frame), speed, yaw_rate.
"""
from __future__ import annotations

import numpy as np

# Edges of the eight corners returned by box_corners: bottom face, top face, verticals.
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                      [0, 4], [1, 5], [2, 6], [3, 7]], dtype=np.int64)


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """[B, >=7] boxes -> [B, 8, 3] corners; 0-3 the bottom face (front-left, front-right, rear-right, rear-left)."""
    boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    x, y, z, w, l, h, yaw = (boxes[:, i] for i in range(7))
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * 0.5
    lx = l[:, None] * sx
    ly = w[:, None] * sy
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    cx = x[:, None] + c * lx - s * ly
    cy = y[:, None] + s * lx + c * ly
    cz = z[:, None] + h[:, None] * sz
    return np.stack([cx, cy, cz], axis=-1)


def pose2d_matrix(x: float, y: float, yaw: float) -> np.ndarray:
    """4x4 transform of a planar pose (x, y, yaw)."""
    m = np.eye(4)
    c, s = np.cos(yaw), np.sin(yaw)
    m[:2, :2] = [[c, -s], [s, c]]
    m[0, 3], m[1, 3] = x, y
    return m


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to [..., 3] points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def transform_boxes(matrix: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Move [B, 9] boxes by a rigid transform that rotates about z only (positions, yaw and velocities)."""
    boxes = np.array(boxes, dtype=np.float64, copy=True)
    if len(boxes) == 0:
        return boxes
    boxes[:, :3] = transform_points(matrix, boxes[:, :3])
    boxes[:, 6] += np.arctan2(matrix[1, 0], matrix[0, 0])
    if boxes.shape[1] >= 9:
        boxes[:, 7:9] = boxes[:, 7:9] @ matrix[:2, :2].T
    return boxes


def relative_poses(ego_pose: np.ndarray, ref: int) -> np.ndarray:
    """[L, 4, 4] ego-to-global poses -> [L, 4, 4] transforms from each frame into the ego frame of frame ``ref``."""
    ego_pose = np.asarray(ego_pose, dtype=np.float64)
    return np.linalg.inv(ego_pose[ref])[None] @ ego_pose


def integrate_actions(actions: np.ndarray) -> np.ndarray:
    """[K, >=3] actions (dx, dy, dyaw in the current ego frame) -> [K + 1, 3] poses (x, y, yaw), starting at 0
    (``planning.motion.integrate``, the one definition)."""
    from drivejepa.planning.motion import integrate

    return integrate(np.asarray(actions, dtype=np.float64))


def arc_action(speed: float, yaw_rate: float, dt: float) -> np.ndarray:
    """The action (dx, dy, dyaw, speed, yaw_rate) of driving ``dt`` seconds on a circular arc at ``speed`` m/s along
    the arc, built the planner's way (``planning.motion.controls_to_actions``, whose speed is the chord speed the
    shards record: ``frames.action_from_motion``), so the predictor is fed what training saw."""
    from drivejepa.planning.motion import controls_to_actions

    chord_speed = speed * np.sinc(yaw_rate * dt / 2 / np.pi)
    return controls_to_actions(np.array([chord_speed, yaw_rate], dtype=np.float64), dt)
