"""The synthetic world of one scene: ground surfaces, static structures, agents and how they move.

Everything is built in a flat local frame (metres, z up, ground at z = 0) and then shifted so that the whole scene
lies in positive global coordinates (the devkit's map mask puts global (0, 0) at the bottom-left map pixel).
Every sensor (lidar.py, camera.py, radar.py) sees the same :class:`World`: ground polygons with a material each, and
upright boxes (buildings, poles, walls, agents) whose poses come from one traffic simulation at 20 Hz.

Behaviour is what a world model has to learn and a constant-velocity guess gets wrong: drivers follow lane paths
with the intelligent driver model (IDM), brake behind vehicles and pedestrians in their path, stop at red lights,
slow down for curves; the ego vehicle does the same along a path that changes lanes or turns at an intersection.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

DT = 0.05                       # simulation step, seconds (the 20 Hz lidar rate)
MAP_RESOLUTION = 0.1            # metres per map-mask pixel (the devkit's native resolution)
MAP_MARGIN = 100.0              # metres of map around the ego trajectory (lidar range is 80 m)
BODY_MARGIN = 0.04              # an agent's body is this much smaller than its annotation box on each side

# ---- materials: lidar intensity band (disjoint, so intensity tells the material) and camera base colours -----------
GRASS, ROAD, SIDEWALK, MARKING, BUILDING, VEHICLE, PEDESTRIAN, POLE, BARRIER, CONE = range(1, 11)


@dataclasses.dataclass(frozen=True)
class Material:
    name: str
    intensity: tuple[int, int]                  # lidar intensity band [lo, hi]
    colours: tuple[tuple[int, int, int], ...]   # RGB base colours (faces are shaded by 0.55-1.0)


MATERIALS = {
    ROAD: Material("road", (3, 10), ((72, 73, 78),)),
    GRASS: Material("grass", (12, 20), ((78, 124, 56),)),
    SIDEWALK: Material("sidewalk", (24, 34), ((176, 170, 158),)),
    BUILDING: Material("building", (40, 60), ((150, 84, 64), (205, 180, 130), (110, 125, 160))),
    BARRIER: Material("barrier", (64, 80), ((225, 225, 120),)),
    PEDESTRIAN: Material("pedestrian", (84, 96), ((200, 60, 120), (40, 40, 110), (110, 70, 40))),
    VEHICLE: Material("vehicle", (100, 140), ((170, 28, 30), (30, 60, 170), (225, 185, 30), (20, 140, 150),
                                             (110, 40, 130), (30, 30, 34))),
    POLE: Material("pole", (150, 170), ((45, 85, 75),)),
    CONE: Material("cone", (180, 200), ((245, 110, 20),)),
    MARKING: Material("marking", (210, 250), ((236, 236, 232),)),
}

# ---- agent kinds: nuScenes category, size (w, l, h) mean and spread, material --------------------------------------
AGENT_TYPES = {
    "car": ("vehicle.car", (1.95, 4.6, 1.7), (0.1, 0.35, 0.15), VEHICLE),
    "truck": ("vehicle.truck", (2.5, 7.5, 3.0), (0.1, 1.0, 0.3), VEHICLE),
    "bus": ("vehicle.bus.rigid", (2.9, 11.0, 3.4), (0.05, 0.8, 0.1), VEHICLE),
    "bicycle": ("vehicle.bicycle", (0.65, 1.75, 1.7), (0.05, 0.1, 0.05), PEDESTRIAN),
    "pedestrian": ("human.pedestrian.adult", (0.67, 0.73, 1.75), (0.05, 0.05, 0.08), PEDESTRIAN),
    "barrier": ("movable_object.barrier", (2.4, 0.5, 1.0), (0.1, 0.05, 0.05), BARRIER),
    "cone": ("movable_object.trafficcone", (0.42, 0.42, 1.0), (0.03, 0.03, 0.05), CONE),
}

# ---- scenario table -------------------------------------------------------------------------------------------------
# Scene n (1-based) drives scenario DRIVING[(n - 1) % 7] in weather WEATHER[n % 3]. 7, 3 and the validation split's
# period 5 are coprime, so every combination recurs and the val scenes (n % 5 == 3) see all of them.
DRIVING = [
    dict(layout="urban", maneuver="left", words=["city"]),
    dict(layout="highway", maneuver="lanechange", words=["highway"]),
    dict(layout="urban", maneuver="right", crossing=True, words=["city"]),
    dict(layout="urban", maneuver="straight", congestion=True, words=["city"]),
    dict(layout="parking", maneuver="straight", words=[]),
    dict(layout="urban_straight", maneuver="lanechange", congestion=True, words=["city"]),
    dict(layout="parking", maneuver="straight", words=[]),
]
WEATHER = ["day", "night", "rain"]
TAG_VOCABULARY = ["night", "rain", "intersection", "turn left", "turn right", "pedestrians", "parking lot",
                  "high speed", "congestion"]


def scenario(scene_number: int) -> dict:
    """Driving scenario and weather of scene ``scene_number`` (1-based)."""
    return dict(DRIVING[(scene_number - 1) % len(DRIVING)], weather=WEATHER[scene_number % len(WEATHER)])


# ---------------------------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------------------------
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


def _intervals(s0: float, s1: float, gaps) -> list[tuple[float, float]]:
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


# ---------------------------------------------------------------------------------------------------------------------
# World containers
# ---------------------------------------------------------------------------------------------------------------------
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


@dataclasses.dataclass
class World:
    name: str
    tags: list[str]
    weather: str
    ground: list                       # (material, rgb, polygon [N, 2]) in draw order, global frame
    structures: np.ndarray             # [S, 8]: cx, cy, cz, l, w, h, yaw, material (buildings, poles, walls)
    structure_colours: np.ndarray      # [S, 3] uint8
    agents: list                       # list of dicts: kind, category, size, colour, material, parked, ego
    agent_xy: np.ndarray               # [K, A, 2] per simulation step
    agent_yaw: np.ndarray              # [K, A]
    agent_speed: np.ndarray            # [K, A]
    agent_active: np.ndarray           # [K, A] bool
    ego_index: int
    map_mask: np.ndarray               # uint8 [H, W]: 255 on road / sidewalk
    material_grid: np.ndarray          # uint8 [H, W]: ground material per map pixel
    sun: np.ndarray                    # unit vector towards the light

    @property
    def steps(self) -> int:
        return self.agent_xy.shape[0]

    def state(self, t: float):
        """Interpolated (xy [A, 2], yaw [A], velocity [A, 2], active [A]) at time t seconds."""
        f = min(max(t / DT, 0.0), self.steps - 1.0)
        k0 = int(np.floor(f))
        k1 = min(k0 + 1, self.steps - 1)
        a = f - k0
        xy = (1 - a) * self.agent_xy[k0] + a * self.agent_xy[k1]
        d = np.angle(np.exp(1j * (self.agent_yaw[k1] - self.agent_yaw[k0])))
        yaw = self.agent_yaw[k0] + a * d
        speed = (1 - a) * self.agent_speed[k0] + a * self.agent_speed[k1]
        vel = np.stack([np.cos(yaw), np.sin(yaw)], axis=1) * speed[:, None]
        active = self.agent_active[k0] & self.agent_active[k1]
        return xy, yaw, vel, active

    def ego_pose(self, t: float):
        xy, yaw, vel, _ = self.state(t)
        e = self.ego_index
        return xy[e], float(yaw[e]), vel[e]

    def boxes(self, t: float, include_ego: bool = False):
        """All boxes at time t as arrays: centre [B, 3], half extents (l/2, w/2, h/2) [B, 3], yaw [B], material [B],
        colour [B, 3], agent index [B] (-1 for structures). Agents that are not active are left out."""
        xy, yaw, _, active = self.state(t)
        idx = [i for i, a in enumerate(self.agents) if active[i] and (include_ego or not a["ego"])]
        n = len(idx)
        centre = np.zeros((n, 3))
        half = np.zeros((n, 3))
        mats = np.zeros(n, dtype=np.int64)
        cols = np.zeros((n, 3), dtype=np.uint8)
        for j, i in enumerate(idx):
            w, l, h = self.agents[i]["size"]
            centre[j] = (xy[i, 0], xy[i, 1], h / 2 - BODY_MARGIN / 2)
            half[j] = (l / 2 - BODY_MARGIN, w / 2 - BODY_MARGIN, h / 2 - BODY_MARGIN / 2)
            mats[j] = self.agents[i]["material"]
            cols[j] = self.agents[i]["colour"]
        st = self.structures
        return (np.concatenate([st[:, 0:3], centre]), np.concatenate([st[:, 3:6] / 2, half]),
                np.concatenate([st[:, 6], yaw[idx]]), np.concatenate([st[:, 7].astype(np.int64), mats]),
                np.concatenate([self.structure_colours, cols]), np.concatenate([np.full(len(st), -1), idx]).astype(int))


# ---------------------------------------------------------------------------------------------------------------------
# Layout builders (local frame)
# ---------------------------------------------------------------------------------------------------------------------
class _Builder:
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
            for a, b in _intervals(s0, s1, road.gaps):
                for sign in (-1, 1):
                    lo, hi = sorted((sign * road.half, sign * (road.half + road.sidewalk_w)))
                    self.ground.append((SIDEWALK, strip(c, a, b, lo, hi)))
        for a, b in _intervals(s0, s1, road.mark_gaps):
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


def _urban(b: _Builder, spec: dict, intersection: bool):
    rng, D = b.rng, b.D
    lane_w, lanes, edge_w, sw = 3.5, 2, 2.5, 3.0
    maneuver = spec["maneuver"]
    congestion = spec.get("congestion", False)
    v_ego = 6.0 if congestion else float(rng.uniform(9.5, 12.0))
    short = D < 10
    s_e0 = 90.0
    cross_half = lanes * lane_w + edge_w
    if intersection:
        if short:
            d0 = 6.0 if maneuver != "straight" else 10.0
            t_green = 0.0
        else:
            d0 = max(15.0, 0.3 * D * v_ego)
            t_green = 0.5 * D
        s_stop = s_e0 + d0
        s_int = s_stop + 4.5 + cross_half
        length = s_int + 250
    else:
        s_int = s_stop = t_green = None
        length = s_e0 + max(v_ego * D * 1.3, 60) + 200
    zone = (s_int - 60, s_int + 60) if intersection else None
    center = curvy_centerline(rng, length, 1 / 220, zone)
    gaps, mgaps = [], []
    if intersection:
        gaps = [(s_int - cross_half - sw, s_int + cross_half + sw)]
        mgaps = [(s_int - cross_half - 4.5, s_int + cross_half + 4.5)]
    main = Road(center, lanes, lane_w, edge_w, sw, gaps, mgaps)
    b.roads.append(main)
    b.paint_road(main, 0, length)
    avoid = [gaps[0]] if intersection else []

    if intersection:
        cx, cy, ch = center.at(s_int)
        b.intersection = np.array([cx, cy])
        cl = 150.0
        ph = ch + np.pi / 2
        cxy = np.stack([cx + np.cos(ph) * np.linspace(-cl, cl, 151), cy + np.sin(ph) * np.linspace(-cl, cl, 151)], 1)
        cg = [(cl - main.half - sw, cl + main.half + sw)]
        cmg = [(cl - main.half - 4.5, cl + main.half + 4.5)]
        cross = Road(Path(cxy), lanes, lane_w, edge_w, sw, cg, cmg)
        b.roads.append(cross)
        b.paint_road(cross, 0, 2 * cl)
        b.keepout.append((cx, cy, cross_half + sw + 14))
        # intersection box and crosswalks; stop lines
        b.ground.append((ROAD, strip(center, s_int - cross_half, s_int + cross_half, -main.half, main.half)))
        for road, smid, half_other in ((main, s_int, cross_half), (cross, cl, main.half)):
            for sign in (-1, 1):
                s_a = smid + sign * (half_other + 0.5)
                s_b = smid + sign * (half_other + 3.5)
                lo, hi = sorted((s_a, s_b))
                for off in np.arange(-road.half + 0.5, road.half - 0.4, 1.0):
                    b.ground.append((MARKING, strip(road.center, lo, hi, off, off + 0.5, step=3.0)))
                stop = smid + sign * (half_other + 4.2)
                lat = (-road.lanes * road.lane_w, 0.0) if sign < 0 else (0.0, road.lanes * road.lane_w)
                b.ground.append((MARKING, strip(road.center, stop - 0.2, stop + 0.2, *lat, step=1.0)))
        b.buildings_along(cross, 0, 2 * cl, cg)
        b.poles_along(cross, 0, 2 * cl, 30.0, cg)
        b.parked_along(cross, 5, 2 * cl - 5, cg + [(cl - 30, cl + 30)], 0.35)
        # signals: main road red until t_green, crossing road green until t_green - 2 s
        b.signals = {"main": [(t_green, 1e9)], "cross": [(-1e9, t_green - 2.0)] if t_green > 0 else []}
        main_stop_f = s_int - cross_half - 4.2
        main_stop_b = length - (s_int + cross_half + 4.2)
        cross_stop_f = cl - main.half - 4.2
        cross_stop_b = 2 * cl - (cl + main.half + 4.2)

    b.buildings_along(main, 0, length, avoid)
    b.poles_along(main, 0, length, 30.0, avoid)
    b.parked_along(main, 5, length - 5, avoid, 0.3 if congestion else 0.45)

    # ---- ego path ----
    if intersection and maneuver in ("left", "right"):
        lane_i = 0 if maneuver == "left" else lanes - 1
        a = main.lane(+1, lane_i)
        if maneuver == "left":
            tgt = cross.lane(+1, 0)
            sb = cl + main.half + 0.5
        else:
            tgt = cross.lane(-1, lanes - 1)
            sb = 2 * cl - (cl - main.half - 0.5)
        ego_path = join(a, s_int - cross_half - 0.5, tgt, sb, 200)
        ego_stops = [(main_stop_f, "main")]
    elif maneuver == "lanechange":
        s_lc = s_e0 + max(20.0, 0.35 * D * v_ego)
        ss = center.s
        tr = np.clip((ss - s_lc) / 45.0, 0, 1)
        off = -(1.5 - (1 - 0.5 * (1 - np.cos(np.pi * tr)))) * lane_w
        ego_path = center.offset(off)
        ego_stops = []
    else:
        ego_path = main.lane(+1, 1 if not intersection else 0)
        ego_stops = [(main_stop_f, "main")] if intersection else []
    ego = Mover("car", (1.85, 4.08, 1.6), (255, 255, 255), ego_path, s_e0, v_ego * 0.8 if not congestion else 2.0,
                v_ego, stop_lines=ego_stops, accel=2.0, ego=True)
    b.movers.insert(0, ego)

    # ---- traffic ----
    for i in range(lanes):
        lane = main.lane(+1, i)
        stops = [(main_stop_f, "main")] if intersection else []
        if congestion:
            gap = (7.5, 10.0)
            m0 = len(b.movers)
            b.traffic(lane, s_e0 + 10 + 3 * i, min(length - 30, s_e0 + 10 + 3 * i + 120), 7.0, gap, kinds="car",
                      stop_lines=stops)
            if not intersection and len(b.movers) > m0:
                lead = b.movers[-1]
                t = 0.0
                while t < D:
                    go, halt = float(b.rng.uniform(2.5, 4.5)), float(b.rng.uniform(2.0, 3.5))
                    lead.schedule += [(t, t + halt, 0.0), (t + halt, t + halt + go, 7.0)]
                    t += go + halt
        else:
            b.traffic(lane, s_e0 + 25 + 8 * i, length - 40, float(rng.uniform(9, 13)), stop_lines=stops)
        b.traffic(lane, 5.0, s_e0 - 12, float(rng.uniform(9, 13)), stop_lines=stops)
        back = main.lane(-1, i)
        bstops = [(main_stop_b, "main")] if intersection else []
        b.traffic(back, 10.0, length - 10, float(rng.uniform(9, 13)), (20.0, 50.0), stop_lines=bstops)
    # a cyclist near the kerb
    kerb = center.offset(-(lanes * lane_w - 0.9))
    ahead = maneuver != "right"                 # a right-turning ego would otherwise queue behind the cyclist
    b.vehicle(kerb, s_e0 + float(rng.uniform(30, 70) if ahead else -rng.uniform(25, 45)), float(rng.uniform(4.0, 5.5)),
              "bicycle",
              stop_lines=[(main_stop_f, "main")] if intersection else [])
    if intersection:
        for i in range(lanes):
            for direction, stop in ((+1, cross_stop_f), (-1, cross_stop_b)):
                lane = cross.lane(direction, i)
                b.traffic(lane, 5.0, lane.length - 10, float(rng.uniform(9, 12)), (18.0, 40.0),
                          stop_lines=[(stop, "cross")])
        # a few main-road drivers turn at the intersection
        for _ in range(2):
            d = +1 if rng.uniform() < 0.5 else -1
            a = main.lane(-1, 0)
            s_end = length - (s_int + cross_half + 0.5)
            if d > 0:
                tgt, sb = cross.lane(-1, 0), 2 * cl - (cl - main.half - 0.5)
            else:
                tgt, sb = cross.lane(+1, lanes - 1), cl + main.half + 0.5
            p = join(a, s_end, tgt, sb, 150)
            b.vehicle(p, float(rng.uniform(s_end - 140, s_end - 60)), float(rng.uniform(8, 11)),
                      stop_lines=[(main_stop_b, "main")])
        # pedestrians: waiting at corners, crossing on the walk signal
        if spec.get("crossing"):
            # crosswalk on the crossing road at the ego's right, walked from the side the ego turns into, starting
            # just before the walk signal so that the ego yields to them and then completes its turn
            right_arm = cl - main.half - 2.0
            x0, y0, h0 = cross.center.at(right_arm)
            across = np.array([np.cos(h0 + np.pi / 2), np.sin(h0 + np.pi / 2)])
            along = np.array([np.cos(h0), np.sin(h0)])
            off = cross.half + sw * 0.5
            for k in range(int(rng.integers(3, 6))):
                jitter = rng.uniform(-1.2, 1.2) * along
                start, end = np.array([x0, y0]) + off * across + jitter, np.array([x0, y0]) - off * across + jitter
                p = Path(np.stack([start, end, end + 8 * along]))
                m = b.walker(p, 0.0)
                t_walk = t_green - 4.0 + 0.8 * k + float(rng.uniform(0, 0.5))
                m.s0, m.t_start = max(0.0, -t_walk) * m.v_desired, max(0.0, t_walk)
    # pedestrians on the sidewalks
    for _ in range(int(rng.integers(3, 7))):
        sign = 1 if rng.uniform() < 0.5 else -1
        p = center.offset(sign * (main.half + sw * 0.5))
        p = p if rng.uniform() < 0.5 else p.reversed()
        b.walker(p, float(rng.uniform(s_e0 - 40, min(p.length - 20, s_e0 + 120))))


def _highway(b: _Builder, spec: dict):
    rng, D = b.rng, b.D
    lane_w, lanes, edge_w = 3.7, 3, 3.0
    v_ego = float(rng.uniform(24, 28))
    s_e0 = 120.0
    length = s_e0 + v_ego * D * 1.2 + 350
    center = curvy_centerline(rng, length, 1 / 700)
    road = Road(center, lanes, lane_w, edge_w, 0.0, [], [], median=True)
    b.roads.append(road)
    b.paint_road(road, 0, length)
    for s in np.arange(0, length - 8, 8.0):        # concrete median wall
        x, y, h = center.at(s + 4)
        b.add_box(x, y, 8.05, 0.6, 1.0, h, BARRIER)
    b.poles_along(road, 0, length, 50.0, [], off_extra=0.8)
    for sign in (-1, 1):                          # buildings set back from the road
        s = rng.uniform(0, 40)
        while s < length:
            x, y, h = center.at(s)
            off = sign * (road.half + rng.uniform(25, 45))
            b.add_box(x - np.sin(h) * off, y + np.cos(h) * off, rng.uniform(15, 40), rng.uniform(12, 25),
                      rng.uniform(8, 30), h, BUILDING)
            s += rng.uniform(40, 90)
    # road works on the shoulder: cones and barriers
    s_w = s_e0 + float(rng.uniform(40, 120))
    for k in range(8):
        x, y, h = center.at(s_w + 3 * k)
        off = -(road.half - 1.0)
        b.statics.append(Static("cone", b.size("cone"), b.colour(CONE), float(x - np.sin(h) * off),
                                float(y + np.cos(h) * off), float(h)))
    for k in range(3):
        x, y, h = center.at(s_w + 6 + 3 * k)
        off = -(road.half - 2.2)
        b.statics.append(Static("barrier", b.size("barrier"), b.colour(BARRIER), float(x - np.sin(h) * off),
                                float(y + np.cos(h) * off), float(h + np.pi / 2)))
    # ego: middle lane, passes a slow truck by moving to the inner lane
    s_lc = s_e0 + max(15.0, 0.3 * D * v_ego)
    tr = np.clip((center.s - s_lc) / 70.0, 0, 1)
    off = -(1.5 - 0.5 * (1 - np.cos(np.pi * tr))) * lane_w
    ego = Mover("car", (1.85, 4.08, 1.6), (255, 255, 255), center.offset(off), s_e0, v_ego * 0.75, v_ego,
                accel=1.8, ego=True)
    b.movers.insert(0, ego)
    b.vehicle(road.lane(+1, 1), s_lc + 35, 17.0, "truck")
    for i in range(lanes):
        v = 29.0 - 3.5 * i
        lane = road.lane(+1, i)
        b.traffic(lane, 10, s_e0 - 25, v, (30, 70))
        b.traffic(lane, s_lc + 60 if i == 1 else s_e0 + 40, length - 60, v, (40, 90))
        b.traffic(road.lane(-1, i), 10, length - 10, v, (35, 80))


def _parking(b: _Builder, spec: dict):
    rng, D = b.rng, b.D
    v_ego = float(rng.uniform(3.5, 5.0))
    lot_len = max(110.0, 20 + v_ego * D * 1.3 + 60)
    x0 = -20.0
    lot = np.array([[x0, -32], [lot_len, -32], [lot_len, 32], [x0, 32]], dtype=float)
    b.ground.append((ROAD, lot))
    b.ground.append((SIDEWALK, np.array([[x0, 32], [lot_len, 32], [lot_len, 36], [x0, 36]], dtype=float)))
    aisles = [0.0, -19.0, 19.0]
    rows = [6.25, -6.25, 12.75, -12.75]
    stall_w = 2.7
    for y in rows:                                # stall lines and parked cars
        sign = 1 if y > 0 else -1
        near = 3.75 if abs(y) < 10 else (9.5 if abs(y) < 16 else 22.5)
        near *= sign
        for xs in np.arange(x0 + 6, lot_len - 6, stall_w):
            line = np.array([[xs - 0.06, near], [xs + 0.06, near], [xs + 0.06, near + sign * 5],
                             [xs - 0.06, near + sign * 5]])
            b.ground.append((MARKING, line))
            if rng.uniform() < 0.6 and xs + stall_w < lot_len - 6:
                size = b.size("car")
                yaw = np.pi / 2 if rng.uniform() < 0.5 else -np.pi / 2
                b.statics.append(Static("car", size, b.colour(VEHICLE), float(xs + stall_w / 2), float(y), float(yaw),
                                        parked=True))
    # light poles on the islands between back-to-back rows and a building along the lot
    for xs in np.arange(x0 + 10, lot_len, 30.0):
        for y in (9.5, -9.5):
            b.add_box(xs, y + (0.0), 0.3, 0.3, 8.0, 0.0, POLE)
    xs = x0
    while xs < lot_len:
        length = rng.uniform(20, 45)
        b.add_box(xs + length / 2, 36 + 2 + 7, length, 14, rng.uniform(6, 12), 0.0, BUILDING)
        xs += length + rng.uniform(3, 10)
    for xs in np.arange(x0, lot_len, 25.0):
        b.add_box(xs + 10, -32 - 10, 20, 12, rng.uniform(5, 9), 0.0, BUILDING)
    # ego drives down the middle aisle, right-hand side
    ego_path = Path(np.array([[x0 + 2, -1.5], [lot_len + 60, -1.5]]))
    s_e0 = 8.0
    ego = Mover("car", (1.85, 4.08, 1.6), (255, 255, 255), ego_path, s_e0, v_ego * 0.6, v_ego, accel=1.2, ego=True)
    b.movers.insert(0, ego)
    # other cars: one ahead, some oncoming, one in a side aisle
    b.vehicle(ego_path, s_e0 + float(rng.uniform(25, 40)), v_ego * 0.8, "car")
    onc = Path(np.array([[lot_len + 60, 1.5], [x0 - 60, 1.5]]))
    b.traffic(onc, 30, onc.length - 30, v_ego, (25, 45), kinds="car")
    for y in (-19.0, 19.0):
        p = Path(np.array([[x0 - 20, y - 1.5], [lot_len + 40, y - 1.5]]))
        b.traffic(p, 10, p.length - 20, 4.0, (30, 50), kinds="car")
    # pedestrians: walking to and from cars, crossing the aisle in front of the ego
    arrive = s_e0 + v_ego * np.linspace(0.25, 0.8, 3) * max(D, 4.0)
    for k, xs in enumerate(arrive):
        sign = 1 if k % 2 == 0 else -1
        p = Path(np.array([[xs, sign * 9.0], [xs, -sign * 9.0], [xs + 5, -sign * 12.0]]))
        t_cross = max(0.0, (xs - s_e0) / v_ego - 2.5 - rng.uniform(0, 1.0))
        b.walker(p, 0.0, t_start=t_cross)
    for _ in range(int(rng.integers(3, 6))):
        y = 34.0 if rng.uniform() < 0.5 else 16.0 * (1 if rng.uniform() < 0.5 else -1)
        p = Path(np.array([[x0, y], [lot_len, y]]))
        p = p if rng.uniform() < 0.5 else p.reversed()
        b.walker(p, float(rng.uniform(5, p.length - 30)))
    b.keepout = []


# ---------------------------------------------------------------------------------------------------------------------
# Traffic simulation
# ---------------------------------------------------------------------------------------------------------------------
def _green(signals: dict, group: str, t: float) -> bool:
    return any(a <= t < b for a, b in signals.get(group, [(-1e9, 1e9)]))


class _PathBank:
    """All movers' paths resampled every STEP metres into padded arrays, for vectorised look-ups."""
    STEP = 1.0

    def __init__(self, paths: list[Path]):
        self.length = np.array([p.length for p in paths])
        n = int(np.ceil(self.length.max() / self.STEP)) + 2
        self.x = np.zeros((len(paths), n))
        self.y = np.zeros((len(paths), n))
        self.h = np.zeros((len(paths), n))
        self.k = np.zeros((len(paths), n))
        grid = np.arange(n) * self.STEP
        for i, p in enumerate(paths):
            g = np.minimum(grid, p.length)
            self.x[i], self.y[i], self.h[i] = p.at(g)
            self.k[i] = np.interp(g, p.s, p.curvature)
        self.n = n

    def at(self, s: np.ndarray):
        """s: [M] or [M, L] arc lengths (row i on path i) -> x, y, heading, curvature of the same shape."""
        s = np.asarray(s, dtype=np.float64)
        rows = np.arange(len(self.length)).reshape((-1,) + (1,) * (s.ndim - 1))
        f = np.clip(s, 0, None) / self.STEP
        i0 = np.minimum(np.floor(f).astype(np.int64), self.n - 2)
        a = np.clip(f - i0, 0, 1)
        out = []
        for arr in (self.x, self.y, self.h, self.k):
            out.append((1 - a) * arr[rows, i0] + a * arr[rows, i0 + 1])
        return out


