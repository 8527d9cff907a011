"""One sampling optimiser over control sequences: the cross-entropy method (CEM) or MPPI, batched.

``minimize(cost, mean)`` searches ``B`` independent problems at once (windows of an evaluation, or one driving
decision): each iteration draws ``candidates`` sequences ``[B, P, H, D]`` around the current mean (the mean itself is
always one of them, so a warm start is never lost), clips them to the box bounds, moves them into the feasible set
(``project``), and asks ``cost`` for ``[B, P]`` (a NaN cost counts as infinite). CEM refits the mean and spread to
the ``elites`` best candidates (with ``momentum``); MPPI moves the mean to the average of the candidates weighted by
``exp(-(cost - min) / temperature)`` and keeps its sampling spread. The answer is the best sequence the cost was
evaluated on, the final mean included when ``score_mean`` (its cost is one more rollout, a batch of one after the last
iteration, about a fifth of the planner's decision on a 2-core CPU); the final mean is returned either way. Sampling
uses its own seeded ``torch.Generator`` on the device of the mean, so a run is reproducible on CPU and on CUDA, and
nothing else's random state is touched.

A candidate's deviation from the mean is, by default (``noise: walk``), a random walk over the steps scaled back to
the spread at each step (time-correlated noise, as iCEM samples it): a candidate speeds up, slows down or turns
smoothly. With independent noise per step (``white``) almost every candidate that leaves the mean jitters from
step to step and pays the jerk term, so the search could not leave constant velocity for a smooth
acceleration that costs less (a test checks the planner regains its cruise speed).

Receding horizon: :func:`shift` turns the previous decision's plan into the next one's starting mean (drop the step
that was executed, repeat the last).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class SearchResult:
    best: torch.Tensor                 # [B, H, D] the lowest-cost sequence evaluated
    best_cost: torch.Tensor            # [B]
    mean: torch.Tensor                 # [B, H, D] the final sampling mean
    samples: torch.Tensor              # [B, P, H, D] the last iteration's candidates
    costs: torch.Tensor                # [B, P] their costs
    evaluations: int                   # candidate sequences whose cost was computed, per problem


def shift(plan: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``[..., H, D]`` -> the same plan ``steps`` steps later: the first ``steps`` dropped, the last repeated."""
    if steps <= 0:
        return plan
    steps = min(steps, plan.shape[-2])
    tail = plan[..., -1:, :].expand(*plan.shape[:-2], steps, plan.shape[-1])
    return torch.cat([plan[..., steps:, :], tail], dim=-2)


