"""Who drives the ego in the closed loop: the :class:`Driver` protocol and the drivers that exist without a model.

A driver is asked once per key frame (0.5 s):

    reset(info: RunInfo) -> None                          a new scenario starts (clear warm starts, plans)
    act(history: list[dict], status: EgoStatus, command: str) -> Action | array [5] | array [K, 5]

``history`` holds one dict per key frame so far, oldest first, each with the shard's per-frame arrays
(observation.FRAME_KEYS: images uint8 [C, H, W, 3], image_mask, cam_to_key_ego, cam_timestamps, lidar [N, 5],
lidar_mask, radar [M, 6], radar_mask, ego_pose [4, 4], timestamps), built by the code that builds shards;
``window(history, status, n)`` stacks the last n into the [L, ...] layout of a WindowDataset item. ``status``
(simulator.EgoStatus) holds the realised past actions and the speed, yaw rate and acceleration they imply.
``command`` is 'left', 'straight' or 'right' (simulator.COMMANDS), the only thing a driver learns about the route.
The answer is the ego motion to the next key frame in the shard's action format (dx, dy, dyaw, speed, yaw_rate;
only dx, dy, dyaw steer, the other two follow from them as ``frames.action_from_motion`` builds them), or a plan of
K such actions whose first is executed (receding horizon), or an :class:`Action` that also carries the plan and the
candidates to draw.

Drivers here: the expert (the simulator's own IDM on the logged route, privileged: the upper bound), constant
velocity (repeats the last realised action), and :class:`CallableDriver`, the adapter through which an external
planner (the world-model planner, the ego-status MLP of drivejepa/planning/) drives. Drivers are named in a drive
config by kind (:data:`KINDS`) or by a ``factory`` (``module:function``, called with the spec's options).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Protocol, Union

import numpy as np

from drivejepa.errors import UserError


@dataclasses.dataclass
class Action:
    """A driver's answer at a key frame. ``motion`` [5]: the commanded action. ``plan`` [K, 3] and ``candidates``
    [N, K, 3]: poses (x, y, yaw) in this key frame's ego frame, drawn by ``drivejepa drive --render``. ``route``:
    privileged (the expert only): the ego drives its route by the traffic simulation's IDM this step."""
    motion: np.ndarray
    plan: Optional[np.ndarray] = None
    candidates: Optional[np.ndarray] = None
    route: bool = False


@dataclasses.dataclass
class RunInfo:
    """What a driver learns when a scenario starts. ``simulator`` is the ClosedLoop itself, given only to a driver
    whose ``privileged`` attribute is true; ``intrinsics`` gives the calibration a model needs with the frames."""
    scenario: Any
    cameras: list
    key_period: float
    simulator: Any = None
    intrinsics: Any = None      # () -> [C, 3, 3] the cameras' intrinsics as the shard stores them (once rendered)


class Driver(Protocol):
    name: str

    def reset(self, info: RunInfo) -> None: ...

    def act(self, history: list, status, command: str) -> Union[Action, np.ndarray]: ...


