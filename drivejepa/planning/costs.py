"""The planner's cost terms, each ``[B, P]`` for ``P`` candidate plans of ``B`` problems.

- ``collision`` and ``drivable``: the scene, read either from the world model's predicted states through the cost
  heads (:class:`LatentSceneCost`) or, for tests and upper bounds, from the true future boxes (:class:`OracleCost`).
  A predicted state ``k`` steps ahead is the model's guess of the encoder state at that key frame, whose grid lies in
  that frame's ego frame: the ego sits at the grid's origin, so the cost reads the cells under the ego's box there
  (plus ``collision_margin``). Collision is the highest occupancy probability under the box, drivable the mean
  non-drivable probability, each averaged over the steps.
- ``headway``: the gap the ego needs ahead at its planned speed, read from the same predicted occupancy. At step k the
  ego drives at v_k; the cells in its lane ahead of its box (``corridor``) up to ``headway_min_gap + headway_seconds
  * v_k`` count, each weighted by how far inside that gap it lies (1 at the bumper, 0 at the gap's end), and the term
  is the highest weighted occupancy over the cells and the steps: the IDM's desired gap, as a cost (the highest over
  the steps, not their mean, or a plan that drives through a car would pay less than one that stops short). It is
  what lets a planner brake before a collision rather than at it: no training frame has another agent under the
  ego, so the heads read the ego's own cells as free (their per-cell prior) whatever the rollout says; the cells
  ahead are where the heads were trained to see cars.
  The predictions are read with the heads' rollout set (fitted on the model's own rollouts), the floor below with
  their state set (fitted on encoder states).
  For the first ``headway_static_steps`` steps the term also reads the last observed state held still in the world
  and seen from the step's planned pose (the predictor's own geometric path, ``bev.warp``, without its learned
  change): the static-world assumption of occupancy-grid planners, a floor under what the rollout predicts (with
  ``headway_static_frames`` > 1, only what stood still over that many context frames; its gap has its own time,
  ``headway_static_seconds``). The rollouts of the demo checkpoint fade a car ahead out of the lane when the ego
  drives on, so without the floor the planner reads a clear road into a car it sees now. Over the whole horizon (the
  default) the floor takes every car ahead for a standing one, and the ego keeps long gaps behind moving traffic;
  over the first step alone (the IDM's own rule: keep the gap to what is there now) the calibrated heads' 0.2-0.3 on
  a car did not outweigh braking's comfort cost, and the planner rear-ended as often as without the floor
  (eval/experiments.md, closed loop).
  With ``headway_static_motion: lane`` the floor's lane moves on at the speed its occupancy moved over the last
  interval (:meth:`LatentSceneCost.lane_speed`), slowing at ``headway_static_brake`` until it stands: a car driving
  ahead is not a standing one. The largest open-loop errors of the default are plans that stop behind such a car
  while the log drove on; moved on without braking, the planner rear-ended leaders that braked (eval/experiments.md).
- ``progress``: the share of the reference distance (``reference_speed`` times the horizon; by default the ego's
  cruise speed: its highest speed over the last ``reference_seconds``, at least ``min_reference_speed``) that the
  plan falls short of. The cruise speed, not the current one: an ego that slowed behind a car wants its speed back
  once the lane clears.
- ``command``: the route as the nuScenes planning protocol gives it (:mod:`drivejepa.planning.route`): how far the end
  point at ``command_seconds`` lies on the wrong side of the command's lateral threshold, in thresholds.
- ``comfort``: mean squared acceleration and yaw acceleration in units of 2 m/s^2 and 0.5 rad/s^2; ``jerk``: mean
  squared longitudinal jerk in units of 4 m/s^3, the plan's first step counted against the ego's acceleration now.

The planner's total is the ``config.CostWeights``-weighted sum.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np
import torch

from drivejepa.boxes import boxes_overlap, ego_boxes
from drivejepa.models.bev import BevGrid
from drivejepa.planning.route import COMMAND_SIGN

ACCEL_UNIT, JERK_UNIT, YAW_ACCEL_UNIT = 2.0, 4.0, 0.5
LANE_BACKGROUND = 0.1          # lane occupancy below this is the heads' prior, not a car (lane_speed)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Situation:
    """What one decision knows, for ``B`` problems at once (nothing of the future but the route command)."""
    speed_now: torch.Tensor                        # [B] m/s: the last interval's speed
    command: torch.Tensor                          # [B] long: index into route.COMMANDS
    context: Optional[torch.Tensor] = None         # [B, Tc, *S] target-encoder states, oldest first
    past_actions: Optional[torch.Tensor] = None    # [B, Tc - 1, 5] actions of the earlier context frames
    cruise_speed: Optional[torch.Tensor] = None    # [B] m/s: the highest of the last reference_seconds (or speed_now)
    previous_speed: Optional[torch.Tensor] = None  # [B] m/s: the interval before's speed (the ego's acceleration now)

    @property
    def problems(self) -> int:
        return int(self.speed_now.shape[0])

    @property
    def cruise(self) -> torch.Tensor:
        return self.speed_now if self.cruise_speed is None else self.cruise_speed

    def accel_now(self, dt: float) -> Optional[torch.Tensor]:
        """``[B]`` m/s^2: the ego's acceleration over the last two intervals (None when the one before is unknown)."""
        if self.previous_speed is None:
            return None
        return (self.speed_now - self.previous_speed.to(self.speed_now)) / dt


