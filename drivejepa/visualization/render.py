"""Rendering of :class:`SceneLayers`: Open3D offscreen to numpy images, panels with captions, PNG/GIF/PLY writers,
and an interactive window where there is a display.

Only call :class:`OffscreenView` after :func:`drivejepa.visualization.headless.probe_rendering` said yes: a
missing Vulkan driver aborts the process instead of raising. The writers here need no Open3D, so ``.ply`` files are
written on machines that cannot render.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from drivejepa.io import atomic_path
from drivejepa.visualization.scene import (ACTION_PATH_COLOR, BACKGROUND, CANDIDATE_COLOR, EGO_COLOR, PRED_COLOR,
                                           TRUE_COLOR, TRUE_PATH_COLOR, SceneLayers, build_geometries,
                                           category_color)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CameraView:
    center: np.ndarray
    eye: np.ndarray
    up: np.ndarray
    fov: float = 50.0            # vertical field of view, degrees
    near: float = 0.5
    far: float = 500.0


def fit_camera(layers: SceneLayers, aspect: float, fov: float = 50.0, elevation: float = 60.0,
               margin: float = 8.0) -> CameraView:
    """A view from behind and above that frames what matters -- the ego, both paths and the boxes -- with
    ``margin`` metres of point cloud around them (the rest of the cloud may leave the image)."""
    xy = layers.extent_points()[:, :2]
    lo, hi = xy.min(axis=0) - margin, xy.max(axis=0) + margin
    center = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 0.0])
    radius = float(np.linalg.norm(hi - lo)) / 2
    half_v = np.radians(fov) / 2
    half = min(half_v, np.arctan(np.tan(half_v) * aspect))
    distance = radius / np.tan(half)
    el = np.radians(elevation)
    eye = center + distance * np.array([-np.cos(el), 0.0, np.sin(el)])
    return CameraView(center=center, eye=eye, up=np.array([0.0, 0.0, 1.0]), fov=fov,
                      near=max(0.1, distance - 2 * radius), far=distance + 4 * radius)


def _srgb_to_linear_inverse(color) -> list[float]:
    """The value to give Open3D's set_background so the image shows ``color``: it linearises the background as if
    it were sRGB, while unlit geometry colours pass through unchanged."""
    c = np.clip(np.asarray(color, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055).tolist()


def _material(kind: str, size: float):
    """Unlit materials keep the layer colours exact; lines need the unlitLine shader for their width to count."""
    from open3d.visualization import rendering

    m = rendering.MaterialRecord()
    if kind == "lines":
        m.shader, m.line_width = "unlitLine", float(size)
    else:
        m.shader, m.point_size = "defaultUnlit", float(size)
    return m


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Send the C++ engine's start-up chatter (Filament and Vulkan banners written straight to file descriptors 1
    and 2) to /dev/null while the renderer is created or destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


class OffscreenView:
    """One Open3D ``OffscreenRenderer`` reused for many images of the same size. Use it as a context manager and
    keep one alive at a time: Filament aborts the process when two renderers exist at once and one is destroyed,
    or when a renderer is destroyed while it still holds geometry."""

    def __init__(self, width: int = 800, height: int = 600):
        import open3d as o3d
        from open3d.visualization import rendering

        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
        self.width, self.height = int(width), int(height)
        self._rendering = rendering
        with _native_output_silenced():
            self._renderer = rendering.OffscreenRenderer(self.width, self.height)
        self._renderer.scene.view.set_post_processing(False)
        self._renderer.scene.set_background([*_srgb_to_linear_inverse(BACKGROUND), 1.0])
        self.view_matrix = np.eye(4)
        self.projection_matrix = np.eye(4)

    def __enter__(self) -> "OffscreenView":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.scene.clear_geometry()
            with _native_output_silenced():
                self._renderer = None

    def render(self, layers: SceneLayers, camera: Optional[CameraView] = None, point_size: float = 2.0,
               line_width: float = 3.0) -> np.ndarray:
        """Render one scene to an [H, W, 3] uint8 image. Geometry goes in before the camera is placed."""
        scene = self._renderer.scene
        scene.clear_geometry()
        for g in build_geometries(layers, point_size=point_size, line_width=line_width):
            scene.add_geometry(g.name, g.geometry, _material(g.kind, g.size))
        cam = camera or fit_camera(layers, self.width / self.height)
        scene.camera.look_at(cam.center.tolist(), cam.eye.tolist(), cam.up.tolist())
        scene.camera.set_projection(cam.fov, self.width / self.height, cam.near, cam.far,
                                    self._rendering.Camera.FovType.Vertical)
        self.view_matrix = np.asarray(scene.camera.get_view_matrix(), dtype=np.float64)
        self.projection_matrix = np.asarray(scene.camera.get_projection_matrix(), dtype=np.float64)
        return np.array(self._renderer.render_to_image(), dtype=np.uint8)[..., :3]

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (u right, v down) of [N, 3] points under the last rendered camera, and whether each is
        in front of the camera and inside the image."""
        p = np.concatenate([np.asarray(points, dtype=np.float64)[:, :3], np.ones((len(points), 1))], axis=1)
        clip = p @ (self.projection_matrix @ self.view_matrix).T
        w = clip[:, 3:4]
        ndc = clip[:, :3] / np.where(np.abs(w) < 1e-9, 1e-9, w)
        uv = np.stack([(ndc[:, 0] + 1) / 2 * self.width, (1 - ndc[:, 1]) / 2 * self.height], axis=1)
        inside = (w[:, 0] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < self.width) & (uv[:, 1] >= 0) & (uv[:, 1] < self.height)
        return uv, inside


