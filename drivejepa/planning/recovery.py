"""Action recovery, the planning primitive: which actions does the model think lead to a given future?

From a window's context and the true future latent ``h`` steps ahead (1, 2 and 3 s), the sampling optimiser
(``optimizer.py``) searches the ``h``-step control sequence whose rollout ends nearest that latent
(``latent_space.distance`` in the model's space), and projected gradient descent through the model refines it.
The recovered controls are driven the planner's way (``motion.py``) and the end point compared with the true one
(the ego poses of the shard): the error in metres,
beside the error of constant-velocity extrapolation (the current speed held straight ahead). A model that follows
its actions recovers the motion that produced the future; one that ignores them can do no better than its prior.
Reported on factual windows and on branch windows: the branch frame of each counterfactual scene, where the ego
departs from what its past predicts.

The energy landscape draws the same latent distance over a grid of speed and yaw-rate changes applied to every
step of the true controls, the true controls at the centre (V-JEPA 2-AC's picture of whether a model's minimum sits at
the action taken).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from drivejepa.planning.motion import constant_velocity_controls, controls_to_actions, feasible, integrate
from drivejepa.planning.optimizer import SamplingOptimizer
from drivejepa.planning.rollouts import rollout_candidates

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Recovered:
    controls: torch.Tensor             # [B, h, 2] speed, yaw rate
    actions: torch.Tensor              # [B, h, 5]
    poses: torch.Tensor                # [B, h + 1, 3] in the ego frame of the last context frame
    distance: torch.Tensor             # [B] latent distance of the rollout's end to the goal


def control_bounds(limits) -> tuple[list[float], list[float]]:
    """Box bounds of (speed, yaw rate) from ``config.ControlLimits``."""
    return [0.0, -limits.max_yaw_rate], [limits.max_speed, limits.max_yaw_rate]


def endpoint_distance(model, context, past_actions, goal, actions, chunk: int = 512) -> torch.Tensor:
    """Latent distance ``[B, P]`` between the last step of the rollout under ``actions`` ``[B, P, h, 5]`` and
    ``goal`` ``[B, *S]`` (already in the model's space)."""
    from drivejepa import latent_space

    p = actions.shape[1]

    def reduce(pred, rows):
        problem = torch.arange(rows.start, rows.stop, device=pred.device) // p
        return latent_space.distance(pred[:, -1], goal.index_select(0, problem))

    return rollout_candidates(model, context, past_actions, actions, reduce, chunk)


def recover(model, context: torch.Tensor, past_actions: Optional[torch.Tensor], goal: torch.Tensor,
            speed_now: torch.Tensor, steps: int, cfg, chunk: int = 512) -> Recovered:
    """Search the ``steps``-step controls whose rollout from ``context`` ``[B, Tc, *S]`` ends nearest ``goal``
    ``[B, *S]`` (in the model's space). ``cfg`` is a ``config.PlanConfig``: its ``recovery`` section sets the
    candidates and iterations, its optimiser the method and spreads, ``limits`` the feasible controls; the search
    starts at constant velocity from ``speed_now`` ``[B]``."""
    dt = float(cfg.frame_seconds)
    opt_cfg = dataclasses.replace(cfg.optimizer, candidates=int(cfg.recovery.candidates),
                                  iterations=int(cfg.recovery.iterations),
                                  elites=min(int(cfg.optimizer.elites), int(cfg.recovery.candidates)),
                                  score_mean=True)          # an evaluation, not a latency budget
    lower, upper = control_bounds(cfg.limits)
    speed_now = speed_now.to(context.device, torch.float32)

    def project(x):
        return feasible(x, speed_now[:, None], cfg.limits, dt)

    def cost(samples):
        return endpoint_distance(model, context, past_actions, goal, controls_to_actions(samples, dt), chunk)

    start = constant_velocity_controls(speed_now, steps)
    result = SamplingOptimizer(opt_cfg, lower, upper, project).minimize(cost, start)
    best, distance = result.best, result.best_cost
    if cfg.recovery.gradient_steps > 0:
        refined = refine(model, context, past_actions, goal, best, project, cfg)
        d = cost(refined[:, None])[:, 0]
        better = d < distance
        best, distance = torch.where(better[:, None, None], refined, best), torch.where(better, d, distance)
    actions = controls_to_actions(best, dt)
    return Recovered(best, actions, integrate(actions), distance)


def refine(model, context, past_actions, goal, controls: torch.Tensor, project, cfg) -> torch.Tensor:
    """Projected Adam on ``controls`` ``[B, h, 2]`` through the model's rollout (the model's weights untouched;
    ``project`` takes ``[B, P, h, 2]``): the sampling search finds the basin, the gradient its bottom. Returns the
    controls of the lowest distance met."""
    from drivejepa import latent_space

    dt = float(cfg.frame_seconds)
    scale = torch.tensor([1.0, 0.1], device=controls.device)               # one step moves speed and yaw rate alike
    z = (controls / scale).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=cfg.recovery.gradient_lr)
    best, best_d = controls.detach().clone(), torch.full(controls.shape[:1], float("inf"), device=controls.device)
    for _ in range(int(cfg.recovery.gradient_steps)):
        x = z * scale
        with torch.enable_grad():
            pred = model.rollout(context, controls_to_actions(x, dt), past_actions)[:, -1]
            d = latent_space.distance(latent_space.predictions(pred.float(), model.space), goal)
        with torch.no_grad():
            better = d < best_d
            best = torch.where(better[:, None, None], x.detach(), best)
            best_d = torch.where(better, d.detach(), best_d)
        if not d.requires_grad:                           # a rollout that does not depend on the actions
            break
        (z.grad,) = torch.autograd.grad(d.sum(), z)
        opt.step()
        with torch.no_grad():
            z.copy_(project((z * scale)[:, None])[:, 0] / scale)
    return best