def cruise_speed(speeds, cfg):
    """The ego's cruise speed from its past speeds ``[..., n]`` (oldest first; numpy or torch): the highest of the
    last ``reference_seconds`` (the last one alone when that is 0)."""
    n = max(1, round(cfg.reference_seconds / cfg.frame_seconds))
    return speeds[..., -n:].max(-1) if isinstance(speeds, np.ndarray) else speeds[..., -n:].amax(-1)


def accelerations(controls: torch.Tensor, speed_now: torch.Tensor, dt: float) -> torch.Tensor:
    """``[B, P, H, 2]`` controls -> ``[B, P, H]``: the longitudinal acceleration of each planned step, the first from
    the speed now ``[B]``."""
    v = torch.cat([speed_now[:, None, None].expand(*controls.shape[:2], 1), controls[..., 0]], dim=-1)
    return torch.diff(v, dim=-1) / dt


def comfort(controls: torch.Tensor, speed_now: torch.Tensor, dt: float) -> torch.Tensor:
    """``[B, P, H, 2]`` controls -> ``[B, P]``: mean squared acceleration and yaw acceleration of the plan (scaled)."""
    out = (accelerations(controls, speed_now, dt) / ACCEL_UNIT).pow(2).mean(-1)
    yaw_accel = torch.diff(controls[..., 1], dim=-1) / dt
    if yaw_accel.shape[-1]:
        out = out + (yaw_accel / YAW_ACCEL_UNIT).pow(2).mean(-1)
    return out