# ----------------------------------------------------------------------------------------------------------------
# Captions, legends and panels (PIL)
# ----------------------------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:                               # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _rgb(color) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in color)


def legend_entries(layers: SceneLayers, class_names: Sequence[str] = ()) -> list[tuple[str, tuple]]:
    """(label, colour) for every layer present in ``layers``, categories included."""
    entries = []
    if layers.pred_points is not None and len(layers.pred_points):
        entries.append(("decoded prediction", PRED_COLOR))
    if layers.true_points is not None and len(layers.true_points):
        entries.append(("true lidar", TRUE_COLOR))
    if layers.ego is not None:
        entries.append(("ego", EGO_COLOR))
    if layers.true_path is not None and len(layers.true_path) >= 2:
        entries.append(("true path", TRUE_PATH_COLOR))
    if layers.action_path is not None and len(layers.action_path) >= 2:
        entries.append(("action path", ACTION_PATH_COLOR))
    if layers.candidate_paths is not None and len(layers.candidate_paths):
        entries.append(("candidates", CANDIDATE_COLOR))
    if layers.boxes is not None and layers.labels is not None:
        for label in sorted({int(c) for c in layers.labels}):
            name = class_names[label] if label < len(class_names) else f"class {label}"
            entries.append((name, category_color(label)))
    return entries


