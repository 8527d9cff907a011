"""Plane geometry of the synthetic roads: polylines with arc length, strips, curves and multi-lane roads."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

class Path:
    """A polyline with arc length; ``at(s)`` interpolates position and heading."""

    def __init__(self, xy: np.ndarray):
        xy = np.asarray(xy, dtype=np.float64)
        seg = np.diff(xy, axis=0)
        d = np.hypot(seg[:, 0], seg[:, 1])
        keep = np.concatenate([[True], d > 1e-6])
        xy = xy[keep]
        seg = np.diff(xy, axis=0)
        d = np.hypot(seg[:, 0], seg[:, 1])
        self.xy = xy
        self.s = np.concatenate([[0.0], np.cumsum(d)])
        h = np.unwrap(np.arctan2(seg[:, 1], seg[:, 0]))
        self.heading = np.concatenate([[h[0]], (h[:-1] + h[1:]) / 2, [h[-1]]]) if len(h) > 1 else np.repeat(h, 2)
        dh = np.diff(self.heading)
        ds = np.maximum(np.diff(self.s), 1e-6)
        k = np.abs(dh / ds)
        self.curvature = np.concatenate([k, k[-1:]])

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def at(self, s):
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        h = np.interp(s, self.s, self.heading)
        return x, y, h

    def offset(self, off) -> "Path":
        n = np.stack([-np.sin(self.heading), np.cos(self.heading)], axis=1)
        return Path(self.xy + np.asarray(off, dtype=np.float64).reshape(-1, 1) * n)

    def piece(self, s0: float, s1: float, step: float = 2.0) -> np.ndarray:
        s = np.linspace(s0, s1, max(2, int(np.ceil(abs(s1 - s0) / step)) + 1))
        x, y, _ = self.at(s)
        return np.stack([x, y], axis=1)

    def reversed(self) -> "Path":
        return Path(self.xy[::-1])

    def project(self, xy) -> tuple[float, float]:
        """Arc length of the point of the path nearest to ``xy`` and the signed lateral offset there (left positive)."""
        a, b = self.xy[:-1], self.xy[1:]
        seg = b - a
        length2 = np.maximum(np.sum(seg * seg, axis=1), 1e-12)
        u = np.clip(np.sum((np.asarray(xy, dtype=np.float64) - a) * seg, axis=1) / length2, 0.0, 1.0)
        foot = a + u[:, None] * seg
        d = np.hypot(*(np.asarray(xy) - foot).T)
        i = int(np.argmin(d))
        cross = seg[i, 0] * (xy[1] - a[i, 1]) - seg[i, 1] * (xy[0] - a[i, 0])
        return float(self.s[i] + u[i] * np.sqrt(length2[i])), float(np.copysign(d[i], cross))


def strip(path: Path, s0: float, s1: float, a: float, b: float, step: float = 2.0) -> np.ndarray:
    """Polygon covering lateral offsets [a, b] (left positive) of ``path`` between arc lengths s0 and s1."""
    s = np.linspace(s0, s1, max(2, int(np.ceil((s1 - s0) / step)) + 1))
    x, y, h = path.at(s)
    n = np.stack([-np.sin(h), np.cos(h)], axis=1)
    p = np.stack([x, y], axis=1)
    return np.concatenate([p + a * n, (p + b * n)[::-1]])


def bezier(p0, h0, p1, h1, n: int = 24) -> np.ndarray:
    """Cubic Bezier from p0 (heading h0) to p1 (heading h1); handles a third of the chord long."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    c = np.linalg.norm(p1 - p0) * 0.45
    q0 = p0 + c * np.array([np.cos(h0), np.sin(h0)])
    q1 = p1 - c * np.array([np.cos(h1), np.sin(h1)])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * q0 + 3 * (1 - t) * t ** 2 * q1 + t ** 3 * p1


def join(a: Path, sa: float, b: Path, sb: float, tail: float) -> Path:
    """Follow ``a`` up to arc length sa, curve onto ``b`` at sb, follow ``b`` for ``tail`` metres."""
    xa, ya, ha = a.at(sa)
    xb, yb, hb = b.at(sb)
    return Path(np.concatenate([a.piece(0, sa, 1.0), bezier((xa, ya), ha, (xb, yb), hb)[1:-1],
                                b.piece(sb, min(b.length, sb + tail), 1.0)]))


def curvy_centerline(rng, length, max_curv, straight: Optional[tuple[float, float]] = None, step=2.0) -> Path:
    s = np.arange(0, length + step, step)
    k = np.zeros_like(s)
    for _ in range(2):
        period = rng.uniform(150, 400)
        k += rng.uniform(0.3, 0.5) * max_curv * np.sin(2 * np.pi * s / period + rng.uniform(0, 2 * np.pi))
    if straight is not None:
        z0, z1 = straight
        ramp = np.clip(np.minimum(s - (z0 - 30), (z1 + 30) - s) / 30, 0, 1)
        k *= 1 - ramp
    h = np.cumsum(k) * step
    h -= h[0]
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(np.stack([np.cos(h), np.sin(h)], 1)[:-1] * step, axis=0)])
    return Path(xy)


@dataclasses.dataclass
class Road:
    center: Path
    lanes: int                          # lanes per direction
    lane_w: float
    edge_w: float                       # parking strip / shoulder each side (asphalt)
    sidewalk_w: float
    gaps: list                          # (s0, s1) where sidewalks are cut (crossing roads)
    mark_gaps: list                     # (s0, s1) where lane markings stop (intersection box + crosswalks)
    median: bool = False

    @property
    def half(self) -> float:
        return self.lanes * self.lane_w + self.edge_w

    def lane(self, direction: int, i: int) -> Path:
        """Centre line of lane i (0 = next to the centre) in travel direction (+1 along the road, -1 against)."""
        p = self.center.offset(-(i + 0.5) * self.lane_w * direction)
        return p if direction > 0 else p.reversed()


def intervals(s0: float, s1: float, gaps) -> list[tuple[float, float]]:
    out = [(s0, s1)]
    for g0, g1 in gaps:
        nxt = []
        for a, b in out:
            if g1 <= a or g0 >= b:
                nxt.append((a, b))
                continue
            if g0 > a:
                nxt.append((a, g0))
            if g1 < b:
                nxt.append((g1, b))
        out = nxt
    return [(a, b) for a, b in out if b - a > 0.5]
