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
from drivejepa.models.bev import BevGrid

MOTION_DIMS = 3  # dx, dy, dyaw: the first three action components


class InverseDynamicsHead(nn.Module):
    """States ``[..., N, C]`` of frames t and t+1 -> ``[..., 3]`` ego motion from t to t+1, in the predictor's
    action units (raw metres and radians divided by ``ACTION_SCALES``). Two convolutions over the pair of grids see
    how the content of neighbouring cells shifted; a global mean and a linear layer read the motion off."""

    def __init__(self, dim: int, grid: BevGrid):
        super().__init__()
        self.grid = grid
        self.conv = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.GELU())
        self.head = nn.Linear(dim, MOTION_DIMS)

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        # Layer-normalised inputs: the regulariser asks for information in the latent, not for a larger scale.
        lead = before.shape[:-2]
        pair = torch.cat([layer_norm(before), layer_norm(after)], dim=-1).reshape(-1, *before.shape[-2:-1],
                                                                               2 * before.shape[-1])
        features = self.conv(self.grid.to_image(pair)).mean(dim=(-2, -1))
        return self.head(features).view(*lead, MOTION_DIMS)
