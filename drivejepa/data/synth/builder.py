"""What a layout places in a scene's local frame: ground polygons, structures, parked objects and movers."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from drivejepa.data.synth.geometry import Path, Road, intervals, strip
from drivejepa.data.synth.materials import (AGENT_TYPES, BUILDING, MARKING, MATERIALS, PEDESTRIAN, POLE, ROAD, SIDEWALK,
                                             VEHICLE)

@dataclasses.dataclass
class Mover:
    """Something that moves along a path: a vehicle driven by IDM or a scripted pedestrian."""
    kind: str                           # key of AGENT_TYPES
    size: tuple[float, float, float]    # w, l, h
    colour: tuple[int, int, int]
    path: Path
    s0: float
    v_init: float
    v_desired: float
    walker: bool = False
    t_start: float = 0.0                # walkers stand until then
    stop_lines: list = dataclasses.field(default_factory=list)    # (s, signal group)
    schedule: list = dataclasses.field(default_factory=list)      # (t0, t1, v_desired) overrides
    accel: float = 1.5
    ego: bool = False
    lane_width: Optional[float] = None  # metres: the width of the lane the path runs in (the ego's: what the closed
                                        # loop's out-of-lane time and lateral fault read; None for the others)


@dataclasses.dataclass
class Static:
    """An annotated object that does not move (parked car, barrier, cone)."""
    kind: str
    size: tuple[float, float, float]
    colour: tuple[int, int, int]
    x: float
    y: float
    yaw: float
    parked: bool = False


class Builder:
    def __init__(self, rng: np.random.Generator, duration: float, spec: dict):
        self.rng = rng
        self.D = duration
        self.spec = spec
        self.ground: list = []             # (material, polygon)
        self.structures: list = []         # (cx, cy, cz, l, w, h, yaw, material, rgb)
        self.statics: list[Static] = []
        self.movers: list[Mover] = []
        self.signals: dict[str, list] = {}
        self.roads: list[Road] = []
        self.intersection: Optional[np.ndarray] = None
        self.junction = None               # layouts.Junction: the exits an ego on the main road can take
        self.keepout: list = []            # (x, y, radius) where no buildings go

    # --- helpers ---
    def colour(self, material: int):
        cols = MATERIALS[material].colours
        return cols[int(self.rng.integers(len(cols)))]

    def size(self, kind: str):
        _, mean, spread, _ = AGENT_TYPES[kind]
        return tuple(float(round(m + s * self.rng.uniform(-1, 1), 3)) for m, s in zip(mean, spread))

    def add_box(self, x, y, l, w, h, yaw, material, rgb=None):
        self.structures.append((x, y, h / 2, l, w, h, yaw, material, rgb or self.colour(material)))

    def vehicle(self, path: Path, s0: float, v: float, kind: str = "car", **kw) -> Mover:
        m = Mover(kind, self.size(kind), self.colour(AGENT_TYPES[kind][3]), path, s0, v * self.rng.uniform(0.8, 1.0),
                  v, **kw)
        self.movers.append(m)
        return m

    def walker(self, path: Path, s0: float, t_start: float = 0.0) -> Mover:
        m = Mover("pedestrian", self.size("pedestrian"), self.colour(PEDESTRIAN), path, s0, 0.0,
                  float(self.rng.uniform(1.1, 1.6)), walker=True, t_start=t_start)
        self.movers.append(m)
        return m

    def paint_road(self, road: Road, s0: float, s1: float, centre_line: bool = True):
        c = road.center
        self.ground.append((ROAD, strip(c, s0, s1, -road.half, road.half)))
        if road.sidewalk_w > 0:
            for a, b in intervals(s0, s1, road.gaps):
                for sign in (-1, 1):
                    lo, hi = sorted((sign * road.half, sign * (road.half + road.sidewalk_w)))
                    self.ground.append((SIDEWALK, strip(c, a, b, lo, hi)))
        for a, b in intervals(s0, s1, road.mark_gaps):
            for sign in (-1, 1):
                edge = sign * road.lanes * road.lane_w
                self.ground.append((MARKING, strip(c, a, b, edge - 0.08, edge + 0.08)))
                for i in range(1, road.lanes):
                    off = sign * i * road.lane_w
                    for d0 in np.arange(a + 1.0, b - 3.0, 9.0):
                        self.ground.append((MARKING, strip(c, d0, d0 + 3.0, off - 0.07, off + 0.07, step=3.0)))
            if centre_line and not road.median:
                for off in (-0.15, 0.15):
                    self.ground.append((MARKING, strip(c, a, b, off - 0.06, off + 0.06)))

    def buildings_along(self, road: Road, s0: float, s1: float, avoid):
        rng = self.rng
        for sign in (-1, 1):
            s = s0 + rng.uniform(0, 10)
            while s < s1:
                length = rng.uniform(10, 24)
                depth = rng.uniform(10, 18)
                height = rng.uniform(6, 22)
                mid = s + length / 2
                if mid + length / 2 < s1 and not any(a - length / 2 - 8 < mid < b + length / 2 + 8 for a, b in avoid):
                    x, y, h = road.center.at(mid)
                    off = sign * (road.half + road.sidewalk_w + rng.uniform(1.5, 4.0) + depth / 2)
                    cx, cy = x - np.sin(h) * off, y + np.cos(h) * off
                    if not any(np.hypot(cx - kx, cy - ky) < kr for kx, ky, kr in self.keepout):
                        self.add_box(cx, cy, length, depth, height, h, BUILDING)
                s += length + rng.uniform(2, 12)

    def poles_along(self, road: Road, s0: float, s1: float, every: float, avoid, off_extra: float = -0.6):
        for sign in (-1, 1):
            for s in np.arange(s0 + self.rng.uniform(0, every), s1, every):
                if any(a - 3 < s < b + 3 for a, b in avoid):
                    continue
                x, y, h = road.center.at(s)
                off = sign * (road.half + road.sidewalk_w + off_extra)
                self.add_box(x - np.sin(h) * off, y + np.cos(h) * off, 0.3, 0.3, 6.5, h, POLE)

    def parked_along(self, road: Road, s0: float, s1: float, avoid, occupancy: float = 0.5):
        for sign in (-1, 1):
            s = s0
            while s < s1:
                s += self.rng.uniform(6.0, 8.0)
                if self.rng.uniform() > occupancy or any(a - 8 < s < b + 8 for a, b in avoid):
                    continue
                x, y, h = road.center.at(s)
                off = sign * (road.lanes * road.lane_w + road.edge_w / 2)
                size = self.size("car")
                self.statics.append(Static("car", size, self.colour(VEHICLE), float(x - np.sin(h) * off),
                                           float(y + np.cos(h) * off), float(h if sign < 0 else h + np.pi),
                                           parked=True))

    def traffic(self, path: Path, s_from: float, s_to: float, v: float, gap=(15.0, 40.0), kinds=None, **kw):
        s = s_from + self.rng.uniform(0, gap[1] - gap[0])
        while s < s_to:
            r = self.rng.uniform()
            kind = kinds or ("bus" if r < 0.05 else "truck" if r < 0.13 else "car")
            self.vehicle(path, s, v * self.rng.uniform(0.85, 1.15), kind, **kw)
            s += self.rng.uniform(*gap)
