"""What one view shows, as plain numpy (:class:`SceneLayers`), and its Open3D geometry.

Every layer is in one frame, the "view frame" (the ego frame of the start key frame in ``visualize``), so a GIF over
the horizon keeps a still camera while the ego drives through it. Colours are fixed so that a person (and a test)
can tell the layers apart: decoded prediction orange, true lidar grey, boxes by category, ego white, true future path
green, action-implied path red.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from drivejepa.visualization.geometry import BOX_EDGES, box_corners

BACKGROUND = (0.07, 0.07, 0.10)
PRED_COLOR = (1.0, 0.55, 0.0)
TRUE_COLOR = (0.72, 0.72, 0.76)
EGO_COLOR = (1.0, 1.0, 1.0)
TRUE_PATH_COLOR = (0.15, 0.9, 0.15)
ACTION_PATH_COLOR = (1.0, 0.1, 0.1)
CANDIDATE_COLOR = (0.35, 0.6, 1.0)
# Indexed like drivejepa.data.shards.CLASSES (car, truck, bus, trailer, construction_vehicle, pedestrian,
# motorcycle, bicycle, traffic_cone, barrier).
CATEGORY_COLORS = (
    (0.0, 0.8, 1.0), (0.6, 0.35, 1.0), (0.2, 0.35, 1.0), (0.65, 0.45, 0.25), (0.9, 0.9, 0.2),
    (1.0, 0.3, 0.75), (0.0, 0.65, 0.45), (0.6, 1.0, 0.3), (1.0, 0.7, 0.6), (0.55, 0.55, 0.35),
)
EGO_SIZE = (4.1, 1.8, 1.6)        # length, width, height (metres) of the drawn ego vehicle
EGO_REAR_AXLE_OFFSET = 1.3        # the ego frame's origin is near the rear axle: the body centre is ahead of it


def category_color(label: int) -> tuple[float, float, float]:
    return CATEGORY_COLORS[int(label) % len(CATEGORY_COLORS)]


@dataclasses.dataclass
class SceneLayers:
    """One scene to draw. Points [N, >=3], boxes [B, 9], labels [B], paths [K, >=2] (x, y first), ego (x, y, yaw)."""
    true_points: Optional[np.ndarray] = None
    pred_points: Optional[np.ndarray] = None
    boxes: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    decoded_boxes: Optional[np.ndarray] = None
    ego: Optional[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    true_path: Optional[np.ndarray] = None
    action_path: Optional[np.ndarray] = None
    candidate_paths: Optional[np.ndarray] = None      # [N, K, >=2]: a planner's candidates, drawn thin
    title: str = ""

    def extent_points(self, box_radius: float = 20.0) -> np.ndarray:
        """Points the camera should keep in view: the view frame's origin, the ego, the paths, and the boxes within
        ``box_radius`` metres of them (far boxes would shrink everything that matters)."""
        parts = [np.zeros((1, 3))]
        if self.ego is not None:
            parts.append(ego_corners(self.ego).reshape(-1, 3))
        for path in (self.true_path, self.action_path):
            if path is not None and len(path):
                parts.append(_path3d(path))
        anchors = np.concatenate(parts)[:, :2]
        for boxes in (self.boxes, self.decoded_boxes):
            if boxes is not None and len(boxes):
                d = np.linalg.norm(np.asarray(boxes)[:, None, :2] - anchors[None], axis=-1).min(axis=1)
                near = np.asarray(boxes)[d <= box_radius]
                if len(near):
                    parts.append(box_corners(near).reshape(-1, 3))
        return np.concatenate(parts)


def ego_box(ego: tuple[float, float, float]) -> np.ndarray:
    """The ego vehicle as a [1, 9] box standing on the ground at pose (x, y, yaw)."""
    x, y, yaw = ego
    length, width, height = EGO_SIZE
    cx = x + np.cos(yaw) * EGO_REAR_AXLE_OFFSET
    cy = y + np.sin(yaw) * EGO_REAR_AXLE_OFFSET
    return np.array([[cx, cy, height / 2, width, length, height, yaw, 0.0, 0.0]])


def ego_corners(ego: tuple[float, float, float]) -> np.ndarray:
    return box_corners(ego_box(ego))[0]


def _path3d(path: np.ndarray, z: float = 0.15) -> np.ndarray:
    """A path's (x, y) columns (extra columns such as yaw are ignored) lifted just above the ground."""
    path = np.asarray(path, dtype=np.float64)[:, :2]
    return np.concatenate([path, np.full((len(path), 1), z)], axis=1)


@dataclasses.dataclass
class Geometry:
    """An Open3D geometry with how to draw it: kind 'points' (size = point size), 'lines' (size = line width) or
    'mesh'."""
    name: str
    geometry: Any
    kind: str
    size: float = 1.0


def _point_cloud(points: np.ndarray, color) -> Any:
    import open3d as o3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)[:, :3]))
    pc.paint_uniform_color(color)
    return pc


