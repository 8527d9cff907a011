"""Counterfactual branches: a scene replayed from a seeded key frame with another ego behaviour.

Each logged moment of a real drive has one future; the simulator can show the others. At a branch frame b the
traffic simulation is resumed from the parent's exact state one step after b's lidar time (so every sensor reading
of frames 0..b is the parent's) with the ego doing something else: brake to a stop, accelerate, change lane or take
another exit where the road allows it, slow down or hold its speed. Everyone else reacts as the simulation makes
them (IDM behind the ego, yielding, signals). The parent's own future is the "keep the intent" branch, so a branch
point with K futures writes K - 1 branch scenes; a behaviour the traffic makes indistinguishable from another
future (accelerating behind a leader) gives way to the next one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from drivejepa.boxes import boxes_overlap
from drivejepa.data.synth.geometry import Path
from drivejepa.data.synth.intent import speed_ramp
from drivejepa.data.synth.materials import MARKING, ROAD
from drivejepa.data.synth.scenarios import branch_tags
from drivejepa.data.synth.traffic import DT, simulate
from drivejepa.data.synth.world import MAP_RESOLUTION, Simulation, World, mover_tracks
from drivejepa.data.synth.writer import KEY_PERIOD_US, SENSOR_MARGIN_S

KEY_PERIOD_S = KEY_PERIOD_US / 1e6
MIN_PAST_FRAMES = 2             # a branch frame has at least this many key frames before it
MIN_SPEED = 2.0                 # m/s: the ego is moving at a branch frame (a stopped ego cannot brake)
SPEED_FIRST = ["brake", "accelerate"]
SPEED_LAST = ["slow down", "hold speed"]
MAX_BRANCHES = 1 + len(SPEED_FIRST) + len(SPEED_LAST)   # most futures a branch point offers everywhere (keep included)
DISTINCT = 0.5                  # metres: the least a branch's ego is away from every other future's at some key frame


@dataclasses.dataclass
class Branch:
    parent: str
    frame: int                  # last key frame shared with the parent
    behaviour: str
    index: int                  # position among the branches of its branch point (seeds its sensor noise)
    path: Path = None           # the ego's path from the branch on (None: the parent's)

    @property
    def name(self) -> str:
        return f"{self.parent}-b{self.frame:02d}-{self.behaviour.replace(' ', '-')}"


def branch_step(sim: Simulation, frame: int) -> int:
    """Simulation step from which a branch at key frame ``frame`` departs: one step after the frame's lidar time,
    after every camera of that frame has fired (the latest 12 ms after it)."""
    return int(round((frame * KEY_PERIOD_S - sim.start) / DT)) + 1


def plan(sim: Simulation, samples: int, points: int, frames: int, seed: int) -> list[list[Branch]]:
    """Candidate branches at up to ``points`` seeded branch frames where the ego moves, in order of preference:
    the speed changes first, then the lane changes and exits the road allows there, then gentler speed changes."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, sim.number, 5]))
    last = samples - 1 - frames
    eligible = [f for f in range(MIN_PAST_FRAMES, last + 1) if sim.V[branch_step(sim, f) - 1, 0] > MIN_SPEED]
    chosen = sorted(rng.choice(eligible, size=min(points, len(eligible)), replace=False)) if eligible else []
    name = f"scene-{sim.number:04d}"
    out = []
    for f in chosen:
        lateral = _lateral_options(sim, branch_step(sim, int(f)))
        options = [(b, None) for b in SPEED_FIRST] + lateral + [(b, None) for b in SPEED_LAST]
        out.append([Branch(name, int(f), behaviour, i, path) for i, (behaviour, path) in enumerate(options)])
    return out


def family(sim: Simulation, samples: int, seed: int, futures: int, points: int = 1, frames: int = 8):
    """What ``drivejepa synth --branches futures --branch-points points --branch-frames frames`` makes of a scene:
    its branches, the mover tracks of the scene and of each branch (the scene's first), and the ego paths that
    ``world.place`` frames them all around (one map and global frame for the family). ``futures`` 0: no branch."""
    ego = sim.builder.movers[0]
    parent = mover_tracks(sim.builder.movers, sim.S, sim.V, sim.A)
    taken, tracks = [], [parent]
    for candidates in (plan(sim, samples, points, frames, seed) if futures else []):
        end = (candidates[0].frame + frames) * KEY_PERIOD_S + SENSOR_MARGIN_S
        for br, t in grow(sim, parent, candidates, futures, end):
            taken.append(br)
            tracks.append(t)
    paths = [ego.path.piece(ego.s0, ego.path.length, 10.0)] + [br.path.piece(0, br.path.length, 10.0)
                                                              for br in taken if br.path is not None]
    return taken, tracks, paths


