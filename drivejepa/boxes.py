"""Planar box overlap: the one collision test of the project (the synthetic world's branch tags, the open-loop
collision rate, the planner's oracle cost, closed-loop driving).

A planar box is ``[..., 5]``: centre x, y (metres), yaw (radians), length (along the heading) and width. Two boxes
overlap unless a separating axis exists (for rectangles, one of the four edge normals); boxes that only touch
overlap. Any leading axes broadcast, in numpy or torch alike.
"""
from __future__ import annotations

import numpy as np


def _torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _axes_and_corners(box, xp):
    x, y, yaw, length, width = (box[..., i] for i in range(5))
    c, s = xp.cos(yaw), xp.sin(yaw)
    u = xp.stack([c, s], -1)                                              # heading
    n = xp.stack([-s, c], -1)                                             # left
    centre = xp.stack([x, y], -1)
    half_l, half_w = (length / 2)[..., None], (width / 2)[..., None]
    corners = xp.stack([centre + sx * half_l * u + sy * half_w * n
                        for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1))], -2)   # [..., 4, 2]
    return xp.stack([u, n], -2), corners                                 # [..., 2, 2], [..., 4, 2]


def box_corners(box):
    """Corners ``[..., 4, 2]`` of planar boxes ``[..., 5]`` (numpy), front-left first, going round."""
    return _axes_and_corners(np.asarray(box, dtype=np.float64), np)[1]


def boxes_overlap(a, b):
    """Bool ``[...]``: whether planar boxes ``a`` and ``b`` (``[..., 5]``: x, y, yaw, length, width; leading axes
    broadcast) overlap. Separating-axis test on the four edge normals; touching counts as overlap."""
    if _torch(a) or _torch(b):
        import torch

        a = torch.as_tensor(a)
        a, b = torch.broadcast_tensors(a, torch.as_tensor(b, dtype=a.dtype, device=a.device))
        xp, cat, lo, hi = torch, torch.cat, (lambda t: t.amin(-1)), (lambda t: t.amax(-1))
    else:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        xp, cat, lo, hi = np, np.concatenate, (lambda t: t.min(-1)), (lambda t: t.max(-1))
    axes_a, corners_a = _axes_and_corners(a, xp)
    axes_b, corners_b = _axes_and_corners(b, xp)
    axes = cat([axes_a, axes_b], -2)                                      # [..., 4, 2]
    pa = axes @ corners_a.swapaxes(-1, -2)                                # [..., 4 axes, 4 corners]
    pb = axes @ corners_b.swapaxes(-1, -2)
    separated = (hi(pa) < lo(pb)) | (hi(pb) < lo(pa))
    return ~separated.any(-1)


def planar_boxes(boxes):
    """Shard boxes ``[..., >=7]`` (x, y, z, w, l, h, yaw, ...) -> planar boxes ``[..., 5]`` (x, y, yaw, l, w)."""
    idx = [0, 1, 6, 4, 3]
    return boxes[..., idx]


def ego_boxes(poses, length: float, width: float, center_ahead: float = 0.0):
    """Planar boxes ``[..., 5]`` of the ego at poses ``[..., 3]`` (x, y, yaw of the ego frame's origin); the box
    centre lies ``center_ahead`` metres ahead of the origin along the heading (0 where the pose is the car's centre,
    as in the synthetic world; nuScenes' ego frame sits on the rear axle)."""
    if _torch(poses):
        import torch

        x = poses[..., 0] + center_ahead * torch.cos(poses[..., 2])
        y = poses[..., 1] + center_ahead * torch.sin(poses[..., 2])
        return torch.stack([x, y, poses[..., 2], torch.full_like(x, length), torch.full_like(x, width)], -1)
    poses = np.asarray(poses, dtype=np.float64)
    x = poses[..., 0] + center_ahead * np.cos(poses[..., 2])
    y = poses[..., 1] + center_ahead * np.sin(poses[..., 2])
    return np.stack([x, y, poses[..., 2], np.full_like(x, length), np.full_like(x, width)], -1)
