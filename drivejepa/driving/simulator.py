"""The closed-loop simulator: a synthetic scene driven by a driver instead of its logged ego, everyone else reacting.

A scenario is a scene of the synthetic world (its number and the world's seed, as ``drivejepa synth`` writes it) and
the key frame at which the driver takes over. Until then the scene is its logged self. From then on, at every key
frame (0.5 s):

1. the sensors a model consumes are rendered from where the ego is and turned into the shard's arrays
   (observation.py: the writer's renderers and ``frames.process_frame``);
2. the driver gets the observation history, the ego status (the realised past actions) and the route command
   (left / straight / right, from the route the logged ego drives, the way the nuScenes planning protocol gives it),
   and returns an action: the ego motion to the next key frame, in the shard's action format;
3. the simulation advances 10 steps of 20 Hz. The ego follows the commanded motion (motion.py: a curve from where it
   is to the commanded pose, reached exactly at the next key frame). Every other agent is stepped by the traffic
   simulation (data/synth/traffic.py) with the ego placed where it really is: IDM vehicles find their leader by
   position along their own path, so they brake behind the ego or yield to it wherever it drives.

Timing: a key frame's cameras fire up to 12 ms after its lidar (camera.trigger_offset_us), so the frame is observed
once the simulation has reached the step after it, and the driver's action takes over from that step: the first
50 ms after a key frame continue the previous motion (a 50 ms actuation latency), and the commanded pose is still
reached at the next key frame.

The world's frame, map and static objects are those of the logged scene (its map covers 100 m around the logged
ego's route); the expert driver (drivers.py) hands the ego back to the traffic simulation's own IDM on its route
(``Action.route``), which is how the closed loop with the expert reproduces the logged scene exactly.

A run ends at the scenario's last key frame, at the first step where the ego's box overlaps another agent's, or
when the ego's centre leaves the drivable area.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

from drivejepa.config import PreprocessConfig
from drivejepa.data.frames import compute_actions
from drivejepa.data.synth.branches import family
from drivejepa.data.synth.traffic import DT, Traffic
from drivejepa.data.synth.world import mover_tracks, place, simulate_scene
from drivejepa.data.synth.writer import DEFAULT_IMAGE_SIZE, KEY_PERIOD_US, SENSOR_MARGIN_S
from drivejepa.driving import motion, safety
from drivejepa.driving.observation import Observer
from drivejepa.errors import UserError
from drivejepa.planning.motion import compose, relative

KEY_PERIOD_S = KEY_PERIOD_US / 1e6
KEY_STEPS = int(round(KEY_PERIOD_S / DT))     # simulation steps per key frame
COMMAND_HORIZON_S = 3.0                       # the route command looks this far ahead along the route
COMMAND_LATERAL_M = 2.0                       # lateral offset (ego frame) beyond which the command is left / right
COMMANDS = ("left", "straight", "right")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A synthetic scene (``number``, 1-based, of the world written with ``seed``, ``samples`` key frames a scene,
    cameras stored at ``image_size``, ``branches`` / ``branch_points`` / ``branch_frames`` as ``drivejepa synth``
    was given them: a scene's branches share its map and global frame) driven from key frame ``start`` for
    ``steps`` key frames (0: to its end)."""
    number: int
    seed: int = 0
    start: int = 2
    samples: int = 40
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    steps: int = 0
    branches: int = 0
    branch_points: int = 1
    branch_frames: int = 8

    @property
    def name(self) -> str:
        return f"scene-{self.number:04d}"

    @property
    def last_frame(self) -> int:
        return self.samples - 1 if self.steps <= 0 else min(self.samples - 1, self.start + self.steps)

    def check(self) -> None:
        if self.number < 1:
            raise UserError(f"scenario {self.name}: scene numbers start at 1")
        if self.samples < 2:
            raise UserError(f"scenario {self.name}: a scene needs at least 2 key frames, got {self.samples}")
        if not 0 <= self.start < self.samples - 1:
            raise UserError(f"scenario {self.name}: start frame {self.start} must be in 0..{self.samples - 2} "
                            f"(the scene has {self.samples} key frames)")


@dataclasses.dataclass
class EgoStatus:
    """What the ego knows about itself at a key frame: the realised actions so far (shard format, [n, 5], oldest
    first) and the speed, yaw rate and acceleration they imply (the last interval's chord speed and yaw rate, the
    change of speed over the last two intervals)."""
    past_actions: np.ndarray
    speed: float
    yaw_rate: float
    acceleration: float

    @classmethod
    def from_actions(cls, actions: np.ndarray) -> "EgoStatus":
        actions = np.asarray(actions, dtype=np.float32).reshape(-1, 5)
        speed = float(actions[-1, 3]) if len(actions) else 0.0
        yaw_rate = float(actions[-1, 4]) if len(actions) else 0.0
        accel = float(actions[-1, 3] - actions[-2, 3]) / KEY_PERIOD_S if len(actions) > 1 else 0.0
        return cls(actions, speed, yaw_rate, accel)