def _line_set(vertices: np.ndarray, edges: np.ndarray, colors: np.ndarray) -> Any:
    """An Open3D LineSet of the edges that have a length; None when none has. Open3D's offscreen renderer segfaults
    on a line set whose points all coincide: a standing plan is one, and ``drive --render`` died at the first key
    frame where the planner stood still."""
    import open3d as o3d

    vertices = np.asarray(vertices, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    keep = np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=-1) > 1e-6
    if not keep.any():
        return None
    ls = o3d.geometry.LineSet(o3d.utility.Vector3dVector(vertices),
                              o3d.utility.Vector2iVector(edges[keep].astype(np.int32)))
    ls.colors = o3d.utility.Vector3dVector(np.asarray(colors, dtype=np.float64)[keep])
    return ls


def boxes_line_set(boxes: np.ndarray, colors: np.ndarray) -> Any:
    """Box outlines plus a cross on the front face (so the heading is visible), one colour per box."""
    corners = box_corners(boxes)                                  # [B, 8, 3]
    front = np.array([[0, 5], [1, 4]])                            # diagonals of the front face
    edges = np.concatenate([BOX_EDGES, front])
    all_edges = (np.arange(len(boxes))[:, None, None] * 8 + edges[None]).reshape(-1, 2)
    edge_colors = np.repeat(np.asarray(colors, dtype=np.float64), len(edges), axis=0)
    return _line_set(corners.reshape(-1, 3), all_edges, edge_colors)


def _ego_mesh(ego: tuple[float, float, float]) -> Any:
    import open3d as o3d

    length, width, height = EGO_SIZE
    mesh = o3d.geometry.TriangleMesh.create_box(length, width, height)
    mesh.translate((-length / 2, -width / 2, -height / 2))
    box = ego_box(ego)[0]
    mesh.rotate(o3d.geometry.get_rotation_matrix_from_xyz((0.0, 0.0, box[6])), center=(0.0, 0.0, 0.0))
    mesh.translate(box[:3])
    mesh.paint_uniform_color(EGO_COLOR)
    return mesh


def _polyline(path: np.ndarray, color) -> Any:
    pts = _path3d(path)
    edges = np.stack([np.arange(len(pts) - 1), np.arange(1, len(pts))], axis=1)
    return _line_set(pts, edges, np.tile(color, (len(edges), 1)))


def build_geometries(layers: SceneLayers, point_size: float = 2.0, line_width: float = 3.0) -> list[Geometry]:
    """Open3D geometry for every non-empty layer, in drawing order (later layers on top); a line layer with no edge
    of any length (a standing plan) is left out."""
    out: list[Geometry] = []
    if layers.true_points is not None and len(layers.true_points):
        out.append(Geometry("true_points", _point_cloud(layers.true_points, TRUE_COLOR), "points", point_size))
    if layers.pred_points is not None and len(layers.pred_points):
        out.append(Geometry("pred_points", _point_cloud(layers.pred_points, PRED_COLOR), "points",
                            point_size + 1.0))
    if layers.boxes is not None and len(layers.boxes):
        labels = layers.labels if layers.labels is not None else np.zeros(len(layers.boxes), dtype=np.int64)
        colors = np.array([category_color(c) for c in labels])
        out.append(Geometry("boxes", boxes_line_set(layers.boxes, colors), "lines", line_width))
    if layers.decoded_boxes is not None and len(layers.decoded_boxes):
        colors = np.tile(PRED_COLOR, (len(layers.decoded_boxes), 1))
        out.append(Geometry("decoded_boxes", boxes_line_set(layers.decoded_boxes, colors), "lines", line_width))
    if layers.candidate_paths is not None and len(layers.candidate_paths):
        paths = [np.asarray(p) for p in layers.candidate_paths if len(p) >= 2]
        if paths:
            pts = np.concatenate([_path3d(p, z=0.1) for p in paths])
            starts = np.cumsum([0] + [len(p) for p in paths[:-1]])
            edges = np.concatenate([np.stack([s + np.arange(len(p) - 1), s + np.arange(1, len(p))], axis=1)
                                    for s, p in zip(starts, paths)])
            out.append(Geometry("candidates", _line_set(pts, edges, np.tile(CANDIDATE_COLOR, (len(edges), 1))),
                                "lines", max(1.0, line_width - 2.0)))
    for name, path, color in (("true_path", layers.true_path, TRUE_PATH_COLOR),
                              ("action_path", layers.action_path, ACTION_PATH_COLOR)):
        if path is not None and len(path) >= 2:
            out.append(Geometry(name, _polyline(path, color), "lines", line_width + 1.0))
            out.append(Geometry(name + "_steps", _point_cloud(_path3d(path), color), "points", point_size + 5.0))
    if layers.ego is not None:
        out.append(Geometry("ego", _ego_mesh(layers.ego), "mesh"))
    return [g for g in out if g.geometry is not None]
