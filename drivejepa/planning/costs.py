"""The planner's cost terms, each ``[B, P]`` for ``P`` candidate plans of ``B`` problems.

- ``collision`` and ``drivable``: the scene, read either from the world model's predicted states through the cost
  heads (:class:`LatentSceneCost`) or, for tests and upper bounds, from the true future boxes (:class:`OracleCost`).
  A predicted state ``k`` steps ahead is the model's guess of the encoder state at that key frame, whose grid lies in
  that frame's ego frame: the ego sits at the grid's origin, so the cost reads the cells under the ego's box there
  (plus ``collision_margin``). Collision is the highest occupancy probability under the box, drivable the mean
  non-drivable probability, each averaged over the steps.
- ``progress``: the share of the reference distance (``reference_speed`` times the horizon; by default the current
  speed, at least ``min_reference_speed``) that the plan falls short of.
- ``command``: the route as the nuScenes planning protocol gives it (:mod:`drivejepa.planning.route`): how far the end
  point at ``command_seconds`` lies on the wrong side of the command's lateral threshold, in thresholds.
- ``comfort``: mean squared acceleration, jerk and yaw acceleration in units of 2 m/s^2, 4 m/s^3 and 0.5 rad/s^2.

The planner's total is the ``config.CostWeights``-weighted sum.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from drivejepa.boxes import boxes_overlap, ego_boxes
from drivejepa.planning.route import COMMAND_SIGN

ACCEL_UNIT, JERK_UNIT, YAW_ACCEL_UNIT = 2.0, 4.0, 0.5


@dataclasses.dataclass
class Situation:
    """What one decision knows, for ``B`` problems at once (nothing of the future but the route command)."""
    speed_now: torch.Tensor                        # [B] m/s: the last interval's speed
    command: torch.Tensor                          # [B] long: index into route.COMMANDS
    context: Optional[torch.Tensor] = None         # [B, Tc, *S] target-encoder states, oldest first
    past_actions: Optional[torch.Tensor] = None    # [B, Tc - 1, 5] actions of the earlier context frames

    @property
    def problems(self) -> int:
        return int(self.speed_now.shape[0])


def comfort(controls: torch.Tensor, speed_now: torch.Tensor, dt: float) -> torch.Tensor:
    """``[B, P, H, 2]`` controls -> ``[B, P]``: mean squared acceleration, jerk and yaw acceleration (scaled)."""
    v = torch.cat([speed_now[:, None, None].expand(*controls.shape[:2], 1), controls[..., 0]], dim=-1)
    accel = torch.diff(v, dim=-1) / dt
    jerk = torch.diff(accel, dim=-1) / dt
    yaw_accel = torch.diff(controls[..., 1], dim=-1) / dt
    out = (accel / ACCEL_UNIT).pow(2).mean(-1)
    if jerk.shape[-1]:
        out = out + (jerk / JERK_UNIT).pow(2).mean(-1)
    if yaw_accel.shape[-1]:
        out = out + (yaw_accel / YAW_ACCEL_UNIT).pow(2).mean(-1)
    return out


def progress(poses: torch.Tensor, speed_now: torch.Tensor, cfg) -> torch.Tensor:
    """``[B, P, H+1, 3]`` poses -> ``[B, P]``: share of the reference distance not covered (0 when reached)."""
    steps = poses.shape[-2] - 1
    reference = speed_now.clamp(min=cfg.min_reference_speed) if cfg.reference_speed <= 0 else \
        torch.full_like(speed_now, float(cfg.reference_speed))
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


class LatentSceneCost:
    """Collision and drivable-area terms read from the model's rollout through the cost heads."""

    def __init__(self, model, heads, cfg, chunk: int = 512):
        self.model, self.heads, self.cfg, self.chunk = model, heads, cfg, chunk
        self.cells = torch.nonzero(footprint(heads.spec.grid, heads.spec.bev_range, cfg).flatten())[:, 0]

    def __call__(self, situation: Situation, actions: torch.Tensor, poses: torch.Tensor) -> dict:
        from drivejepa.planning.heads import TASKS
        from drivejepa.planning.rollouts import rollout_candidates

        if situation.context is None:
            raise ValueError("the latent scene cost needs the context states of the decision")
        cells = self.cells.to(actions.device)
        occ, free = TASKS.index("occupancy"), TASKS.index("drivable")

        def reduce(pred, rows):
            prob = torch.sigmoid(self.heads.logits_at(pred, cells))             # [n, H, 2, cells]
            collision = prob[:, :, occ].amax(-1).mean(-1)
            off_road = (1.0 - prob[:, :, free]).mean(-1).mean(-1)
            return torch.stack([collision, off_road], dim=-1)

        terms = rollout_candidates(self.model, situation.context, situation.past_actions, actions, reduce,
                                   self.chunk)
        return {"collision": terms[..., 0], "drivable": terms[..., 1]}


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