@dataclasses.dataclass
class Decision:
    """One key frame of a run: the command the driver got, the action it returned and what it drew."""
    frame: int
    command: str
    action: np.ndarray                         # [5] commanded
    seconds: float                             # the driver's wall time for this decision
    plan: Optional[np.ndarray] = None          # [K, 3] the chosen plan (ego frame of this key frame)
    candidates: Optional[np.ndarray] = None    # [N, K, 3] the candidates it weighed


class ClosedLoop:
    """One scenario's closed loop (see the module docstring). ``cfg`` says which readings to render and how to turn
    them into arrays: the preprocessing config of the shards the driver's model was trained on."""

    def __init__(self, scenario: Scenario, cfg: PreprocessConfig):
        scenario.check()
        self.scenario, self.cfg = scenario, cfg
        duration = (scenario.samples - 1) * KEY_PERIOD_S
        self.sim = sim = simulate_scene(scenario.number, scenario.seed, duration, margin=SENSOR_MARGIN_S)
        self.movers = movers = sim.builder.movers
        self.route = movers[0].path
        self.lane_width = movers[0].lane_width       # metres: the route's lane (safety.out_of_lane)
        _, tracks, paths = family(sim, scenario.samples, scenario.seed, scenario.branches, scenario.branch_points,
                                  scenario.branch_frames)
        self.logged = place(sim, tracks, paths)[0]
        K, A, M = sim.S.shape[0], len(self.logged.agents), len(movers)
        self.offset = self.logged.offset
        self._xy = np.zeros((K, A, 2))
        self._yaw = np.zeros((K, A))                  # raw headings; the world holds them unwrapped over time
        self._speed = np.zeros((K, A))
        self._active = np.zeros((K, A), dtype=bool)
        self._xy[:, M:] = self.logged.agent_xy[:, M:]  # parked cars, barriers, cones: where the logged scene has them
        self._yaw[:, M:] = self.logged.agent_yaw[:, M:]
        self._active[:, M:] = True
        self.ego_local = np.zeros((K, 3))             # the ego's pose (x, y, yaw) in the scene's local frame
        self.lw = safety.agent_lw(self.logged)
        self.traffic = Traffic(movers, sim.builder.signals, start=sim.start)
        self.k = 0
        self._write_movers(0)
        self.ego_local[0] = self._route_pose(0)
        self.world = dataclasses.replace(self.logged)
        self._publish()
        self.observer = Observer(self.world, scenario.number, scenario.seed, scenario.image_size, cfg)
        self.frames: list[dict] = []
        self.decisions: list[Decision] = []
        self.end_reason = "end"
        self.collision_agent: Optional[int] = None
        self.end_step: Optional[int] = None
        self.observe_seconds: list[float] = []

    # ------------------------------------------------------------------------------------------------ bookkeeping
    def key_step(self, frame: int) -> int:
        """Simulation step of key frame ``frame``'s lidar time."""
        return int(round((frame * KEY_PERIOD_S - self.sim.start) / DT))

    def _route_pose(self, k: int) -> np.ndarray:
        return np.array([self._xy[k, 0, 0] - self.offset[0], self._xy[k, 0, 1] - self.offset[1], self._yaw[k, 0]])

    def _write_movers(self, k: int) -> None:
        tr = self.traffic
        xy, yaw, speed, active = mover_tracks(self.movers, tr.s[None], tr.v[None], tr.active[None])
        M = len(self.movers)
        self._xy[k, :M] = xy[0] + self.offset
        self._yaw[k, :M], self._speed[k, :M], self._active[k, :M] = yaw[0], speed[0], active[0]

    def _publish(self) -> None:
        """Point the world at the steps simulated so far (the sensors read it through World.state)."""
        n = self.k + 1
        w = self.world
        w.agent_xy, w.agent_speed, w.agent_active = self._xy[:n], self._speed[:n], self._active[:n]
        w.agent_yaw = np.unwrap(self._yaw[:n], axis=0)

    def _advance(self, pose: Optional[np.ndarray]) -> None:
        """One DT. ``pose`` None: the ego drives its route by the traffic simulation's IDM (the logged ego's
        behaviour); else the ego is placed at its current pose for the traffic and moves to ``pose`` (local)."""
        k = self.k
        if pose is None:
            self.traffic.step()
        else:
            x, y, yaw = self.ego_local[k]
            self.traffic.step(placed={0: (x, y, yaw, self._speed[k, 0])})
        self.k = k + 1
        self._write_movers(self.k)
        if pose is None:
            self.ego_local[self.k] = self._route_pose(self.k)
        else:
            self.ego_local[self.k] = pose
            self._xy[self.k, 0] = pose[:2] + self.offset
            self._yaw[self.k, 0] = pose[2]
            self._speed[self.k, 0] = np.hypot(*(pose[:2] - self.ego_local[k, :2])) / DT
            self._active[self.k, 0] = True
        self._publish()

    def _check(self) -> bool:
        """After a step: end the run on a collision or with the ego's centre off the drivable area."""
        hit = safety.collision(self.world, self.k, self.lw)
        if hit is not None:
            self.end_reason, self.collision_agent, self.end_step = "collision", hit, self.k
            return True
        if safety.road_state(self.world, self.k, self.lw)[1]:
            self.end_reason, self.end_step = "off road", self.k
            return True
        return False

    def _observe(self, frame: int) -> None:
        t0 = time.perf_counter()
        self.frames.append(self.observer.frame(frame))
        self.observe_seconds.append(time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------------ what drivers get
    def realised_actions(self) -> np.ndarray:
        """[F - 1, 5] the ego's actions between the key frames observed so far, built as the shards build them."""
        poses = [f["ego_pose"] for f in self.frames]
        stamps = [int(f["timestamps"]) for f in self.frames]
        actions, _ = compute_actions(poses, stamps)
        return actions[:-1]

    def status(self) -> EgoStatus:
        return EgoStatus.from_actions(self.realised_actions())

    def command(self, frame: int) -> str:
        """Left / straight / right: where the route goes over the next COMMAND_HORIZON_S, as the nuScenes planning
        protocol derives it from the logged future (lateral offset of that route point in the ego frame beyond
        COMMAND_LATERAL_M). The route point is as far along the route from the ego's projection onto it as the
        logged ego drove in that time from this key frame."""
        k = self.key_step(frame)
        pose = self.ego_local[k]
        s_now, _ = self.route.project(pose[:2])
        S = self.sim.S[:, 0]
        ahead = max(0.0, float(S[min(k + int(round(COMMAND_HORIZON_S / DT)), len(S) - 1)] - S[k]))
        x, y, _ = self.route.at(min(s_now + ahead, self.route.length))
        lateral = relative(pose, (x, y, 0.0))[1]
        return "left" if lateral >= COMMAND_LATERAL_M else "right" if lateral <= -COMMAND_LATERAL_M else "straight"

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, driver) -> "ClosedLoop":
        """Drive the scenario with ``driver`` (drivers.Driver) to its end; returns self (frames, decisions, world)."""
        from drivejepa.driving.drivers import RunInfo, as_action

        sc = self.scenario
        driver.reset(RunInfo(scenario=sc, cameras=list(self.cfg.cameras), key_period=KEY_PERIOD_S,
                             simulator=self if getattr(driver, "privileged", False) else None,
                             intrinsics=self.observer.intrinsics))
        # the logged scene up to the take-over: the ego on its route, each key frame observed when complete
        for frame in range(sc.start + 1):
            while self.k < self.key_step(frame) + 1:
                self._advance(None)
            self._observe(frame)
        for frame in range(sc.start, sc.last_frame):
            history = self.frames
            status = self.status()
            command = self.command(frame)
            t0 = time.perf_counter()
            action = as_action(driver.act(history, status, command))
            if action.route and not getattr(driver, "privileged", False):
                raise ValueError(f"driver {driver.name!r} asked for the route (Action.route) without being privileged")
            seconds = time.perf_counter() - t0
            self.decisions.append(Decision(frame, command, action.motion, seconds, action.plan, action.candidates))
            if self._apply(frame, action):
                break
            self._observe(frame + 1)
        return self

    def _apply(self, frame: int, action) -> bool:
        """Advance from the step after key frame ``frame`` to the step after the next one; True if the run ended."""
        k_key, k_next = self.key_step(frame), self.key_step(frame + 1)
        if action.route:
            poses = [None] * (k_next + 1 - self.k)
        else:
            target = compose(self.ego_local[k_key], action.motion)
            track = motion.hermite_track(self.ego_local[self.k], target, k_next - self.k)
            poses = list(track) + [motion.extend(track, self.ego_local[self.k])]
        for pose in poses:
            self._advance(pose)
            if self._check():
                return True
        return False

    def close(self) -> None:
        self.observer.close()
