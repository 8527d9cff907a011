"""Model-predictive control in the world model's latent space.

One decision: encode the context frames with the target encoder (``WorldModel.encode(obs, target=True)``), then
search 3 s of controls (6 key-frame steps of speed and yaw rate, ``motion.py``) with the sampling optimiser
(``optimizer.py``: CEM or MPPI). Every candidate is turned into the model's actions and rolled out from the context;
the cost heads read collision and drivable area off the predicted states, and the route command, progress, comfort
and jerk are read off the plan itself (``costs.py``). Only the route command comes from the future, as in the nuScenes
planning protocol. Receding horizon: the next decision starts from this plan (with ``optimizer.score_mean: false``,
from the search's final mean, which was not scored) shifted by the steps executed since
(and the first iteration also tries constant velocity, a full stop and, with ``resume_accel``, speeding up toward
the cruise speed at the IDM's pace: a search of a few candidates around a slow plan rarely draws that on its own;
with ``accel_decay``, keeping the ego's acceleration now, fading, whose jerk is then counted from it).
A decision keeps its plan's cost terms from the search rather than rolling the plan out again. Batched: ``decide``
plans ``B`` problems at once (open-loop evaluation plans many windows together), on the CPU or a GPU
(``PlanConfig.device``).

The API the closed-loop driver and evaluation call::

    planner = Planner(model, heads, cfg)           # or Planner(cfg=cfg, scene_cost=OracleCost(...)) without a model
    plan = planner.plan(obs_history, actions_history, "left")     # or plan_states(context, ...) with cached states
    plan.actions, plan.trajectory, plan.candidates, plan.cost, plan.latency_ms
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Mapping, Optional

import numpy as np
import torch

from drivejepa.planning.costs import Situation, command_violation, comfort, cruise_speed, jerk, progress
from drivejepa.planning.motion import (constant_velocity_controls, controls_to_actions, feasible, integrate,
                                       resume_controls, trend_controls)
from drivejepa.planning.optimizer import SamplingOptimizer, keep_best, shift
from drivejepa.planning.recovery import control_bounds
from drivejepa.planning.route import COMMANDS, command_index

log = logging.getLogger(__name__)
_LOGGED_PRECISIONS: set = set()     # (name, reason) of the precision decisions this process has logged


@dataclasses.dataclass
class Plan:
    """One decision, numpy arrays in the ego frame of the last context frame (x forward, y left)."""
    controls: np.ndarray               # [H, 2] speed (m/s), yaw rate (rad/s) per 0.5 s step
    actions: np.ndarray                # [H, 5] the model's actions (dx, dy, dyaw, speed, yaw_rate)
    trajectory: np.ndarray             # [H + 1, 3] x, y, yaw, from the origin
    candidates: np.ndarray             # [P, H + 1, 3] the last iteration's candidate trajectories
    candidate_costs: np.ndarray        # [P]
    cost: float
    terms: dict                        # unweighted cost terms of the plan
    command: str
    latency_ms: dict                   # encode, optimise, total
    evaluations: int                   # control sequences the search rolled out and scored


@dataclasses.dataclass
class Decisions:
    """``decide``'s answer for B problems (tensors)."""
    controls: torch.Tensor             # [B, H, 2]
    actions: torch.Tensor              # [B, H, 5]
    poses: torch.Tensor                # [B, H + 1, 3]
    cost: torch.Tensor                 # [B]
    terms: dict                        # name -> [B]
    candidates: torch.Tensor           # [B, P, H + 1, 3]
    candidate_costs: torch.Tensor      # [B, P]
    evaluations: int                   # control sequences the search scored per problem
    mean: torch.Tensor                 # [B, H, 2] the search's final sampling mean


def observation_history(arrays: Mapping, frames, camera_index=None) -> dict:
    """Shard-like arrays of key frames ``frames`` (oldest first) for :meth:`Planner.plan`: the sensor keys the
    encoder reads, per-frame ones sliced to those frames, per-camera calibration kept per camera, cameras picked and
    ordered by ``camera_index`` (the model's cameras in a shard's camera axis)."""
    from drivejepa.data.shards import PER_CAMERA, SENSOR_KEYS

    frames = np.asarray(frames)
    out = {}
    for key in SENSOR_KEYS:
        if key not in arrays:
            continue
        value = np.asarray(arrays[key]) if key in PER_CAMERA else np.asarray(arrays[key][frames])
        if camera_index is not None and (key in PER_CAMERA or key in ("images", "image_mask", "cam_to_key_ego")):
            value = value[camera_index] if key in PER_CAMERA else value[:, camera_index]
        out[key] = np.ascontiguousarray(value)
    return out


