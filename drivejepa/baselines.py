"""The baselines every prediction is reported beside, defined once for validation (metrics.jsonl) and evaluation
(metrics.json).

Latent baselines take the context states of a window already in the comparison space (``latent_space.targets``),
``[..., Tc, N, C]`` oldest first, and predict the ``horizon`` future states ``[..., H, N, C]``:

- ``copy_last``: the last context state at every step ("nothing moves");
- ``warp_last``: the last context state warped by the true ego motions of the horizon ("nothing but the ego moves":
  the predictor's geometric path alone, drivejepa/models/bev.py; needs the future actions and the grid);
- ``constant_velocity``: ``z_t + k (z_t - z_{t-1})`` (needs two context states);
- ``mean_of_context``: the mean of the context states at every step.

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


TIME = -3          # the time axis of [..., T, N, C]


def copy_last(context: torch.Tensor, horizon: int) -> torch.Tensor:
    last = context.narrow(TIME, context.shape[TIME] - 1, 1)
    return last.expand(*context.shape[:TIME], horizon, *context.shape[TIME + 1:])


def warp_last(context: torch.Tensor, future_actions: torch.Tensor, grid) -> torch.Tensor:
    """The last context state ``[B, Tc, N, C]`` carried along the future ego motions ``[B, H, 5]`` (actions
    ``a_t..a_{t+H-1}``): step k is the state seen from frame t+k; cells that come into view keep the last state's
    token (what the edge of the grid usually looks like)."""
    from drivejepa.models.bev import compose, motion_matrix, warp

    steps = motion_matrix(future_actions[..., :3].double())                       # frame k+1 -> frame k
    transform = torch.eye(3, dtype=steps.dtype, device=steps.device).expand(context.shape[0], 3, 3)
    last = context[:, -1]
    out = []
    for k in range(future_actions.shape[1]):
        transform = compose(transform, steps[:, k])
        warped, seen = warp(last, transform.to(last.dtype), grid)
        out.append(torch.where(seen.unsqueeze(-1), warped, last))
    return torch.stack(out, dim=1)


def constant_velocity(context: torch.Tensor, horizon: int) -> torch.Tensor:
    if context.shape[TIME] < 2:
        raise ValueError("the constant-velocity baseline needs two context states")
    last = context.narrow(TIME, context.shape[TIME] - 1, 1)
    velocity = last - context.narrow(TIME, context.shape[TIME] - 2, 1)
    k = torch.arange(1, horizon + 1, dtype=context.dtype, device=context.device).view(horizon, 1, 1)
    return last + k * velocity


def mean_of_context(context: torch.Tensor, horizon: int) -> torch.Tensor:
    mean = context.mean(dim=TIME, keepdim=True)
    return mean.expand(*context.shape[:TIME], horizon, *context.shape[TIME + 1:])


def shuffled_sources(n: int, seed: int) -> np.ndarray:
    """Window ``i`` takes the actions of window ``perm[i]``: a seeded permutation of ``range(n)`` without a fixed
    point (Sattolo's algorithm: one cycle through every window). Identity when ``n < 2``: no baseline then."""
    perm = np.arange(n)
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))
        perm[i], perm[j] = perm[j], perm[i]
    return perm