def caption(image: np.ndarray, title: str, legend: Sequence[tuple[str, tuple]] = (), font_size: int = 16) -> np.ndarray:
    """Add a title bar above and a colour legend below an image."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    font = _font(font_size)
    pad = 6
    line_h = font_size + 2 * pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Wrap the title at spaces to the image width.
    title_lines = [""]
    for word in title.split(" "):
        candidate = f"{title_lines[-1]} {word}" if title_lines[-1] else word
        if title_lines[-1] and probe.textlength(candidate, font=font) > w - 2 * pad:
            title_lines.append(word)
        else:
            title_lines[-1] = candidate
    title_h = font_size * len(title_lines) + 2 * pad + 2 * (len(title_lines) - 1)
    # Lay the legend out in rows that fit the width.
    rows: list[list[tuple[str, tuple, int]]] = [[]]
    x = pad
    for label, color in legend:
        width = font_size + 4 + int(probe.textlength(label, font=font)) + 3 * pad
        if rows[-1] and x + width > w:
            rows.append([])
            x = pad
        rows[-1].append((label, color, x))
        x += width
    legend_h = line_h * len(rows) if legend else 0
    canvas = Image.new("RGB", (w, h + title_h + legend_h), _rgb(BACKGROUND))
    canvas.paste(Image.fromarray(np.ascontiguousarray(image[..., :3])), (0, title_h))
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((pad, pad), "\n".join(title_lines), fill=(255, 255, 255), font=font, spacing=2)
    for r, row in enumerate(rows if legend else []):
        y = h + title_h + r * line_h + pad
        for label, color, x0 in row:
            draw.rectangle([x0, y + 2, x0 + font_size - 2, y + font_size], fill=_rgb(color))
            draw.text((x0 + font_size + 4, y), label, fill=(230, 230, 230), font=font)
    return np.asarray(canvas)


def panels(images: Sequence[np.ndarray], columns: Optional[int] = None, gap: int = 4) -> np.ndarray:
    """Place images on a grid, left to right then top to bottom; each row is as tall as its tallest image and
    each column as wide as its widest."""
    columns = columns or len(images)
    rows = [list(images[i:i + columns]) for i in range(0, len(images), columns)]
    widths = [max(row[c].shape[1] for row in rows if c < len(row)) for c in range(columns)]
    heights = [max(im.shape[0] for im in row) for row in rows]
    out = np.empty((sum(heights) + gap * (len(rows) - 1), sum(widths) + gap * (columns - 1), 3), dtype=np.uint8)
    out[:] = np.array(_rgb(BACKGROUND), dtype=np.uint8) // 2
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for c, im in enumerate(row):
            out[y:y + im.shape[0], x:x + im.shape[1]] = im[..., :3]
            x += widths[c] + gap
        y += h + gap
    return out


# ----------------------------------------------------------------------------------------------------------------
# Writers (atomic; no Open3D needed)
# ----------------------------------------------------------------------------------------------------------------
def save_png(path: str | Path, image: np.ndarray) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image[..., :3])).save(tmp, format="PNG")
    return Path(path)


def save_gif(path: str | Path, frames: Sequence[np.ndarray], seconds_per_frame: float = 0.6) -> Path:
    """An animated GIF that loops forever; frames are padded to a common size."""
    from PIL import Image

    size = (max(f.shape[1] for f in frames), max(f.shape[0] for f in frames))
    images = []
    for f in frames:
        im = Image.new("RGB", size, _rgb(BACKGROUND))
        im.paste(Image.fromarray(np.ascontiguousarray(f[..., :3])), (0, 0))
        images.append(im.quantize(colors=255, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(seconds_per_frame * 1000), loop=0, disposal=1)
    return Path(path)


def write_ply(path: str | Path, points: np.ndarray, color=PRED_COLOR) -> Path:
    """A binary little-endian PLY of [N, >=3] points (x, y, z float32) with one RGB colour, readable by Open3D,
    MeshLab and CloudCompare."""
    points = np.asarray(points, dtype=np.float32)[:, :3]
    rgb = np.array(_rgb(color), dtype=np.uint8)
    record = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    data = np.empty(len(points), dtype=record)
    data["x"], data["y"], data["z"] = points[:, 0], points[:, 1], points[:, 2]
    data["red"], data["green"], data["blue"] = rgb
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(points)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(data.tobytes())
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Interactive window
# ----------------------------------------------------------------------------------------------------------------
def show_interactive(steps: Sequence[SceneLayers], title: str = "drivejepa visualize") -> None:
    """Open the scenes in Open3D's viewer as an animation (one time step per scene; the viewer's play button steps
    through them), with the colours and line widths of the PNGs. Returns when the window is closed."""
    import open3d as o3d

    items = []
    for k, layers in enumerate(steps):
        for g in build_geometries(layers):
            items.append({"name": f"{g.name}_{k}", "geometry": g.geometry, "material": _material(g.kind, g.size),
                          "time": float(k)})
    cam = fit_camera(steps[0], 4 / 3)
    o3d.visualization.draw(items, title=title, width=1280, height=960, bg_color=(*BACKGROUND, 1.0),
                           show_skybox=False, lookat=cam.center, eye=cam.eye, up=cam.up, field_of_view=cam.fov,
                           point_size=3, line_width=3, animation_time_step=1.0,
                           animation_duration=float(len(steps)))