def simulate(movers: list[Mover], signals: dict, duration: float):
    """Roll the traffic forward at DT; returns arc lengths and speeds [K, M] and active flags.

    Vehicles follow the intelligent driver model: desired speed (capped for curves ahead), the nearest mover in a
    corridor along their own path ahead (pedestrians with a wider margin), and red stop lines they can still stop for.
    """
    K = int(round(duration / DT)) + 1
    M = len(movers)
    bank = _PathBank([m.path for m in movers])
    s = np.array([m.s0 for m in movers], dtype=np.float64)
    v = np.array([m.v_init for m in movers], dtype=np.float64)
    S = np.zeros((K, M))
    V = np.zeros((K, M))
    A = np.ones((K, M), dtype=bool)
    active = s < bank.length
    width = np.array([m.size[0] for m in movers])
    length = np.array([m.size[1] for m in movers])
    walker = np.array([m.walker for m in movers])
    vehicle = ~walker
    v_des = np.array([m.v_desired for m in movers])
    a_max = np.array([m.accel for m in movers])
    t_start = np.array([m.t_start for m in movers])
    look = np.linspace(0.0, 50.0, 26)
    ends = bank.length - 0.5
    b_comf, T, s_min = 2.5, 1.2, 2.5
    lat = np.where(walker[None, :], 0.5 * width[:, None] + 1.6, 0.5 * (width[:, None] + width[None, :]) + 0.35)
    other_len = np.where(walker, 0.6, 0.5 * length)
    stops = [(i, s_stop, g) for i, m in enumerate(movers) for s_stop, g in m.stop_lines]
    sched = [(i, t0, t1, vd) for i, m in enumerate(movers) for t0, t1, vd in m.schedule]
    eye = np.eye(M, dtype=bool)
    for k in range(K):
        t = k * DT
        S[k], V[k], A[k] = s, v, active
        if k == K - 1:
            break
        px, py, yaw, _ = bank.at(s)
        v0 = v_des.copy()
        for i, t0, t1, vd in sched:
            if t0 <= t < t1:
                v0[i] = vd
        sa = np.minimum(s[:, None] + look[None], bank.length[:, None])
        ax, ay, ah, ak = bank.at(sa)                                    # [M, L]
        v_curve = np.sqrt(2.2 / np.maximum(ak, 1e-4))
        v0 = np.minimum(v0, np.min(np.sqrt(v_curve ** 2 + 4.0 * look[None]), axis=1))
        gap = np.full(M, np.inf)
        v_lead = np.zeros(M)
        dx, dy = px[None, :] - px[:, None], py[None, :] - py[:, None]       # [i, j]: j relative to i
        near = ((dx * dx + dy * dy < 55.0 ** 2) & (dx * np.cos(yaw)[:, None] + dy * np.sin(yaw)[:, None] > 0.0)
                & active[None, :] & active[:, None] & vehicle[:, None] & ~eye)
        ii, jj = np.nonzero(near)
        if len(ii):
            d = np.hypot(ax[ii] - px[jj, None], ay[ii] - py[jj, None])                     # [P, L]
            jb = np.argmin(d, axis=1)
            dmin = d[np.arange(len(ii)), jb]
            cos = np.cos(yaw[jj] - ah[ii, jb])
            hit = (dmin < lat[ii, jj]) & (look[jb] > 0.5 * length[ii]) & (walker[jj] | (cos > 0.5))
            if hit.any():
                ii, jj, jb, cos = ii[hit], jj[hit], jb[hit], cos[hit]
                g = look[jb] - 0.5 * length[ii] - other_len[jj]
                order = np.lexsort((g, ii))                 # per mover i, the nearest first
                first = order[np.concatenate([[True], ii[order][1:] != ii[order][:-1]])]
                gap[ii[first]] = g[first]
                v_lead[ii[first]] = np.where(walker[jj[first]], 0.0, v[jj[first]] * np.maximum(cos[first], 0.0))
        for i, s_stop, g in stops:
            dist = s_stop - (s[i] + 0.5 * length[i])
            if 0.0 < dist + 0.3 < 60.0 and not _green(signals, g, t):
                if v[i] ** 2 / (2 * max(dist, 0.1)) < 5.0 and dist < gap[i]:
                    gap[i], v_lead[i] = max(dist, 0.05), 0.0
        free = 1 - (v / np.maximum(v0, 0.05)) ** 4
        s_star = np.maximum(s_min + v * T + v * (v - v_lead) / (2 * np.sqrt(a_max * b_comf)), 0.0)
        inter = np.where(np.isfinite(gap), (s_star / np.maximum(gap, 0.05)) ** 2, 0.0)
        acc = np.clip(a_max * (free - inter), -7.0, a_max)
        v_walk = np.where((t >= t_start) & (s < bank.length), v_des, 0.0)
        v = np.where(walker, v_walk, np.maximum(v + acc * DT, 0.0))
        v = np.where(active, v, 0.0)
        s = s + v * DT
        active = active & ((s < ends) | walker)
    return S, V, A


