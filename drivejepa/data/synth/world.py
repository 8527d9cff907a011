"""The synthetic world of one scene: ground surfaces, static structures, agents and how they move.

Everything is built in a flat local frame (metres, z up, ground at z = 0) and then shifted so that the whole scene
lies in positive global coordinates (the devkit's map mask puts global (0, 0) at the bottom-left map pixel).
Every sensor (lidar.py, camera.py, radar.py) sees the same :class:`World`: ground polygons with a material each, and
upright boxes (buildings, poles, walls, agents) whose poses come from one traffic simulation at 20 Hz.

Behaviour is what a world model has to learn and a constant-velocity guess gets wrong: drivers follow lane paths
with the intelligent driver model (IDM), brake behind vehicles and pedestrians in their path, stop at red lights,
slow down for curves; the ego vehicle does the same along a path that changes lanes or turns at an intersection.

The parts live in modules of their own: ``materials`` (materials and agent kinds), ``geometry`` (paths and roads),
``builder`` and ``layouts`` (what each of the three road layouts places), ``traffic`` (the IDM simulation),
``intent`` (the ego driver's speed choices) and ``scenarios`` (scenario table and tags). This module assembles them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from drivejepa.data.synth.builder import Builder
from drivejepa.data.synth.intent import ego_intent
from drivejepa.data.synth.layouts import lay_out
from drivejepa.data.synth.materials import AGENT_TYPES, GRASS, MARKING, MATERIALS, ROAD, SIDEWALK
from drivejepa.data.synth.scenarios import describe, scenario
from drivejepa.data.synth.traffic import DT, simulate

MAP_RESOLUTION = 0.1            # metres per map-mask pixel (the devkit's native resolution)
MAP_MARGIN = 100.0              # metres of map around the ego trajectory (lidar range is 80 m)
BODY_MARGIN = 0.04              # an agent's body is this much smaller than its annotation box on each side


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
    start: float = 0.0                 # scene time (s) of simulation step 0
    offset: Optional[np.ndarray] = None    # global = local frame + offset (the shift of ``place``)

    @property
    def steps(self) -> int:
        return self.agent_xy.shape[0]

    def state(self, t: float):
        """Interpolated (xy [A, 2], yaw [A], velocity [A, 2], active [A]) at time t seconds."""
        f = min(max((t - self.start) / DT, 0.0), self.steps - 1.0)
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


@dataclasses.dataclass
class Simulation:
    """A scene laid out and its traffic simulated in the scene's local frame, before it is placed in global
    coordinates: what a counterfactual branch (branches.py) resumes from."""
    number: int                        # scene number (1-based)
    spec: dict
    builder: Builder
    rng: np.random.Generator           # the layout's stream; the sun direction is drawn from it last
    S: np.ndarray                      # [K, M] arc lengths of the movers
    V: np.ndarray                      # [K, M] speeds
    A: np.ndarray                      # [K, M] active flags
    start: float                       # scene time (s) of step 0


def simulate_scene(scene_number: int, seed: int, duration: float, margin: float = 0.0) -> Simulation:
    """Lay out scene ``scene_number`` (1-based), deterministic in the seed, and simulate it from ``-margin`` to
    ``duration + margin`` seconds."""
    spec = scenario(scene_number)
    rng = np.random.default_rng(np.random.SeedSequence([seed, scene_number, 1]))
    b = Builder(rng, duration, spec)
    lay_out(b, spec)
    ego = b.movers[0]
    intent_rng = np.random.default_rng(np.random.SeedSequence([seed, scene_number, 2]))
    # On the highway nobody pulls up; a turning ego must still reach and clear its intersection within the scene.
    calm = spec["layout"] == "highway" or spec["maneuver"] in ("left", "right")
    ego.schedule += ego_intent(intent_rng, ego.v_desired, duration, calm=calm)
    S, V, A = simulate(b.movers, b.signals, duration + 2 * margin, start=-margin)
    return Simulation(scene_number, spec, b, rng, S, V, A, -margin)


def mover_tracks(movers: list, S: np.ndarray, V: np.ndarray, A: np.ndarray):
    """Positions [K, M, 2], headings, speeds and active flags [K, M] of movers at simulated arc lengths S."""
    K, M = S.shape
    xy, yaw, speed = np.zeros((K, M, 2)), np.zeros((K, M)), np.zeros((K, M))
    for i, m in enumerate(movers):
        x, y, h = m.path.at(np.minimum(S[:, i], m.path.length))
        xy[:, i, 0], xy[:, i, 1], yaw[:, i] = x, y, h
        speed[:, i] = V[:, i]
    return xy, yaw, speed, A.copy()


def build_world(scene_number: int, seed: int, duration: float, margin: float = 0.0) -> World:
    """Build scene ``scene_number`` (1-based) for ``duration`` seconds, deterministic in the seed, and simulate it
    from ``-margin`` to ``duration + margin`` (sensors that fire a little before the first key frame or after the last
    see the traffic move, not frozen)."""
    sim = simulate_scene(scene_number, seed, duration, margin)
    ego = sim.builder.movers[0]
    return place(sim, [mover_tracks(sim.builder.movers, sim.S, sim.V, sim.A)],
                 [ego.path.piece(ego.s0, ego.path.length, 10.0)])[0]


def place(sim: Simulation, tracks: list, ego_paths: list) -> list[World]:
    """One World per set of mover tracks (a scene and its counterfactual branches), all in one global frame with
    one map: shifted into positive coordinates around every ego trajectory, with the parked objects near any of the
    ego paths (``ego_paths``: points [N, 2], local frame) and the structures within reach of any ego trajectory."""
    b, spec, rng = sim.builder, sim.spec, sim.rng
    near_path = np.concatenate(ego_paths)
    statics = [st for st in b.statics if np.min(np.hypot(near_path[:, 0] - st.x, near_path[:, 1] - st.y)) < 120.0]
    M, n_static = len(b.movers), len(statics)
    placed = []
    for mxy, myaw, mspeed, mactive in tracks:
        K = mxy.shape[0]
        xy = np.zeros((K, M + n_static, 2))
        yaw = np.zeros((K, M + n_static))
        speed = np.zeros((K, M + n_static))
        active = np.ones((K, M + n_static), dtype=bool)
        xy[:, :M], yaw[:, :M], speed[:, :M], active[:, :M] = mxy, myaw, mspeed, mactive
        for j, st in enumerate(statics):
            xy[:, M + j] = (st.x, st.y)
            yaw[:, M + j] = st.yaw
        # walkers standing still keep their heading; unwrap for smooth interpolation
        placed.append((xy, np.unwrap(yaw, axis=0), speed, active))

    # shift into positive global coordinates around the ego trajectories
    ego_xy = np.concatenate([xy[:, 0] for xy, *_ in placed])
    lo = ego_xy.min(axis=0) - MAP_MARGIN
    hi = ego_xy.max(axis=0) + MAP_MARGIN
    shift = -lo
    size_px = np.ceil((hi - lo) / MAP_RESOLUTION).astype(int)
    W, H = int(size_px[0]), int(size_px[1])

    ground = []
    for mat, poly in b.ground:
        ground.append((mat, MATERIALS[mat].colours[0], poly + shift))
    structures = np.array([(x + shift[0], y + shift[1], cz, l, w, h, yw, mat)
                           for x, y, cz, l, w, h, yw, mat, _ in b.structures], dtype=np.float64).reshape(-1, 8)
    colours = np.array([c for *_, c in b.structures], dtype=np.uint8).reshape(-1, 3)
    # only structures that can matter: within lidar/camera reach of the ego trajectories
    if len(structures):
        ego_track = np.concatenate([xy[::10, 0] for xy, *_ in placed]) + shift
        d = np.min(np.hypot(structures[:, None, 0] - ego_track[None, :, 0],
                            structures[:, None, 1] - ego_track[None, :, 1]), axis=1)
        keep = d < 180.0
        structures, colours = structures[keep], colours[keep]

    agents = []
    for m in b.movers:
        agents.append(dict(kind=m.kind, category=AGENT_TYPES[m.kind][0], size=m.size, colour=m.colour,
                           material=AGENT_TYPES[m.kind][3], parked=False, ego=m.ego))
    for st in statics:
        agents.append(dict(kind=st.kind, category=AGENT_TYPES[st.kind][0], size=st.size, colour=st.colour,
                           material=AGENT_TYPES[st.kind][3], parked=st.parked, ego=False))

    grid = _rasterise(ground, W, H)
    mask = np.where(np.isin(grid, [ROAD, SIDEWALK, MARKING]), 255, 0).astype(np.uint8)
    sun_az = rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_az), np.sin(sun_az), 1.2])
    worlds = []
    for xy, yaw, speed, active in placed:
        world = World(name=f"scene-{sim.number:04d}", tags=[], weather=spec["weather"],
                      ground=ground, structures=structures, structure_colours=colours, agents=agents,
                      agent_xy=xy + shift, agent_yaw=yaw, agent_speed=speed, agent_active=active, ego_index=0,
                      map_mask=mask, material_grid=grid, sun=sun / np.linalg.norm(sun), start=sim.start,
                      offset=shift)
        world.tags = describe(world, spec, None if b.intersection is None else b.intersection + shift)
        worlds.append(world)
    return worlds


def _rasterise(ground, W: int, H: int) -> np.ndarray:
    """Ground material per map pixel (0.1 m), painted in the same order the cameras draw the polygons."""
    import cv2

    grid = np.full((H, W), GRASS, dtype=np.uint8)
    shift = 2
    for mat, _, poly in ground:
        px = np.stack([poly[:, 0] / MAP_RESOLUTION, H - poly[:, 1] / MAP_RESOLUTION], axis=1)
        cv2.fillPoly(grid, [np.round(px * (1 << shift)).astype(np.int32)], int(mat), lineType=cv2.LINE_8, shift=shift)
    return grid