def jerk(controls: torch.Tensor, speed_now: torch.Tensor, dt: float,
         accel_now: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B, P, H, 2]`` controls -> ``[B, P]``: mean squared longitudinal jerk of the plan (scaled). With the ego's
    acceleration now (``accel_now`` ``[B]``) the plan's first step counts too: an ego that brakes and a plan that
    lets go of the brake at once is a jolt, not a comfortable constant speed."""
    accel = accelerations(controls, speed_now, dt)
    if accel_now is not None:
        accel = torch.cat([accel_now.to(accel)[:, None, None].expand(*accel.shape[:2], 1), accel], dim=-1)
    if accel.shape[-1] < 2:
        return torch.zeros(controls.shape[:2], dtype=controls.dtype, device=controls.device)
    return (torch.diff(accel, dim=-1) / dt / JERK_UNIT).pow(2).mean(-1)


def progress(poses: torch.Tensor, cruise: torch.Tensor, cfg) -> torch.Tensor:
    """``[B, P, H+1, 3]`` poses, cruise speeds ``[B]`` -> ``[B, P]``: share of the reference distance not covered (0
    when reached)."""
    steps = poses.shape[-2] - 1
    reference = cruise.clamp(min=cfg.min_reference_speed) if cfg.reference_speed <= 0 else \
        torch.full_like(cruise, float(cfg.reference_speed))
    distance = torch.diff(poses[..., :2], dim=-2).norm(dim=-1).sum(-1)
    target = reference * steps * cfg.frame_seconds
    return (1.0 - distance / target[:, None]).clamp(min=0.0)


def command_violation(poses: torch.Tensor, command: torch.Tensor, cfg) -> torch.Tensor:
    """``[B, P]``: how far (in thresholds) the lateral offset at ``command_seconds`` is on the wrong side of the
    command: left wants y > threshold, right y < -threshold, straight |y| <= threshold."""
    k = min(poses.shape[-2] - 1, max(1, round(cfg.command_seconds / cfg.frame_seconds)))
    y = poses[..., k, 1] / cfg.command_threshold
    sign = torch.as_tensor(COMMAND_SIGN, dtype=y.dtype, device=y.device)[command][:, None]
    turn = (1.0 - sign * y).clamp(min=0.0)
    straight = (y.abs() - 1.0).clamp(min=0.0)
    return torch.where(sign == 0, straight, turn)


def footprint(grid: int, grid_range: float, cfg, device=None) -> torch.Tensor:
    """Bool ``[G, G]``: cells of a bird's-eye grid whose centres lie under the ego's box at the origin (widened by
    ``collision_margin``); the four cells around the origin when the cells are larger than the box."""
    from drivejepa.evaluation.probes import grid_centers

    centres = torch.as_tensor(grid_centers(grid, grid_range), dtype=torch.float32)
    half_l = cfg.ego_length / 2 + cfg.collision_margin
    half_w = cfg.ego_width / 2 + cfg.collision_margin
    x = centres[:, 0] - cfg.ego_center_ahead
    inside = (x.abs() <= half_l) & (centres[:, 1].abs() <= half_w)
    if not inside.any():
        cell = 2.0 * grid_range / grid
        inside = (centres[:, 0].abs() <= cell) & (centres[:, 1].abs() <= cell)
    return inside.reshape(grid, grid).to(device)


def corridor(grid: int, grid_range: float, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The ego's lane ahead of its box at the origin: flat indices ``[M]`` of the cells whose centres lie within the
    box's half width (plus ``collision_margin``) and ahead of its front, up to the largest gap the limits allow
    (``headway_min_gap + headway_seconds * limits.max_speed``), and each one's distance ahead of the front ``[M]``."""
    from drivejepa.evaluation.probes import grid_centers

    centres = torch.as_tensor(grid_centers(grid, grid_range), dtype=torch.float32)
    ahead = centres[:, 0] - cfg.ego_center_ahead - cfg.ego_length / 2
    reach = cfg.headway_min_gap + cfg.headway_seconds * cfg.limits.max_speed
    inside = (ahead >= 0) & (ahead <= reach) & (centres[:, 1].abs() <= cfg.ego_width / 2 + cfg.collision_margin)
    cells = torch.nonzero(inside)[:, 0]
    return cells, ahead[cells]