# ---------------------------------------------------------------------------------------------------------------------
# Scene assembly
# ---------------------------------------------------------------------------------------------------------------------
def ego_intent(rng: np.random.Generator, v_nominal: float, duration: float, calm: bool) -> list:
    """The ego driver's own choices of speed over time, as (t0, t1, desired speed) schedule entries.

    Without them the ego drives a smooth IDM profile set by the scene, so its future motion follows almost exactly
    from its past motion (over 3 s the forward distance is 97% predictable from the last action) and a world model
    rightly ignores the action it is given. A driver who at moments of its own choosing slows down, speeds up or
    pulls up makes the action carry what the sensors cannot tell. Every choice holds for 1.5-4 s and is reached by
    ramping the desired speed at about 2.5 m/s^2; IDM still keeps the ego behind leaders and at red lights. A
    ``calm`` driver never pulls up and varies its speed less (0.6-1.2 times nominal instead of 0-1.4)."""
    entries: list = []
    t, previous = 0.0, v_nominal
    while t < duration:
        draw = rng.random()
        if not calm and draw < 0.15:
            factor = 0.0
        elif draw < 0.45:
            factor = rng.uniform(0.6, 0.8) if calm else rng.uniform(0.4, 0.75)
        elif draw < 0.75:
            factor = rng.uniform(0.9, 1.1)
        else:
            factor = rng.uniform(1.1, 1.2) if calm else rng.uniform(1.2, 1.4)
        target = factor * v_nominal
        ramp = max(abs(target - previous) / 2.5, 0.5)
        steps = int(np.ceil(ramp / 0.5))
        for i in range(steps):
            entries.append((t + i * ramp / steps, t + (i + 1) * ramp / steps,
                            previous + (target - previous) * (i + 1) / steps))
        hold = rng.uniform(1.5, 4.0)
        entries.append((t + ramp, t + ramp + hold, target))
        t, previous = t + ramp + hold, target
    return entries