def as_action(answer) -> Action:
    """A driver's answer as an Action: an Action, a [5] action or a [K, 5] plan (its first action executes; the plan
    is drawn as the poses it integrates to)."""
    if isinstance(answer, Action):
        answer.motion = _checked(answer.motion)
        return answer
    arr = np.asarray(answer, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 5 and len(arr):
        from drivejepa.visualization.geometry import integrate_actions

        return Action(_checked(arr[0]), plan=integrate_actions(arr)[1:])
    return Action(_checked(arr))


def _checked(motion) -> np.ndarray:
    motion = np.asarray(motion, dtype=np.float64).reshape(-1)
    if motion.shape != (5,) or not np.isfinite(motion).all():
        raise ValueError(f"a driver's action must be 5 finite numbers (dx, dy, dyaw, speed, yaw_rate), got {motion}")
    return motion


def window(history: list, status, n: int) -> dict:
    """The last ``n`` key frames as a WindowDataset-style item of numpy arrays [n, ...] (fewer at the start of a
    run), with ``actions`` [n, 5] (the realised action after each frame; the last one, still undecided, zeros) and
    ``action_valid`` [n]."""
    frames = history[-n:]
    out = {key: np.stack([f[key] for f in frames]) for key in frames[0]}
    past = np.asarray(status.past_actions, dtype=np.float32).reshape(-1, 5)
    actions = np.zeros((len(frames), 5), np.float32)
    valid = np.zeros(len(frames), bool)
    m = len(frames) - 1
    if m:
        actions[:m] = past[-m:]
        valid[:m] = True
    out["actions"], out["action_valid"] = actions, valid
    return out


class Expert:
    """The simulator's own driver: the logged ego's IDM on its route, reacting to the closed-loop traffic (it
    reads the simulation's state: the upper bound). Its motion is what that IDM does over the next key frame, found
    by stepping a copy of the traffic (``PLAN_S`` ahead, the plan it draws); the simulator then lets the traffic
    drive the ego (``Action.route``)."""
    name = "expert"
    privileged = True
    PLAN_S = 3.0

    def reset(self, info: RunInfo) -> None:
        if info.simulator is None:
            raise ValueError("the expert driver needs the simulator (it is privileged)")
        self.sim = info.simulator

    def act(self, history: list, status, command: str) -> Action:
        from drivejepa.data.synth.traffic import DT
        from drivejepa.driving import motion
        from drivejepa.driving.simulator import KEY_PERIOD_S, KEY_STEPS
        from drivejepa.planning.motion import relative

        sim = self.sim
        fork = sim.traffic.copy()
        key = sim.ego_local[sim.k - 1]              # a driver acts one step after its key frame
        plan = []
        for _ in range(int(round(self.PLAN_S / DT)) - 1):
            fork.step()
            x, y, h = sim.route.at(min(fork.s[0], sim.route.length))
            plan.append(relative(key, (x, y, h)))
        plan = np.array(plan)
        return Action(motion.action_from_relative(plan[KEY_STEPS - 2], KEY_PERIOD_S), plan=plan, route=True)


class ConstantVelocity:
    """Repeats the last realised action (the ego keeps its speed and yaw rate); stands still before it has one.
    Its plan is that action repeated for ``PLAN_S``."""
    name = "constant_velocity"
    PLAN_S = 3.0

    def reset(self, info: RunInfo) -> None:
        self.repeat = max(1, int(round(self.PLAN_S / info.key_period)))

    def act(self, history: list, status, command: str) -> np.ndarray:
        past = np.asarray(status.past_actions).reshape(-1, 5)
        last = past[-1].astype(np.float64) if len(past) else np.zeros(5)
        return np.repeat(last[None], self.repeat, axis=0)


class CallableDriver:
    """An external planner as a driver: ``plan(history, status, command)`` returns an Action, a [5] action or a
    [K, 5] plan (see the module docstring); ``reset(info)`` (optional) is called when a scenario starts.

    This is how the world-model planner and the ego-status MLP of drivejepa/planning/ drive: a factory named in
    the drive config builds their model once per worker and returns ``CallableDriver(name, planner.act,
    planner.reset)``."""

    def __init__(self, name: str, plan: Callable, reset: Optional[Callable] = None):
        if not callable(plan):
            raise TypeError(f"driver {name!r}: plan must be callable, got {type(plan).__name__}")
        self.name, self._plan, self._reset = name, plan, reset

    def reset(self, info: RunInfo) -> None:
        if self._reset is not None:
            self._reset(info)

    def act(self, history: list, status, command: str):
        return self._plan(history, status, command)


KINDS: dict[str, Callable[..., Driver]] = {
    "expert": lambda name, **options: _named(Expert(), name),
    "constant_velocity": lambda name, **options: _named(ConstantVelocity(), name),
}


def _named(driver, name: str):
    driver.name = name
    return driver


def check_spec(spec) -> Callable:
    """The function that builds the driver of a config entry (config.DriverSpec); a UserError naming the driver
    when its kind is unknown or its factory cannot be imported."""
    if spec.kind == "factory":
        if ":" not in spec.factory:
            raise UserError(f"driver {spec.name!r}: factory must be 'module:function', got {spec.factory!r}")
        module, function = spec.factory.split(":", 1)
        try:
            make = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"driver {spec.name!r}: cannot import factory {spec.factory!r} ({exc})") from None
        if not callable(make):
            raise UserError(f"driver {spec.name!r}: factory {spec.factory!r} is not callable")
        return lambda name, **options: _named(make(**options), name)
    if spec.kind not in KINDS:
        raise UserError(f"driver {spec.name!r}: unknown kind {spec.kind!r} (known: {', '.join(sorted(KINDS))}, "
                        "factory)")
    return KINDS[spec.kind]


def build_driver(spec) -> Driver:
    """A driver from a config entry (config.DriverSpec: name, kind, factory, options)."""
    return check_spec(spec)(spec.name, **dict(spec.options))
