"""The six cameras: nuScenes-like intrinsics and mounts, images rasterised from depth-sorted world polygons.

Ground surfaces are flat (z = 0) and drawn first, in the same order as the map raster the lidar reads materials from;
box faces facing the camera are then painted far to near (long facades are split into short pieces so the order
holds). Every surface has a known material colour, shaded by its angle to the light, so a lidar point projected with
the devkit's ``map_pointcloud_to_image`` lands on a pixel of the surface it hit.
"""
from __future__ import annotations

import functools
import io

import cv2
import numpy as np
from PIL import Image

from drivejepa.data.synth.materials import GRASS, MATERIALS
from drivejepa.data.synth.world import World

# name: (translation in the ego frame, yaw in degrees, focal length in pixels at 1600 px width)
CAMERAS = {
    "CAM_FRONT": ((1.70, 0.016, 1.51), 0.0, 1266.4),
    "CAM_FRONT_RIGHT": ((1.55, -0.49, 1.49), -55.0, 1260.8),
    "CAM_BACK_RIGHT": ((1.03, -0.48, 1.55), -110.0, 1259.5),
    "CAM_BACK": ((0.03, 0.0, 1.57), 180.0, 809.2),
    "CAM_BACK_LEFT": ((1.04, 0.48, 1.56), 110.0, 1256.7),
    "CAM_FRONT_LEFT": ((1.52, 0.49, 1.51), 55.0, 1272.6),
}
LIDAR_SPIN_US = 50_000            # one turn of the lidar (20 Hz)
TRIGGER_JITTER_US = 2_000         # each camera frame fires up to this much off its nominal time
NEAR = 0.3
FAR = 180.0
BASE = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])   # camera (x right, y down, z fwd) -> ego
JPEG_QUALITY = 90
STYLE = {   # brightness, noise std, sky top, sky horizon
    "day": (1.0, 2.0, (110, 160, 220), (190, 215, 240)),
    "night": (0.22, 5.0, (4, 6, 16), (22, 26, 40)),
    "rain": (0.7, 7.0, (120, 124, 130), (160, 163, 168)),
}
FACES = np.array([[4, 6, 7, 5], [0, 2, 3, 1], [2, 6, 7, 3], [0, 4, 5, 1], [1, 5, 7, 3]])   # +x -x +y -y +z
NORMALS = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0]])
CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
SPLIT = 5.0                       # metres: longer faces are painted in pieces
SHIFT = 4                         # fractional bits of polygon vertices (sub-pixel accuracy)


def intrinsics(name: str, width: int, height: int) -> np.ndarray:
    f = CAMERAS[name][2] * width / 1600.0
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def trigger_offset_us(name: str) -> int:
    """When camera ``name`` fires, in microseconds from the lidar's time stamp. The cameras fire one after another
    as the spinning lidar sweeps past them (clockwise, from the front left to the back left over about 300 degrees of
    one 50 ms turn): from 32 ms before the lidar's stamp (CAM_FRONT_LEFT) to 10 ms after it (CAM_BACK_LEFT), as
    nuScenes' cameras fire up to ~40 ms from the lidar. Each frame adds up to TRIGGER_JITTER_US of its own."""
    turned = ((CAMERAS[name][1] - CAMERAS["CAM_BACK_LEFT"][1]) % 360.0) / 360.0
    return int(round(10_000 - LIDAR_SPIN_US * turned))


def rotation(name: str) -> np.ndarray:
    """Camera-to-ego rotation matrix."""
    a = np.radians(CAMERAS[name][1])
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return rz @ BASE


def camera_to_ego(name: str) -> np.ndarray:
    """[4, 4] camera frame -> ego frame of the synthetic rig's camera ``name`` (its calibrated_sensor record)."""
    out = np.eye(4)
    out[:3, :3] = rotation(name)
    out[:3, 3] = CAMERAS[name][0]
    return out


@functools.lru_cache(maxsize=16)
def _sky(width: int, height: int, cy: float, weather: str) -> np.ndarray:
    _, _, top, horizon = STYLE[weather]
    rows = np.clip(np.arange(height) / max(cy, 1.0), 0, 1)[:, None]
    col = (1 - rows) * np.array(top) + rows * np.array(horizon)
    return np.ascontiguousarray(np.broadcast_to(col[:, None, :], (height, width, 3)).astype(np.uint8))


