"""Inverse-dynamics head: the ego motion between two consecutive latent states, (s_t, s_t+1) -> (dx, dy, dyaw).

Why it exists: a JEPA world model trained only to predict its own next latent can meet its objective with latents
that hardly change from one frame to the next (scene identity, weather, lighting). Copying the last latent then
predicts them almost perfectly and the predictor has no use for the action, the failure users of driving world
models report (Vista#54). Asking that the ego motion be recoverable from two consecutive latents (the
inverse-dynamics regulariser of PLDM, Sobal et al. 2025) makes the latent carry the ego-relative geometry that the
motion changes, so predicting the next latent needs the action. The head is a training-time regulariser of the
encoder (``loss.idm_weight``): it never feeds the predictor and is not used outside training.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from drivejepa.latent_space import layer_norm

MOTION_DIMS = 3  # dx, dy, dyaw: the first three action components


class InverseDynamicsHead(nn.Module):
    """``[..., D]`` states of frames t and t+1 -> ``[..., 3]`` ego motion from t to t+1, in the predictor's action
    units (raw metres and radians divided by ``ACTION_SCALES``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Linear(dim, MOTION_DIMS))

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        # Layer-normalised inputs: the regulariser asks for information in the latent, not for a larger scale.
        return self.mlp(torch.cat([layer_norm(before), layer_norm(after)], dim=-1))