class LatentSceneCost:
    """Collision, headway and drivable-area terms read from the model's rollout through the cost heads
    (``heads`` a ``heads.PlanningHeads``: its rollout set on the predictions, its state set on the static floor)."""

    def __init__(self, model, heads, cfg, chunk: int = 512):
        self.model, self.heads, self.cfg, self.chunk = model, heads, cfg, chunk
        self.cells = torch.nonzero(footprint(heads.spec.grid, heads.spec.bev_range, cfg).flatten())[:, 0]
        self.lane, self.ahead = corridor(heads.spec.grid, heads.spec.bev_range, cfg)
        self.grid = BevGrid(heads.spec.bev_size, heads.spec.bev_range)       # the states' grid
        self._said_lane_is_still = False

    def __call__(self, situation: Situation, actions: torch.Tensor, poses: torch.Tensor) -> dict:
        from drivejepa.planning.heads import TASKS
        from drivejepa.planning.rollouts import rollout_candidates

        if situation.context is None:
            raise ValueError("the latent scene cost needs the context states of the decision")
        cfg, under = self.cfg, len(self.cells)
        cells = torch.cat([self.cells, self.lane]).to(actions.device)
        ahead = self.ahead.to(actions.device)
        planned = poses.flatten(0, 1)                                           # [B*P, H+1, 3]
        speeds = actions[..., 3].clamp(min=0.0).flatten(0, 1)                  # [B*P, H]
        gaps = cfg.headway_min_gap + cfg.headway_seconds * speeds
        static_gaps = cfg.headway_min_gap + cfg.headway_static_seconds * speeds
        occ, free = TASKS.index("occupancy"), TASKS.index("drivable")
        p = actions.shape[1]
        k = min(int(cfg.headway_static_steps), actions.shape[2])
        travel = self.lane_travel(situation, k) if k > 0 else None

        def reduce(pred, rows):
            prob = torch.sigmoid(self.heads.rollouts.logits_at(pred, cells).float())   # [n, H, 2, cells]
            collision = prob[:, :, occ, :under].amax(-1).mean(-1)
            off_road = (1.0 - prob[:, :, free, :under]).mean(-1).mean(-1)
            inside = (1.0 - ahead / gaps[rows, :, None]).clamp(min=0.0)         # [n, H, lane cells]
            headway = (prob[:, :, occ, under:] * inside).amax(-1).amax(-1)
            if k > 0:
                problem = torch.arange(rows.start, rows.stop, device=pred.device) // p
                past = None if situation.past_actions is None else situation.past_actions[problem]
                seen_from = planned[rows, 1:k + 1]
                if travel is not None:                  # the lane seen from as far back as it moved on
                    seen_from = torch.cat([seen_from[..., :1] - travel[problem][..., None], seen_from[..., 1:]],
                                          dim=-1)
                floor = self.static_lane(situation.context[problem], past, seen_from)
                inside = (1.0 - ahead / static_gaps[rows, :k, None]).clamp(min=0.0)
                headway = torch.maximum(headway, (floor * inside).amax(-1).amax(-1))
            return torch.stack([collision, off_road, headway], dim=-1)

        terms = rollout_candidates(self.model, situation.context, situation.past_actions, actions, reduce,
                                   self.chunk)
        return {"collision": terms[..., 0], "drivable": terms[..., 1], "headway": terms[..., 2]}

    def lane_travel(self, situation: Situation, steps: int) -> Optional[torch.Tensor]:
        """``[B, steps]`` metres the floor's lane moves on by each of the first ``steps`` planned steps with
        ``headway_static_motion: lane`` (None otherwise, or without the context's past actions, said once): at
        :meth:`lane_speed`, but no faster than the ego's cruise speed (a leader faster than that opens the gap
        anyway, and a profile lined up one token too far would move away a car that is not leaving), slowing at
        ``headway_static_brake`` until it stands."""
        cfg = self.cfg
        if cfg.headway_static_motion != "lane":
            return None
        if situation.past_actions is None:
            if not self._said_lane_is_still:
                self._said_lane_is_still = True
                log.warning("headway_static_motion = lane reads how far the lane's occupancy moved between the last "
                            "two context frames, and these decisions have one (a Markov model, or no past actions): "
                            "the floor stays still")
            return None
        context = situation.context
        v = torch.minimum(self.lane_speed(context, situation.past_actions),
                          situation.cruise.to(context.device).float())[:, None]
        t = cfg.frame_seconds * torch.arange(1, steps + 1, device=context.device, dtype=v.dtype)
        brake = cfg.headway_static_brake
        t = torch.minimum(t, v / brake) if brake > 0 else t[None]
        return v * t - 0.5 * brake * t * t

    def lane_profiles(self, context: torch.Tensor, past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Occupancy of the lane ahead by distance (``[n, bins]`` of 1 m from the ego's front, the highest over the
        lane's width) in the last context state and in the one before held still in the world and seen from now."""
        from drivejepa import latent_space
        from drivejepa.models.bev import motion_matrix, warp
        from drivejepa.planning.heads import TASKS

        lane = self.lane.to(context.device)
        bins = self.ahead.to(context.device).floor().long()
        now = latent_space.targets(context[:, -1].float(), self.model.space)
        before = latent_space.targets(context[:, -2].float(), self.model.space)
        before, seen = warp(before, motion_matrix(past[:, -1, :3].float()), self.grid)
        profiles = []
        for state, visible in ((now, None), (before, seen)):
            prob = torch.sigmoid(self.heads.states.logits_at(state, lane)[:, TASKS.index("occupancy")].float())
            if visible is not None:
                prob = prob * visible[:, self.heads.states.token_of(lane)]
            profiles.append(prob.new_zeros(len(prob), int(bins.max()) + 1).scatter_reduce(
                1, bins.expand_as(prob), prob, "amax"))
        return profiles[0], profiles[1]

    def lane_speed(self, context: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """``[n]`` m/s, at least 0: how fast the occupancy of the lane ahead moved over the last interval (the
        shift of the lane's occupancy profile from the frame before, held still, to now that best lines its
        occupied metres up; 0 for an empty or standing lane). The static floor moves its lane on at this speed
        (``headway_static_motion: lane``): a car driving ahead is not a standing one."""
        if context.shape[1] < 2:
            return context.new_zeros(len(context))
        now, before = self.lane_profiles(context, past)
        now = (now - LANE_BACKGROUND).clamp(min=0.0)
        before = (before - LANE_BACKGROUND).clamp(min=0.0)
        most = min(now.shape[1] - 1, int(np.ceil(self.cfg.limits.max_speed * self.cfg.frame_seconds)))
        scores = torch.stack([(now[:, k:] * before[:, :now.shape[1] - k]).sum(-1) for k in range(most + 1)], -1)
        shift = scores.argmax(-1).float()
        return torch.where(scores.amax(-1) > 0, shift, torch.zeros_like(shift)) / self.cfg.frame_seconds

    def static_lane(self, context: torch.Tensor, past: Optional[torch.Tensor], poses: torch.Tensor) -> torch.Tensor:
        """Occupancy ``[n, H, lane cells]`` of what stood still over the last ``headway_static_frames`` context
        states (``context`` ``[n, Tc, N, C]``, ``past`` ``[n, Tc - 1, 5]`` the actions between them, or None): each
        state held still in the world and seen from each planned pose ``poses`` ``[n, H, 3]`` (x, y, yaw in the
        ego frame now, as ``motion.integrate`` gives them), and the lowest of their occupancies (a car that drove on
        is in one frame's place and not the other's; a cell out of a frame's view reads 0)."""
        from drivejepa import latent_space
        from drivejepa.models.bev import compose, motion_matrix, warp
        from drivejepa.planning.heads import TASKS

        n, h = poses.shape[:2]
        to_now = motion_matrix(poses.float())                                   # planned frame -> now
        frames = 1 if past is None else min(int(self.cfg.headway_static_frames), context.shape[1])
        lane = self.lane.to(poses.device)
        token = self.heads.states.token_of(lane)
        lowest, back = None, torch.eye(3, device=poses.device).expand(n, 3, 3)
        for j in range(1, frames + 1):                                          # the last frame first
            if j > 1:
                back = compose(motion_matrix(past[:, -(j - 1), :3].float()), back)   # now -> frame t-j+1
            base = latent_space.targets(context[:, -j].float(), self.model.space)
            warped, seen = warp(base.repeat_interleave(h, dim=0), compose(back[:, None], to_now).flatten(0, 1),
                                self.grid)
            prob = torch.sigmoid(self.heads.states.logits_at(warped, lane)[:, TASKS.index("occupancy")].float())
            prob = prob * seen[:, token]
            lowest = prob if lowest is None else torch.minimum(lowest, prob)
        return lowest.view(n, h, -1)


class OracleCost:
    """Collision from the true future: the share of steps at which the ego's box overlaps an annotated box.
    ``boxes`` ``[B, H, M, 5]`` planar boxes (x, y, yaw, length, width) in the ego frame of the decision, ``mask``
    ``[B, H, M]`` which are real. Knows the future: for tests and as an upper bound, never for a reported planner."""

    def __init__(self, boxes: torch.Tensor, mask: torch.Tensor, cfg):
        self.boxes, self.mask, self.cfg = boxes, mask.bool(), cfg

    def __call__(self, situation: Situation, actions: torch.Tensor, poses: torch.Tensor) -> dict:
        ego = ego_boxes(poses[:, :, 1:], self.cfg.ego_length, self.cfg.ego_width, self.cfg.ego_center_ahead)
        hit = boxes_overlap(ego[:, :, :, None, :], self.boxes[:, None].to(ego))        # [B, P, H, M]
        hit = (hit & self.mask[:, None].to(hit.device)).any(-1)
        return {"collision": hit.float().mean(-1)}
