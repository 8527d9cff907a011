"""The three road layouts: an urban road (with or without an intersection), a highway and a parking lot.

Each fills a :class:`Builder` in the scene's local frame, with the ego as its first mover.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from drivejepa.data.synth.builder import Builder, Mover, Static
from drivejepa.data.synth.geometry import Path, Road, curvy_centerline, join, strip
from drivejepa.data.synth.materials import BARRIER, BUILDING, CONE, MARKING, POLE, ROAD, SIDEWALK, VEHICLE


def lay_out(b: Builder, spec: dict) -> None:
    """Fill ``b`` with the layout of scenario ``spec``."""
    if spec["layout"] == "urban":
        urban(b, spec, intersection=True)
    elif spec["layout"] == "urban_straight":
        urban(b, spec, intersection=False)
    elif spec["layout"] == "highway":
        highway(b, spec)
    else:
        parking(b, spec)


@dataclasses.dataclass
class Junction:
    """The signalled intersection of the urban layout: where a driver on the main road can go from its lane."""
    main: Road
    cross: Road
    s_int: float                        # arc length of the intersection centre on the main road
    stop: float                         # arc length of the main road's stop line (forward direction)
    cl: float                           # arc length of the intersection centre on the crossing road

    def exits(self, lane: int) -> list[str]:
        """Exits from forward lane ``lane`` of the main road (right-hand traffic: left turns from the inner lane,
        right turns from the outer one)."""
        out = ["straight"]
        if lane == 0:
            out.append("left")
        if lane == self.main.lanes - 1:
            out.append("right")
        return out

    def path(self, lane: int, exit: str) -> Path:
        """The path through the intersection from forward lane ``lane`` of the main road to ``exit``."""
        a = self.main.lane(+1, lane)
        if exit == "straight":
            return a
        cl = self.cl
        if exit == "left":
            tgt, sb = self.cross.lane(+1, 0), cl + self.main.half + 0.5
        else:
            tgt, sb = self.cross.lane(-1, self.main.lanes - 1), 2 * cl - (cl - self.main.half - 0.5)
        return join(a, self.s_int - self.cross.half - 0.5, tgt, sb, 200)


LANE_WIDTH = 3.5                    # metres: every lane of the town layouts (urban, urban_straight)
HIGHWAY_LANE_WIDTH = 3.7            # metres: the highway's lanes
AISLE_LANE_WIDTH = 3.0              # metres: the parking aisle's two unmarked directions, 1.5 m each side of its middle


def urban(b: Builder, spec: dict, intersection: bool):
    rng, D = b.rng, b.D
    lane_w, lanes, edge_w, sw = LANE_WIDTH, 2, 2.5, 3.0
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
    if intersection:
        b.junction = Junction(main, cross, s_int, main_stop_f, cl)
    if intersection and maneuver in ("left", "right"):
        ego_path = b.junction.path(0 if maneuver == "left" else lanes - 1, maneuver)
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
                v_ego, stop_lines=ego_stops, accel=2.0, ego=True, lane_width=lane_w)
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


def highway(b: Builder, spec: dict):
    rng, D = b.rng, b.D
    lane_w, lanes, edge_w = HIGHWAY_LANE_WIDTH, 3, 3.0
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
                accel=1.8, ego=True, lane_width=lane_w)
    b.movers.insert(0, ego)
    b.vehicle(road.lane(+1, 1), s_lc + 35, 17.0, "truck")
    for i in range(lanes):
        v = 29.0 - 3.5 * i
        lane = road.lane(+1, i)
        b.traffic(lane, 10, s_e0 - 25, v, (30, 70))
        b.traffic(lane, s_lc + 60 if i == 1 else s_e0 + 40, length - 60, v, (40, 90))
        b.traffic(road.lane(-1, i), 10, length - 10, v, (35, 80))


def parking(b: Builder, spec: dict):
    rng, D = b.rng, b.D
    v_ego = float(rng.uniform(3.5, 5.0))
    lot_len = max(110.0, 20 + v_ego * D * 1.3 + 60)
    x0 = -20.0
    lot = np.array([[x0, -32], [lot_len, -32], [lot_len, 32], [x0, 32]], dtype=float)
    b.ground.append((ROAD, lot))
    b.ground.append((SIDEWALK, np.array([[x0, 32], [lot_len, 32], [lot_len, 36], [x0, 36]], dtype=float)))
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
    half = AISLE_LANE_WIDTH / 2
    ego_path = Path(np.array([[x0 + 2, -half], [lot_len + 60, -half]]))
    s_e0 = 8.0
    ego = Mover("car", (1.85, 4.08, 1.6), (255, 255, 255), ego_path, s_e0, v_ego * 0.6, v_ego, accel=1.2, ego=True,
                lane_width=AISLE_LANE_WIDTH)
    b.movers.insert(0, ego)
    # other cars: one ahead, some oncoming, one in a side aisle
    b.vehicle(ego_path, s_e0 + float(rng.uniform(25, 40)), v_ego * 0.8, "car")
    onc = Path(np.array([[lot_len + 60, half], [x0 - 60, half]]))
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