def grow(sim: Simulation, parent: tuple, candidates: list[Branch], futures: int, end_time: float) -> list[tuple]:
    """(branch, tracks) of the first ``futures - 1`` candidates whose ego ends up somewhere else: at some key frame
    at least DISTINCT metres from the parent's ego and every branch taken before (an accelerating ego stuck behind a
    leader is keeping its intent, not a future of its own)."""
    taken: list[tuple] = []
    egos = [parent[0][:, 0]]
    for br in candidates:
        if len(taken) == futures - 1:
            break
        t = tracks(sim, parent, br, end_time)
        k = branch_step(sim, br.frame)
        keys = np.arange(k - 1, len(t[0]), int(round(KEY_PERIOD_S / DT)))
        if all(np.hypot(*(t[0][keys, 0] - other[keys]).T).max() >= DISTINCT for other in egos):
            taken.append((br, t))
            egos.append(t[0][:, 0])
    return taken


def tracks(sim: Simulation, parent: tuple, branch: Branch, end_time: float) -> tuple:
    """Mover tracks of ``branch`` up to scene time ``end_time``: the parent's up to the departure step, then the
    resumed simulation."""
    k = branch_step(sim, branch.frame)
    ego = sim.builder.movers[0]
    state = [sim.S[k].copy(), sim.V[k].copy(), sim.A[k].copy()]
    t0 = sim.start + k * DT
    steps = int(round((end_time - t0) / DT))
    v_now, v_nominal = float(sim.V[k, 0]), float(ego.v_desired)
    new = dataclasses.replace(ego)
    horizon = (t0 - 1.0, end_time + 1.0)
    if branch.path is not None:
        new.path, state[0][0] = branch.path, 0.0
        new.stop_lines = _moved_stop_lines(ego, branch.path)
    elif branch.behaviour == "brake":
        new.schedule = _ramp(t0, v_now, 0.0, 3.5, horizon[1])
    elif branch.behaviour == "accelerate":
        new.schedule = [(*horizon, 1.4 * max(v_now, v_nominal) + 1.0)]
    elif branch.behaviour == "slow down":
        new.schedule = _ramp(t0, v_now, 0.5 * v_now, 2.5, horizon[1])
    elif branch.behaviour == "hold speed":
        new.schedule = [(*horizon, v_now)]
    else:
        raise ValueError(f"unknown behaviour {branch.behaviour!r}")
    movers = [new] + sim.builder.movers[1:]
    S, V, A = simulate(movers, sim.builder.signals, steps * DT, start=t0, state=state)
    future = mover_tracks(movers, S, V, A)
    return tuple(np.concatenate([p[:k + 1], f[1:]]) for p, f in zip(parent, future))


def finish(world: World, sim: Simulation, branch: Branch) -> None:
    """Name and tag a placed branch world: what it is, and whether its ego collides or leaves the road."""
    world.name = branch.name
    world.tags = world.tags + branch_tags(branch.parent, branch.frame, branch.behaviour)
    k = branch_step(sim, branch.frame)
    if _collides(world, k):
        world.tags.append("collision")
    if _leaves_road(world, k):
        world.tags.append("off road")


def _ramp(t0: float, v0: float, v1: float, rate: float, t_end: float) -> list:
    """Schedule entries that take the desired speed from v0 to v1 at ``rate`` m/s^2, then hold v1 until t_end."""
    entries, ramp = speed_ramp(t0, v0, v1, rate, 0.25)
    return entries + [(t0 + ramp, t_end, v1)]


