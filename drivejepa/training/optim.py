"""The optimiser recipe: AdamW without weight decay on norms, biases, embeddings and learned tokens, linear warm-up
then cosine warm restarts."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from drivejepa.config import OptimConfig


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules list in their ``no_weight_decay()`` (the timm convention):
    embeddings, learned tokens and gates, which decay would pull towards zero for no regularising gain."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices and convolution kernels decay; biases, norm scales and the parameters of
    :func:`no_weight_decay_names` do not.

    A parameter with fewer than two dimensions is a bias or a normalisation scale/shift; decaying those pulls
    LayerNorm gains towards zero and hurts, the usual ViT/JEPA practice. Frozen parameters (the EMA target
    encoder) are left out."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up over ``warmup_steps``, then CosineAnnealingWarmRestarts(T_0=cfg.t0)."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=max(1, cfg.t0), T_mult=max(1, cfg.t_mult), eta_min=cfg.min_lr)
    if cfg.warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (cfg.warmup_steps + 1), end_factor=1.0, total_iters=cfg.warmup_steps)
    with warnings.catch_warnings():
        # SequentialLR hands the milestone to CosineAnnealingWarmRestarts.step(0), which warns about the epoch argument.
        warnings.simplefilter("ignore", UserWarning)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[cfg.warmup_steps])


def step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step`` and ``scaler.update``; False when the GradScaler skipped the step (inf/NaN gradients of fp16:
    it lowers its scale then). What follows an optimiser step (scheduler, EMA target update) must run only on
    True, or a skipped step still moves the learning rate and the target encoder."""
    before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return before is None or scaler.get_scale() >= before