def build_world(scene_number: int, seed: int, duration: float) -> World:
    """Build and simulate scene ``scene_number`` (1-based) for ``duration`` seconds, deterministic in the seed."""
    spec = scenario(scene_number)
    rng = np.random.default_rng(np.random.SeedSequence([seed, scene_number, 1]))
    b = _Builder(rng, duration, spec)
    if spec["layout"] == "urban":
        _urban(b, spec, intersection=True)
    elif spec["layout"] == "urban_straight":
        _urban(b, spec, intersection=False)
    elif spec["layout"] == "highway":
        _highway(b, spec)
    else:
        _parking(b, spec)

    ego = b.movers[0]
    intent_rng = np.random.default_rng(np.random.SeedSequence([seed, scene_number, 2]))
    # On the highway nobody pulls up; a turning ego must still reach and clear its intersection within the scene.
    calm = spec["layout"] == "highway" or spec["maneuver"] in ("left", "right")
    ego.schedule += ego_intent(intent_rng, ego.v_desired, duration, calm=calm)
    ego_path = ego.path.piece(ego.s0, ego.path.length, 10.0)
    b.statics = [st for st in b.statics if np.min(np.hypot(ego_path[:, 0] - st.x, ego_path[:, 1] - st.y)) < 120.0]
    S, V, A = simulate(b.movers, b.signals, duration)
    K, M = S.shape
    n_static = len(b.statics)
    xy = np.zeros((K, M + n_static, 2))
    yaw = np.zeros((K, M + n_static))
    speed = np.zeros((K, M + n_static))
    active = np.ones((K, M + n_static), dtype=bool)
    for i, m in enumerate(b.movers):
        x, y, h = m.path.at(np.minimum(S[:, i], m.path.length))
        xy[:, i, 0], xy[:, i, 1], yaw[:, i] = x, y, h
        speed[:, i] = V[:, i]
        active[:, i] = A[:, i]
    for j, st in enumerate(b.statics):
        xy[:, M + j] = (st.x, st.y)
        yaw[:, M + j] = st.yaw
    # walkers standing still keep their heading; unwrap for smooth interpolation
    yaw = np.unwrap(yaw, axis=0)

    # shift into positive global coordinates around the ego trajectory
    ego_xy = xy[:, 0]
    lo = ego_xy.min(axis=0) - MAP_MARGIN
    hi = ego_xy.max(axis=0) + MAP_MARGIN
    shift = -lo
    xy = xy + shift
    size_px = np.ceil((hi - lo) / MAP_RESOLUTION).astype(int)
    W, H = int(size_px[0]), int(size_px[1])

    ground = []
    for mat, poly in b.ground:
        ground.append((mat, MATERIALS[mat].colours[0], poly + shift))
    structures = np.array([(x + shift[0], y + shift[1], cz, l, w, h, yw, mat)
                           for x, y, cz, l, w, h, yw, mat, _ in b.structures], dtype=np.float64).reshape(-1, 8)
    colours = np.array([c for *_, c in b.structures], dtype=np.uint8).reshape(-1, 3)
    # only structures that can matter: within lidar/camera reach of the ego trajectory
    if len(structures):
        ego_track = xy[::10, 0]
        d = np.min(np.hypot(structures[:, None, 0] - ego_track[None, :, 0],
                            structures[:, None, 1] - ego_track[None, :, 1]), axis=1)
        keep = d < 180.0
        structures, colours = structures[keep], colours[keep]

    agents = []
    for m in b.movers:
        agents.append(dict(kind=m.kind, category=AGENT_TYPES[m.kind][0], size=m.size, colour=m.colour,
                           material=AGENT_TYPES[m.kind][3], parked=False, ego=m.ego))
    for st in b.statics:
        agents.append(dict(kind=st.kind, category=AGENT_TYPES[st.kind][0], size=st.size, colour=st.colour,
                           material=AGENT_TYPES[st.kind][3], parked=st.parked, ego=False))

    grid = _rasterise(ground, W, H)
    mask = np.where(np.isin(grid, [ROAD, SIDEWALK, MARKING]), 255, 0).astype(np.uint8)
    sun_az = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_az), np.sin(sun_az), 1.2])
    world = World(name=f"scene-{scene_number:04d}", tags=[], weather=spec["weather"], ground=ground,
                  structures=structures, structure_colours=colours, agents=agents, agent_xy=xy, agent_yaw=yaw,
                  agent_speed=speed, agent_active=active, ego_index=0, map_mask=mask, material_grid=grid,
                  sun=sun / np.linalg.norm(sun))
    world.tags = describe(world, spec, None if b.intersection is None else b.intersection + shift)
    return world


