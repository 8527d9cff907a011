"""Training objectives of the world model: JEPA regression, InfoNCE, a VICReg-style variance/covariance term, and
the inverse-dynamics regulariser (see drivejepa/models/inverse_dynamics.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from drivejepa.config import LossConfig


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown regression loss '{kind}' (smooth_l1 or mse)")


def infonce_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Contrastive prediction: each prediction must pick its own target among all targets of the batch.

    Every (sample, time) pair is one row; the cosine similarity matrix over the rows, divided by ``temperature``,
    goes through cross-entropy with the matching target as the class."""
    p = F.normalize(pred.reshape(-1, pred.shape[-1]).float(), dim=-1)
    t = F.normalize(target.reshape(-1, target.shape[-1]).float(), dim=-1)
    logits = p @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(p.shape[0], device=p.device))


def vicreg_terms(z: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance hinge, off-diagonal covariance) of latents ``[..., D]`` flattened to rows, as in VICReg."""
    z = z.reshape(-1, z.shape[-1]).float()
    n, d = z.shape
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0, unbiased=n > 1) + eps)
    var = F.relu(1.0 - std).mean()
    cov = (z.T @ z) / max(n - 1, 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return var, off.pow(2).sum() / d


def inverse_dynamics_loss(pred_motion: torch.Tensor, motion: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between predicted and true ego motion ``[..., 3]`` (scaled units), averaged over ``valid`` pairs."""
    err = F.smooth_l1_loss(pred_motion.float(), motion.float(), reduction="none").mean(dim=-1)
    valid = valid.to(err.dtype)
    return (err * valid).sum() / valid.sum().clamp(min=1.0)


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The configured objective between predicted and target latents; the targets are stop-gradient and already in
    the objective's latent space (``latent_space.targets``), the one validation and evaluation compare in."""
    if cfg.objective == "jepa":
        return regression_loss(pred, target, cfg.regression)
    if cfg.objective == "infonce":
        return infonce_loss(pred, target, cfg.temperature)
    raise ValueError(f"unknown objective '{cfg.objective}' (jepa or infonce)")
