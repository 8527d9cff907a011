"""Collapse diagnostics for latent states: the numbers that tell a learning JEPA from a collapsed one.

A collapsed encoder maps every input to (nearly) the same point or to a line: per-dimension spread goes to zero and
the effective rank to one. A predictor that learned nothing beyond 'the world stays as it is' has an error ratio of
one against the copy-last-latent baseline.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


def effective_rank(latents: torch.Tensor, eps: float = 1e-12) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of the latents.

    1 for latents on a single line through the origin (including all-equal latents), up to min(N, D) for latents
    spread evenly over every direction."""
    z = _rows(latents)
    s = torch.linalg.svdvals(z)
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_diagnostics(latents: torch.Tensor, predictions: Optional[torch.Tensor] = None,
                         targets: Optional[torch.Tensor] = None, previous: Optional[torch.Tensor] = None) -> dict:
    """Diagnostics of latents ``[..., D]`` and, when given, of predictions against targets.

    - ``std_mean``/``std_min``: per-dimension standard deviation over the rows of ``latents``;
    - ``effective_rank``: see :func:`effective_rank`;
    - ``cosine``: mean cosine similarity of each prediction to its target;
    - ``error_ratio_vs_copy_last``: mean squared prediction error over that of predicting ``previous`` (the latent
      of the frame before each target); below 1 means the predictor beats copying the last latent.
    """
    z = _rows(latents)
    std = z.std(dim=0, unbiased=z.shape[0] > 1)
    out = {"std_mean": float(std.mean()), "std_min": float(std.min()), "effective_rank": effective_rank(z)}
    if predictions is not None and targets is not None:
        p, t = _rows(predictions), _rows(targets)
        if p.shape != t.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ")
        out["cosine"] = float(F.cosine_similarity(p, t, dim=-1).mean())
        err = float((p - t).pow(2).mean())
        out["pred_error"] = err
        if previous is not None:
            base = float((_rows(previous) - t).pow(2).mean())
            out["copy_last_error"] = base
            out["error_ratio_vs_copy_last"] = err / base if base > 0 else float("nan")
    return out
