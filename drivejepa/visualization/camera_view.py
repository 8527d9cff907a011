"""Boxes drawn onto a camera image with the shard's calibration of that key frame and camera: ``cam_intrinsics``
[3, 3] and ``cam_to_key_ego`` [4, 4], the camera at its own capture time to the key frame's ego frame the boxes are in.

Edges are clipped at a near plane in front of the camera, so a box beside or behind the car never smears across the
image. Images are upscaled first (intrinsics scaled with them) so thin lines stay legible on small shard images.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from drivejepa.visualization.geometry import BOX_EDGES, box_corners
from drivejepa.visualization.scene import PRED_COLOR, category_color

NEAR = 0.3         # metres in front of the camera: edges are clipped here
MIN_DEPTH = 1.0    # boxes whose centre is nearer than this (or behind the camera) are not drawn


def project_edges(boxes: np.ndarray, intrinsics: np.ndarray, cam_to_key_ego: np.ndarray) -> list[np.ndarray]:
    """Per box (key ego frame), its visible edges as [E, 2, 2] pixel segments (edges behind the near plane are clipped
    or dropped; a box around or behind the camera gets none)."""
    ego_to_cam = np.linalg.inv(np.asarray(cam_to_key_ego, dtype=np.float64))
    K = np.asarray(intrinsics, dtype=np.float64)
    out = []
    for corners in box_corners(boxes) if len(boxes) else []:
        cam = corners @ ego_to_cam[:3, :3].T + ego_to_cam[:3, 3]          # [8, 3], z = depth
        segments = []
        if cam.mean(axis=0)[2] < MIN_DEPTH:
            out.append(np.zeros((0, 2, 2)))
            continue
        for a, b in BOX_EDGES:
            pa, pb = cam[a], cam[b]
            if pa[2] < NEAR and pb[2] < NEAR:
                continue
            if pa[2] < NEAR or pb[2] < NEAR:                                # clip at the near plane
                t = (NEAR - pa[2]) / (pb[2] - pa[2])
                clipped = pa + t * (pb - pa)
                pa, pb = (clipped, pb) if pa[2] < NEAR else (pa, clipped)
            uv = np.stack([pa, pb]) @ K.T
            segments.append(uv[:, :2] / uv[:, 2:3])
        out.append(np.array(segments).reshape(-1, 2, 2))
    return out


def draw_boxes_on_image(image: np.ndarray, intrinsics: np.ndarray, cam_to_key_ego: np.ndarray,
                        boxes: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                        decoded_boxes: Optional[np.ndarray] = None, min_width: int = 640,
                        line_width: int = 2) -> np.ndarray:
    """The camera image (uint8 [H, W, 3]) upscaled to at least ``min_width`` pixels wide, with annotated boxes in
    their category colours and decoded boxes in the prediction colour."""
    from PIL import Image, ImageDraw

    from drivejepa.data.frames import scale_intrinsics

    h, w = image.shape[:2]
    scale = max(1.0, min_width / w)
    size = (round(w * scale), round(h * scale))
    canvas = Image.fromarray(np.ascontiguousarray(image[..., :3])).resize(size, Image.BILINEAR)
    K = scale_intrinsics(intrinsics, (w, h), size)
    draw = ImageDraw.Draw(canvas)
    layers: Sequence = []
    if boxes is not None and len(boxes):
        lab = labels if labels is not None else np.zeros(len(boxes), dtype=np.int64)
        layers = [(boxes, [category_color(c) for c in lab])]
    if decoded_boxes is not None and len(decoded_boxes):
        layers = [*layers, (decoded_boxes, [PRED_COLOR] * len(decoded_boxes))]
    for group, colors in layers:
        for segments, color in zip(project_edges(group, K, cam_to_key_ego), colors):
            fill = tuple(int(round(c * 255)) for c in color)
            for (u0, v0), (u1, v1) in segments:
                draw.line([(u0, v0), (u1, v1)], fill=fill, width=line_width)
    return np.asarray(canvas)