class Planner:
    """MPC over the world model (``model`` and its cost ``heads``), or over any ``scene_cost`` (a callable
    ``(situation, actions [B, P, H, 5], poses [B, P, H+1, 3]) -> {term: [B, P]}``, e.g. ``costs.OracleCost``).
    ``cfg`` is a ``config.PlanConfig``. The model and heads are moved to the planner's device."""

    def __init__(self, model=None, heads=None, cfg=None, *, scene_cost=None, device=None):
        from drivejepa.config import PlanConfig
        from drivejepa.planning.costs import LatentSceneCost
        from drivejepa.precision import choose_precision
        from drivejepa.runtime import select_device

        self.cfg = cfg if cfg is not None else PlanConfig()
        self.device = torch.device(device) if device is not None else select_device(self.cfg.device)
        self.model = model.to(self.device).eval() if model is not None else None
        if scene_cost is None:
            if model is None or heads is None:
                raise ValueError("a planner needs a world model and its cost heads, or a scene_cost")
            scene_cost = LatentSceneCost(self.model, heads.to(self.device).eval(), self.cfg)
        self.scene_cost = scene_cost
        self.precision = choose_precision(self.device, self.cfg.amp, setting="amp")
        decision = (self.precision.name, self.precision.reason)
        if self.model is not None and decision not in _LOGGED_PRECISIONS:     # once, not once per --plan-variant
            _LOGGED_PRECISIONS.add(decision)
            log.info("planning precision: %s (%s)", *decision)
        lower, upper = control_bounds(self.cfg.limits)
        self.optimizer = SamplingOptimizer(self.cfg.optimizer, lower, upper)
        self._previous: Optional[torch.Tensor] = None

    def reset(self) -> None:
        """Forget the previous plan (a new scenario starts)."""
        self._previous = None

    # ------------------------------------------------------------------------------------------------ one decision
    @torch.no_grad()
    def encode(self, obs_history: Mapping) -> torch.Tensor:
        """Context states ``[1, Tc, *S]`` of the frames of ``obs_history``: shard-like arrays of the model's cameras
        with a leading axis of Tc key frames, oldest first, each in its own key ego frame (per-camera calibration
        without that axis): what :func:`observation_history` gives."""
        from drivejepa.data.shards import PER_CAMERA
        from drivejepa.evaluation.latents import frames_as_obs

        if self.model is None:
            raise ValueError("this planner has no world model to encode observations with")
        frames = next(len(v) for k, v in obs_history.items() if k not in PER_CAMERA)
        obs = {k: v.to(self.device) for k, v in frames_as_obs(obs_history, np.arange(frames)).items()}
        with self.precision.autocast():
            return self.model.encode(obs, target=True).float()[None]

    def plan(self, obs_history: Optional[Mapping], actions_history, command, steps_since_last: int = 1) -> Plan:
        """Plan from the last ``Tc`` observed key frames (``obs_history``; None for a model-free scene cost) and the
        ego's past actions (``actions_history`` ``[n, 5]``, oldest first, the last one the motion into the current
        frame; at least the ``Tc - 1`` of the earlier context frames; those of the last ``reference_seconds`` give
        the cruise speed the progress term asks for). ``command``: left / straight / right. Warm
        starts from the previous plan shifted by ``steps_since_last`` key-frame steps."""
        start = time.perf_counter()
        context = self.encode(obs_history) if obs_history is not None else None
        self._sync()
        plan = self.plan_states(context, actions_history, command, steps_since_last)
        plan.latency_ms["encode"] = 1e3 * (time.perf_counter() - start) - plan.latency_ms["optimise"]
        plan.latency_ms["total"] = plan.latency_ms["encode"] + plan.latency_ms["optimise"]
        return plan

    def plan_states(self, context: Optional[torch.Tensor], actions_history, command,
                    steps_since_last: int = 1) -> Plan:
        """:meth:`plan` from context states ``[1, Tc, *S]`` already encoded (a closed-loop driver encodes each new
        frame once, ``encode`` of a one-frame history, and keeps the last ``Tc``)."""
        start = time.perf_counter()
        history = torch.tensor(np.array(actions_history, dtype=np.float32).reshape(-1, 5), device=self.device)
        past = None
        if context is not None and context.shape[1] > 1:
            if len(history) < context.shape[1] - 1:
                raise ValueError(f"{context.shape[1]} context frames need {context.shape[1] - 1} past actions, got "
                                 f"{len(history)}")
            past = history[len(history) - (context.shape[1] - 1):][None]
        speed = history[-1:, 3] if len(history) else torch.zeros(1, device=self.device)
        cruise = cruise_speed(history[None, :, 3], self.cfg) if len(history) else speed
        previous = history[-2:-1, 3] if len(history) >= 2 else None
        index = command_index(command)
        context = None if context is None else context.to(self.device)
        situation = Situation(speed, torch.tensor([index], device=self.device), context, past, cruise, previous)
        warm = None if self._previous is None else shift(self._previous, steps_since_last)
        decision = self.decide(situation, warm)
        self._sync()
        optimise = 1e3 * (time.perf_counter() - start)
        self._previous = decision.controls if self.cfg.optimizer.score_mean else decision.mean
        return Plan(controls=decision.controls[0].cpu().numpy(), actions=decision.actions[0].cpu().numpy(),
                    trajectory=decision.poses[0].cpu().numpy(), candidates=decision.candidates[0].cpu().numpy(),
                    candidate_costs=decision.candidate_costs[0].cpu().numpy(), cost=float(decision.cost[0]),
                    terms={k: float(v[0]) for k, v in decision.terms.items()}, command=COMMANDS[index],
                    latency_ms={"encode": 0.0, "optimise": optimise, "total": optimise},
                    evaluations=decision.evaluations)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------------------ B problems
    def evaluate(self, situation: Situation, controls: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Total cost ``[B, P]`` and its unweighted terms of candidate controls ``[B, P, H, 2]``."""
        cfg = self.cfg
        actions = controls_to_actions(controls, cfg.frame_seconds)
        poses = integrate(actions)
        with self.precision.autocast():
            terms = {name: value.float() for name, value in self.scene_cost(situation, actions, poses).items()}
        terms["progress"] = progress(poses, situation.cruise.to(poses), cfg)
        terms["command"] = command_violation(poses, situation.command, cfg)
        terms["comfort"] = comfort(controls, situation.speed_now, cfg.frame_seconds)
        accel_now = situation.accel_now(cfg.frame_seconds) if cfg.accel_decay > 0 else None
        terms["jerk"] = jerk(controls, situation.speed_now, cfg.frame_seconds, accel_now)
        total = sum(float(getattr(cfg.weights, name)) * value for name, value in terms.items())
        return total, terms

    @torch.no_grad()
    def decide(self, situation: Situation, warm_start: Optional[torch.Tensor] = None) -> Decisions:
        """Plan ``B`` problems at once, from ``warm_start`` ``[B, H, 2]`` (default: constant velocity)."""
        cfg = self.cfg
        dt, horizon = cfg.frame_seconds, cfg.horizon
        speed = situation.speed_now.to(self.device, torch.float32)

        def project(x):
            return feasible(x, speed[:, None], cfg.limits, dt)

        cv = constant_velocity_controls(speed, horizon)
        stop = feasible(torch.zeros_like(cv)[:, None], speed[:, None], cfg.limits, dt)[:, 0]
        anchors = [cv, stop]
        if cfg.resume_accel > 0:
            anchors.append(resume_controls(speed, situation.cruise.to(speed), cfg.resume_accel, horizon, dt))
        accel = situation.accel_now(dt)
        if cfg.accel_decay > 0 and accel is not None:
            anchors.append(trend_controls(speed, accel.to(speed), cfg.accel_decay, horizon, dt))
        mean = cv if warm_start is None else warm_start.to(cv)
        best = {"terms": None, "cost": None}      # the terms of the lowest-cost candidate, by the optimiser's rule

        def cost(controls):
            total, terms = self.evaluate(situation, controls)
            best["terms"], best["cost"] = keep_best(best["terms"], best["cost"], terms,
                                                    torch.nan_to_num(total, nan=float("inf")))
            return total

        result = self.optimizer.minimize(cost, mean, project=project, anchors=torch.stack(anchors, dim=1))
        actions = controls_to_actions(result.best, dt)
        return Decisions(controls=result.best, actions=actions, poses=integrate(actions), cost=result.best_cost,
                         terms=best["terms"], candidates=integrate(controls_to_actions(result.samples, dt)),
                         candidate_costs=result.costs, evaluations=result.evaluations, mean=result.mean)