def _clip_near(p: np.ndarray):
    """Clip a polygon [N, 3] in camera coordinates to z >= NEAR (Sutherland-Hodgman, one plane)."""
    inside = p[:, 2] >= NEAR
    if inside.all():
        return p
    if not inside.any():
        return None
    q = np.roll(p, -1, axis=0)
    cross = inside != np.roll(inside, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (NEAR - p[:, 2]) / (q[:, 2] - p[:, 2])
        ip = p + a[:, None] * (q - p)
    stacked = np.stack([p, ip], axis=1)
    keep = np.stack([inside, cross], axis=1)
    out = stacked[keep]
    return out if len(out) >= 3 else None


class Renderer:
    """Draws one scene's camera images; holds per-scene precomputations (polygon bounds, noise banks)."""

    def __init__(self, world: World, width: int, height: int, rng: np.random.Generator):
        self.world = world
        self.W, self.H = width, height
        self.ground = world.ground
        cents, radii = [], []
        for _, _, poly in world.ground:
            c = poly.mean(axis=0)
            cents.append(c)
            radii.append(float(np.max(np.hypot(*(poly - c).T))))
        self.g_centre = np.array(cents).reshape(-1, 2)
        self.brightness = STYLE[world.weather][0]
        self.ground3d = [np.concatenate([poly, np.zeros((len(poly), 1))], axis=1) for _, _, poly in world.ground]
        self.ground_colour = [tuple(int(v) for v in np.clip(np.array(rgb) * self.brightness, 0, 255))
                              for rgb in [MATERIALS[GRASS].colours[0]] + [g[1] for g in world.ground]]
        self.g_radius = np.array(radii)
        self.brightness, sigma, _, _ = STYLE[world.weather]
        bank = rng.normal(0.0, sigma, (height + 16, width + 16, 3))
        self.noise_pos = np.clip(bank, 0, 255).astype(np.uint8)
        self.noise_neg = np.clip(-bank, 0, 255).astype(np.uint8)
        self.rng = rng

    def render(self, name: str, t: float, rng: np.random.Generator = None) -> np.ndarray:
        """Camera ``name`` at scene time ``t``; ``rng`` draws this image's noise (default: the bank's stream)."""
        rng = self.rng if rng is None else rng
        world = self.world
        W, H = self.W, self.H
        K = intrinsics(name, W, H)
        exy, eyaw, _ = world.ego_pose(t)
        ce, se = np.cos(eyaw), np.sin(eyaw)
        rz = np.array([[ce, -se, 0.0], [se, ce, 0.0], [0.0, 0.0, 1.0]])
        tr = np.array(CAMERAS[name][0])
        cam_pos = np.array([exy[0], exy[1], 0.0]) + rz @ tr
        r_wc = rz @ rotation(name)                   # camera -> world
        r_cw = r_wc.T
        img = _sky(W, H, K[1, 2], world.weather).copy()
        fk = np.array([K[0, 0], K[1, 1]])
        ck = np.array([K[0, 2], K[1, 2]])
        scale = float(1 << SHIFT)

        def draw_all(polys: list, colours: list) -> None:
            """Transform every polygon at once, clip the few that cross the near plane, fill in list order."""
            if not polys:
                return
            sizes = np.array([len(p) for p in polys])
            pc = (np.concatenate(polys) - cam_pos) @ r_cw.T
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            zmin = np.minimum.reduceat(pc[:, 2], bounds[:-1])
            zmax = np.maximum.reduceat(pc[:, 2], bounds[:-1])
            with np.errstate(divide="ignore", invalid="ignore"):
                uv = np.clip(pc[:, :2] / pc[:, 2:3] * fk + ck, -1e5, 1e5)
            pix = np.round(uv * scale).astype(np.int32)
            for i, colour in enumerate(colours):
                if zmax[i] < NEAR:
                    continue
                if zmin[i] >= NEAR:
                    pts = pix[bounds[i]:bounds[i + 1]]
                else:
                    clipped = _clip_near(pc[bounds[i]:bounds[i + 1]])
                    if clipped is None:
                        continue
                    pts = np.round(np.clip(clipped[:, :2] / clipped[:, 2:3] * fk + ck, -1e5, 1e5)
                                   * scale).astype(np.int32)
                cv2.fillPoly(img, [pts], colour, lineType=cv2.LINE_8, shift=SHIFT)

        # ground: a grass plane, then every surface polygon near enough to matter, in the map raster's order
        half = 2000.0
        grass = np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]]) \
            + np.array([cam_pos[0], cam_pos[1], 0.0])
        fwd = r_wc[:, 2]
        rel = self.g_centre - cam_pos[:2]
        dist = np.hypot(rel[:, 0], rel[:, 1])
        depth = rel @ fwd[:2] / max(np.hypot(*fwd[:2]), 1e-6)
        small = self.g_radius < 3.0
        keep = (dist - self.g_radius < FAR) & (depth + self.g_radius > NEAR) & ~(small & (dist > 70.0))
        polys = [grass] + [self.ground3d[i] for i in np.flatnonzero(keep)]
        colours = [self.ground_colour[0]] + [self.ground_colour[i + 1] for i in np.flatnonzero(keep)]
        draw_all(polys, colours)

        # boxes: faces towards the camera, far to near; long faces in pieces of at most SPLIT metres
        centre, hext, yaw, mats, cols, agent = world.boxes(t)
        rel = centre - cam_pos
        rad = np.linalg.norm(hext, axis=1)
        zc = rel @ fwd
        sel = np.flatnonzero((np.linalg.norm(rel[:, :2], axis=1) - rad < FAR) & (zc + rad > NEAR))
        if len(sel):
            c, s = np.cos(yaw[sel]), np.sin(yaw[sel])
            rb = np.zeros((len(sel), 3, 3))
            rb[:, 0, 0], rb[:, 0, 1], rb[:, 1, 0], rb[:, 1, 1], rb[:, 2, 2] = c, -s, s, c, 1.0
            corners = centre[sel, None] + np.einsum("bij,bkj->bki", rb, CORNERS[None] * hext[sel, None])
            quads = corners[:, FACES]                                            # [B, 5, 4, 3]
            wide = hext[sel, 1] > hext[sel, 0]
            quads[wide, 4] = quads[wide, 4][:, [0, 3, 2, 1]]                     # roofs: split along the long side
            normals = np.einsum("bij,fj->bfi", rb, NORMALS)                       # [B, 5, 3]
            facing = np.einsum("bfi,bfi->bf", normals, quads.mean(axis=2) - cam_pos) < 0
            bi, fi = np.nonzero(facing)
            q = quads[bi, fi]                                                     # [F, 4, 3]
            shade = 0.55 + 0.45 * np.maximum(0.0, normals[bi, fi] @ world.sun)
            colour = np.clip(cols[sel][bi] * (shade * self.brightness)[:, None], 0, 255)
            span = np.linalg.norm(q[:, 1] - q[:, 0], axis=1)
            pieces = np.maximum(1, np.ceil(span / SPLIT)).astype(np.int64)
            rep = np.repeat(np.arange(len(q)), pieces)
            k = np.arange(len(rep)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            u0 = (k / pieces[rep])[:, None]
            u1 = ((k + 1) / pieces[rep])[:, None]
            qa, qb, qc, qd = q[rep, 0], q[rep, 1], q[rep, 2], q[rep, 3]
            piece = np.stack([qa + u0 * (qb - qa), qa + u1 * (qb - qa), qd + u1 * (qc - qd), qd + u0 * (qc - qd)], 1)
            depth = np.linalg.norm(piece.mean(axis=1) - cam_pos, axis=1)
            order = np.argsort(-depth, kind="stable")
            draw_all([piece[i] for i in order], [tuple(int(v) for v in colour[rep[i]]) for i in order])

        if world.weather == "rain":
            self._streaks(img, rng)
        dy, dx = rng.integers(0, 16, 2)
        img = cv2.add(img, self.noise_pos[dy:dy + H, dx:dx + W])
        img = cv2.subtract(img, self.noise_neg[dy:dy + H, dx:dx + W])
        return img

    def _streaks(self, img: np.ndarray, rng: np.random.Generator) -> None:
        n = 120
        x = rng.uniform(0, self.W, n)
        y = rng.uniform(0, self.H, n)
        ln = rng.uniform(0.02, 0.06, n) * self.H
        for i in range(n):
            cv2.line(img, (int(x[i]), int(y[i])), (int(x[i] + 0.15 * ln[i]), int(y[i] + ln[i])), (175, 178, 185), 1)


def encode_jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