def _lateral_options(sim: Simulation, k: int) -> list[tuple[str, Path]]:
    """(behaviour, new ego path) for the lane changes and intersection exits the road allows at step k."""
    b = sim.builder
    ego = b.movers[0]
    s_e = float(min(sim.S[k, 0], ego.path.length))
    x, y, h = ego.path.at(s_e)
    here = np.array([x, y])
    v = float(sim.V[k, 0])
    length = max(30.0, 3.5 * v)                          # a lane change takes about 3.5 s
    out = []
    for road in b.roads:
        s_c, d_c = road.center.project(here)
        hc = road.center.at(s_c)[2]
        align = np.cos(h - hc)
        if abs(align) < 0.9 or not 1.0 < s_c < road.center.length - 1.0:
            continue
        direction = 1 if align > 0 else -1
        right = -direction * d_c                         # metres right of the centre line, in travel direction
        lane = int(np.floor(right / road.lane_w))
        if not 0 <= lane < road.lanes or abs(right - (lane + 0.5) * road.lane_w) > 0.6:
            continue
        reach = (s_c, s_c + direction * (length + 15.0))
        clear = not any(min(reach) < g1 and g0 < max(reach) for g0, g1 in road.mark_gaps)
        follows = all(abs(-direction * road.center.project(ego.path.at(min(s_e + u, ego.path.length))[:2])[1]
                          - (lane + 0.5) * road.lane_w) < 0.5 for u in np.arange(0.0, length + 15.0, 5.0))
        if clear and follows:
            for side, target in (("left", lane - 1), ("right", lane + 1)):
                if 0 <= target < road.lanes:
                    path = _departure(road.lane(direction, target), here, length)
                    if path is not None:
                        out.append((f"lane change {side}", path))
        j = b.junction
        if j is not None and road is j.main and direction > 0 and s_c < j.stop - 5.0:
            taken = _exit_taken(ego.path, j)
            for exit in j.exits(lane):
                if exit != taken:
                    path = _departure(j.path(lane, exit), here, 10.0)
                    if path is not None:
                        out.append(("go straight" if exit == "straight" else f"take exit {exit}", path))
    return out


def _exit_taken(path: Path, junction) -> str:
    """Which way ``path`` leaves the junction: the exit whose path passes nearest 40 m past its centre."""
    cx, cy, _ = junction.main.center.at(junction.s_int)
    s = path.project(np.array([cx, cy]))[0]
    probe = np.array(path.at(min(s + 40.0, path.length))[:2])
    dist = {}
    for lane in range(junction.main.lanes):
        for exit in junction.exits(lane):
            dist[exit] = min(dist.get(exit, np.inf), abs(junction.path(lane, exit).project(probe)[1]))
    return min(dist, key=dist.get)


def _departure(target: Path, here: np.ndarray, length: float):
    """A path from ``here`` that blends onto ``target`` over ``length`` metres and follows it (None if the target
    ends too soon)."""
    s_q, d = target.project(here)
    if s_q + length + 20.0 > target.length:
        return None
    u = np.arange(0.0, length + 1e-9, 1.0)
    x, y, h = target.at(s_q + u)
    w = 0.5 * (1 + np.cos(np.pi * u / length)) * d
    blend = np.stack([x - np.sin(h) * w, y + np.cos(h) * w], axis=1)
    return Path(np.concatenate([blend, target.piece(s_q + length, target.length, 1.0)[1:]]))


def _moved_stop_lines(ego, path: Path) -> list:
    """The ego's stop lines where they lie on its new path (those within a lane width of it)."""
    out = []
    for s, group in ego.stop_lines:
        s_new, d = path.project(np.array(ego.path.at(s)[:2]))
        if abs(d) < 5.0 and 0.0 < s_new < path.length - 0.1:
            out.append((s_new, group))
    return out


def _collides(world: World, k0: int) -> bool:
    """Whether the ego's box overlaps another agent's box at any simulation step after k0 (separating axes)."""
    e = world.ego_index
    w_e, l_e, _ = world.agents[e]["size"]
    sizes = np.array([a["size"][:2] for a in world.agents])
    for k in range(k0 + 1, world.steps, 2):
        xy, yaw, active = world.agent_xy[k], world.agent_yaw[k], world.agent_active[k]
        near = active & (np.hypot(*(xy - xy[e]).T) < 12.0)
        near[e] = False
        others = np.flatnonzero(near)
        ego = np.array([*xy[e], yaw[e], l_e, w_e])
        if boxes_overlap(ego, np.column_stack([xy[others], yaw[others], sizes[others, 1], sizes[others, 0]])).any():
            return True
    return False


def _leaves_road(world: World, k0: int) -> bool:
    """Whether the ego's centre leaves the asphalt (road or marking) at any simulation step after k0."""
    H, W = world.material_grid.shape
    xy = world.agent_xy[k0 + 1:, world.ego_index]
    col = np.clip((xy[:, 0] / MAP_RESOLUTION).astype(int), 0, W - 1)
    row = np.clip((H - xy[:, 1] / MAP_RESOLUTION).astype(int), 0, H - 1)
    return bool((~np.isin(world.material_grid[row, col], [ROAD, MARKING])).any())
