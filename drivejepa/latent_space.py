"""The latent space in which a prediction is compared with its target: one definition for every stage.

A state is a bird's-eye grid of tokens, ``[..., N, C]`` (drivejepa/models/bev.py): its last ``STATE_DIMS`` = 2 dims.
Every normalisation acts per token (over C), so a token's scale says nothing about another's.

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
space (``WorldModel.space``), so a checkpoint is always compared in the space it was trained in. ``summary`` pools a
state into one vector (the mean token in the space) for what needs a vector: collapse diagnostics, vector probes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPACES = ("layer_norm", "raw", "unit")
STATE_DIMS = 2                  # a state is [N tokens, C channels]


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


def distance(pred, target):
    """Squared error averaged over the state (tokens and channels), both already in the space:
    ``[..., N, C] -> [...]`` (tensors or numpy arrays)."""
    if isinstance(pred, np.ndarray) or isinstance(target, np.ndarray):
        diff = np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)
        return np.mean(diff * diff, axis=(-2, -1))
    return (pred - target).pow(2).mean(dim=(-2, -1))


def summary(states, space: str):
    """The state's pooled vector: the mean of its tokens in ``space``, ``[..., N, C] -> [..., C]``."""
    if isinstance(states, np.ndarray):
        return summary(torch.from_numpy(np.asarray(states, dtype=np.float32)), space).numpy()
    return targets(states, space).mean(dim=-2)
