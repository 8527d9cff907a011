"""The baselines every prediction is reported beside, defined once for validation (metrics.jsonl) and evaluation
(metrics.json).

Latent baselines take the context latents of a window already in the comparison space (``latent_space.targets``),
``[..., Tc, D]`` oldest first, and predict the ``horizon`` future latents ``[..., H, D]``:

- ``copy_last``: the last context latent at every step ("nothing moves");
- ``constant_velocity``: ``z_t + k (z_t - z_{t-1})`` (needs two context latents);
- ``mean_of_context``: the mean of the context latents at every step.

The shuffled-action baseline rolls the predictor out from a window's own context latents with the actions of
another window, past and future alike (``a_{t-Tc+1}..a_{t+H-1}``, every action the predictor is given), so its
error over the true-action error measures how much the predictions use the actions at all. The other window is
``shuffled_sources(n, seed)[i]`` for window ``i`` of the evaluated set in its fixed order: a seeded derangement
(every window gets another's actions). Evaluation deranges the windows it evaluates (every window of the split);
validation deranges the validation set's windows (``WindowDataset(shuffle_actions_seed=...)`` attaches the source
window's actions to each item), so each validation window's partner does not depend on the batch, the number of
ranks or the loader's order, and validation stays streamable over DDP ranks.
"""
from __future__ import annotations

import numpy as np
import torch


def copy_last(context: torch.Tensor, horizon: int) -> torch.Tensor:
    return context[..., -1:, :].expand(*context.shape[:-2], horizon, context.shape[-1])


def constant_velocity(context: torch.Tensor, horizon: int) -> torch.Tensor:
    if context.shape[-2] < 2:
        raise ValueError("the constant-velocity baseline needs two context latents")
    last = context[..., -1:, :]
    velocity = last - context[..., -2:-1, :]
    k = torch.arange(1, horizon + 1, dtype=context.dtype, device=context.device).view(horizon, 1)
    return last + k * velocity


def mean_of_context(context: torch.Tensor, horizon: int) -> torch.Tensor:
    mean = context.mean(dim=-2, keepdim=True)
    return mean.expand(*context.shape[:-2], horizon, context.shape[-1])


def shuffled_sources(n: int, seed: int) -> np.ndarray:
    """Window ``i`` takes the actions of window ``perm[i]``: a seeded permutation of ``range(n)`` without a fixed
    point (Sattolo's algorithm: one cycle through every window). Identity when ``n < 2``: no baseline then."""
    perm = np.arange(n)
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm
