"""The world model rolled out under many candidate action sequences from one context per problem.

States are never flattened or indexed in their trailing dims (``[..., N, C]`` grids of tokens, or any other state
shape): the ``B`` problems and ``P`` candidates are merged into the model's batch axis and split again, in chunks of
at most ``chunk`` sequences so that memory stays bounded.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


@torch.no_grad()
def rollout_candidates(model, context: torch.Tensor, past_actions: Optional[torch.Tensor], actions: torch.Tensor,
                       reduce: Callable[[torch.Tensor, slice], torch.Tensor], chunk: int = 512) -> torch.Tensor:
    """Roll ``model`` out from ``context`` ``[B, Tc, *S]`` (with ``past_actions`` ``[B, Tc-1, 5]`` or None) under
    ``actions`` ``[B, P, H, 5]``; ``reduce(pred [n, H, *S] in the model's latent space, rows)`` turns each chunk of
    predictions into what the caller keeps (``rows`` indexes the flattened B * P candidates of the chunk).
    Returns the reduced values concatenated and reshaped to ``[B, P, ...]``."""
    from drivejepa import latent_space

    b, p = actions.shape[:2]
    flat = actions.reshape(b * p, *actions.shape[2:])
    out = []
    for lo in range(0, b * p, chunk):
        rows = slice(lo, min(b * p, lo + chunk))
        problem = torch.arange(rows.start, rows.stop, device=actions.device) // p
        ctx = context.index_select(0, problem)
        past = None if past_actions is None else past_actions.index_select(0, problem)
        pred = model.rollout(ctx, flat[rows], past)
        out.append(reduce(latent_space.predictions(pred.float(), model.space), rows))
    values = torch.cat(out)
    return values.reshape(b, p, *values.shape[1:])