class SamplingOptimizer:
    """CEM or MPPI (``cfg``: ``config.OptimizerConfig``) over sequences with per-dimension bounds ``lower``/``upper``
    (``[D]``) and an optional ``project(samples [B, P, H, D]) -> samples`` onto the feasible set."""

    def __init__(self, cfg, lower, upper, project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 generator: Optional[torch.Generator] = None):
        if cfg.method not in ("cem", "mppi"):
            raise ValueError(f"unknown optimiser method {cfg.method!r} (cem or mppi)")
        if cfg.noise not in ("walk", "white"):
            raise ValueError(f"unknown optimiser noise {cfg.noise!r} (walk or white)")
        self.cfg = cfg
        self.lower = torch.as_tensor(lower, dtype=torch.float32)
        self.upper = torch.as_tensor(upper, dtype=torch.float32)
        self.project = project
        self.generator = generator

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(int(self.cfg.seed))
        return self.generator

    def _feasible(self, x: torch.Tensor, project) -> torch.Tensor:
        x = torch.maximum(torch.minimum(x, self.upper.to(x)), self.lower.to(x))
        return project(x) if project is not None else x

    @torch.no_grad()
    def minimize(self, cost: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor,
                 std: Optional[torch.Tensor] = None, project=None, anchors: Optional[torch.Tensor] = None
                 ) -> SearchResult:
        """Minimise ``cost(samples [B, P, H, D]) -> [B, P]`` starting from ``mean`` ``[B, H, D]`` (and ``std``,
        default ``cfg.init_std`` per dimension). ``project`` replaces the optimiser's own for this call;
        ``anchors`` ``[B, A, H, D]`` are sequences the first iteration evaluates in place of as many random ones
        (the planner's constant-velocity plan and full stop)."""
        cfg = self.cfg
        project = self.project if project is None else project
        b, h, d = mean.shape
        p = int(cfg.candidates)
        gen = self._generator(mean.device)
        init = torch.as_tensor(cfg.init_std, dtype=mean.dtype, device=mean.device)
        std = init.expand(b, h, d).clone() if std is None else std.clone()
        floor = torch.as_tensor(cfg.min_std, dtype=mean.dtype, device=mean.device)
        mean = self._feasible(mean[:, None], project)[:, 0]
        best, best_cost = {"sequence": mean.clone()}, torch.full((b,), float("inf"), dtype=mean.dtype,
                                                                 device=mean.device)
        evaluations = 0
        samples = costs = None
        for it in range(int(cfg.iterations)):
            noise = torch.randn((b, p - 1, h, d), generator=gen, device=mean.device, dtype=mean.dtype)
            if cfg.noise == "walk":
                steps = torch.arange(1, h + 1, device=mean.device, dtype=mean.dtype)
                noise = noise.cumsum(dim=2) / steps.sqrt()[:, None]
            samples = torch.cat([mean[:, None], mean[:, None] + std[:, None] * noise], dim=1)
            if it == 0 and anchors is not None and anchors.shape[1]:
                a = min(anchors.shape[1], p - 1)
                samples = torch.cat([samples[:, :p - a], anchors[:, :a].to(samples)], dim=1)
            samples = self._feasible(samples, project)
            costs = torch.nan_to_num(cost(samples), nan=float("inf"))
            evaluations += p
            best, best_cost = keep_best(best, best_cost, {"sequence": samples}, costs)
            if cfg.method == "cem":
                k = min(int(cfg.elites), p)
                idx = costs.topk(k, dim=1, largest=False).indices
                elites = samples.gather(1, idx[:, :, None, None].expand(b, k, h, d))
                m = float(cfg.momentum)
                mean = m * mean + (1 - m) * elites.mean(dim=1)
                spread = elites.std(dim=1, unbiased=False) if k > 1 else std
                std = torch.maximum(m * std + (1 - m) * spread, floor)
            else:
                weights = torch.softmax(-(costs - costs.min(dim=1, keepdim=True).values) / cfg.temperature, dim=1)
                mean = (weights[:, :, None, None] * samples).sum(dim=1)
        final = self._feasible(mean[:, None], project)
        if cfg.score_mean:
            best, best_cost = keep_best(best, best_cost, {"sequence": final},
                                        torch.nan_to_num(cost(final), nan=float("inf")))
            evaluations += 1
        return SearchResult(best["sequence"], best_cost, final[:, 0], samples, costs, evaluations)


def keep_best(kept: Optional[dict], kept_cost: Optional[torch.Tensor], candidates: dict, costs: torch.Tensor):
    """Each problem's lowest-cost candidate so far: ``candidates`` a dict of ``[B, P, ...]`` tensors with costs
    ``[B, P]``; the first of a call's lowest replaces the kept one (a dict of ``[B, ...]``, its cost ``[B]``) only
    where strictly lower (``kept`` None: taken as it is). Returns the new (kept, kept_cost)."""
    i = costs.argmin(dim=1)
    rows = torch.arange(len(i), device=costs.device)
    lowest = costs[rows, i]
    picked = {name: value[rows, i] for name, value in candidates.items()}
    if kept is None:
        return picked, lowest
    better = lowest < kept_cost
    return ({name: torch.where(better.view(-1, *[1] * (value.dim() - 1)), value, kept[name])
             for name, value in picked.items()}, torch.where(better, lowest, kept_cost))