def _rasterise(ground, W: int, H: int) -> np.ndarray:
    """Ground material per map pixel (0.1 m), painted in the same order the cameras draw the polygons."""
    import cv2

    grid = np.full((H, W), GRASS, dtype=np.uint8)
    shift = 2
    for mat, _, poly in ground:
        px = np.stack([poly[:, 0] / MAP_RESOLUTION, H - poly[:, 1] / MAP_RESOLUTION], axis=1)
        cv2.fillPoly(grid, [np.round(px * (1 << shift)).astype(np.int32)], int(mat), lineType=cv2.LINE_8, shift=shift)
    return grid


def describe(world: World, spec: dict, intersection: Optional[np.ndarray]) -> list[str]:
    """Tags that say what actually happens in the simulated scene (checked against the ego trajectory)."""
    e = world.ego_index
    speed = world.agent_speed[:, e]
    yaw = world.agent_yaw[:, e]
    xy = world.agent_xy[:, e]
    turn = float(yaw[-1] - yaw[0])
    tags = list(spec.get("words", []))
    if spec["weather"] in ("night", "rain"):
        tags.append(spec["weather"])
    if intersection is not None and np.min(np.hypot(*(xy - intersection).T)) < 30.0:
        tags.append("intersection")
    if turn > np.radians(35):
        tags.append("turn left")
    elif turn < -np.radians(35):
        tags.append("turn right")
    ped = [i for i, a in enumerate(world.agents) if a["kind"] == "pedestrian"]
    if ped:
        d = np.hypot(world.agent_xy[:, ped, 0] - xy[:, None, 0], world.agent_xy[:, ped, 1] - xy[:, None, 1])
        if (d < 25.0).any(axis=0).sum() >= 2 and (spec.get("crossing") or spec["layout"] == "parking"):
            tags.append("pedestrians")
    if spec["layout"] == "parking":
        tags.append("parking lot")
    if speed.max() > 18.0:
        tags.append("high speed")
    if spec.get("congestion") and (speed < 1.0).any():
        tags.append("congestion")
    return tags
