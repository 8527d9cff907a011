"""The latent space in which a prediction is compared with its target: one definition for every stage.

The space follows the training objective (``space_of``):

- ``layer_norm`` (JEPA with ``loss.normalize_targets``): targets are the target encoder's latents layer-normalised
  over the latent dimension (no affine), so the regression cannot reach zero by shrinking them;
- ``raw`` (JEPA without it): the target encoder's latents as they are;
- ``unit`` (InfoNCE): unit vectors; the contrastive loss sees only directions, so that is all it trains.

``targets`` puts encoder latents (targets, and the context the baselines extrapolate) into the space;
``predictions`` puts the predictor's outputs there (only ``unit`` changes them: a JEPA prediction is trained to equal
its target as it is). The predictor's residual base is ``targets`` of its input states, so an untrained predictor is
copy-last in the space used. ``distance`` is the squared error that validation (best.pt), evaluation (metrics.json)
and visualisation all report. Training (``WorldModel.loss``), validation (``training/validation.py``), evaluation
(``evaluation/``) and rendering (``visualization/``) call these functions and nothing else; the model carries its
space (``WorldModel.space``), so a checkpoint is always compared in the space it was trained in.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPACES = ("layer_norm", "raw", "unit")


def space_of(loss_cfg) -> str:
    """The space of a training objective (``LossConfig``)."""
    if loss_cfg.objective == "infonce":
        return "unit"
    return "layer_norm" if loss_cfg.normalize_targets else "raw"


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Layer norm without affine over the last (latent) dimension."""
    return F.layer_norm(x, x.shape[-1:])


def check(space: str) -> str:
    if space not in SPACES:
        raise ValueError(f"unknown latent space '{space}' (one of {', '.join(SPACES)})")
    return space


def targets(latents, space: str):
    """Encoder latents ``[..., D]`` (tensor, or numpy array: float32 numpy back) in ``space``."""
    check(space)
    if isinstance(latents, np.ndarray):
        return targets(torch.from_numpy(np.asarray(latents, dtype=np.float32)), space).numpy()
    if space == "layer_norm":
        return layer_norm(latents)
    if space == "unit":
        return F.normalize(latents, dim=-1)
    return latents


def predictions(pred, space: str):
    """Predictor outputs ``[..., D]`` (tensor or numpy array) in ``space`` (only unit vectors change them)."""
    check(space)
    if isinstance(pred, np.ndarray):
        return predictions(torch.from_numpy(np.asarray(pred, dtype=np.float32)), space).numpy()
    return F.normalize(pred, dim=-1) if space == "unit" else pred


def distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the latent dimension, both already in the space: ``[..., D] -> [...]``."""
    return (pred - target).pow(2).mean(dim=-1)