def energy_landscape(model, context, past_actions, goal, true_controls: torch.Tensor, cfg,
                     chunk: int = 512) -> dict:
    """Latent distance of the rollout's end to ``goal`` over a grid of speed and yaw-rate changes added to every step
    of ``true_controls`` ``[h, 2]`` (one problem: ``context`` ``[1, Tc, *S]``, ``goal`` ``[1, *S]``)."""
    r = cfg.recovery
    dv = np.linspace(-r.landscape_speed, r.landscape_speed, r.landscape_size)
    dw = np.linspace(-r.landscape_yaw_rate, r.landscape_yaw_rate, r.landscape_size)
    grid = torch.tensor(np.stack(np.meshgrid(dv, dw, indexing="ij"), -1).reshape(-1, 2), dtype=torch.float32,
                        device=true_controls.device)
    controls = true_controls[None] + grid[:, None, :]
    controls[..., 0] = controls[..., 0].clamp(min=0.0)
    actions = controls_to_actions(controls, float(cfg.frame_seconds))[None]
    dist = endpoint_distance(model, context, past_actions, goal, actions, chunk)[0]
    return {"speed_change": dv.tolist(), "yaw_rate_change": dw.tolist(),
            "distance": dist.reshape(len(dv), len(dw)).cpu().numpy().tolist(),
            "true_controls": true_controls.cpu().numpy().tolist()}


def plot_landscape(landscape: dict, path: str | Path, title: str) -> Path:
    """The energy landscape as a PNG (and the same numbers in a JSON beside it); the true action is marked at the
    centre, the grid's minimum with a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drivejepa.io import atomic_path, atomic_write_json

    dv, dw = np.asarray(landscape["speed_change"]), np.asarray(landscape["yaw_rate_change"])
    dist = np.asarray(landscape["distance"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    mesh = ax.pcolormesh(dw, dv, dist, shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="latent distance to the true future")
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=14, linestyle="", label="true action")
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    ax.plot([dw[j]], [dv[i]], marker="x", color="white", markersize=10, linestyle="", label="grid minimum")
    ax.set_xlabel("yaw-rate change (rad/s)")
    ax.set_ylabel("speed change (m/s)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    atomic_write_json(path.with_suffix(".json"), {"title": title, **landscape})
    return path


def recovery_errors(model, states: np.ndarray, windows, context: int, steps: int, cfg, space: str) -> dict:
    """Action recovery on the ``windows`` of one scene whose target-encoder states are ``states`` ``[T, *S]``:
    per window the recovered and constant-velocity end-point errors at ``steps`` (metres) and the latent distance
    reached by the search and by the logged actions."""
    from drivejepa import latent_space
    from drivejepa.planning.heads import model_device

    device = model_device(model)
    s = np.asarray(windows.start)
    offsets = np.arange(-context + 1, 1)
    ctx = torch.from_numpy(np.ascontiguousarray(states[s[:, None] + offsets[None, :]], dtype=np.float32)).to(device)
    goal = latent_space.targets(torch.from_numpy(np.ascontiguousarray(states[s + steps], dtype=np.float32)),
                                space).to(device)
    past = None
    if context > 1:
        past = torch.from_numpy(np.ascontiguousarray(windows.past[:, -(context - 1):], dtype=np.float32)).to(device)
    speed = torch.from_numpy(np.asarray(windows.speed_now, dtype=np.float32)).to(device)
    found = recover(model, ctx, past, goal, speed, steps, cfg)
    logged = torch.from_numpy(np.ascontiguousarray(windows.actions[:, None, :steps], dtype=np.float32)).to(device)
    true_distance = endpoint_distance(model, ctx, past, goal, logged)[:, 0]
    truth = windows.truth[:, steps, :2]
    cv = integrate(controls_to_actions(constant_velocity_controls(np.asarray(windows.speed_now, np.float64), steps),
                                       cfg.frame_seconds))[:, -1, :2]
    return {"recovered_m": np.linalg.norm(found.poses[:, -1, :2].cpu().numpy() - truth, axis=-1),
            "constant_velocity_m": np.linalg.norm(cv - truth, axis=-1),
            "distance_recovered": found.distance.cpu().numpy(), "distance_logged": true_distance.cpu().numpy()}
