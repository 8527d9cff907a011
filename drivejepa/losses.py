"""Training objectives of the world model: JEPA regression, InfoNCE, a VICReg-style variance/covariance term, the
inverse-dynamics regulariser (see drivejepa/models/inverse_dynamics.py), the equivariance ratio and the
sibling-contrastive term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from drivejepa.config import LossConfig


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown regression loss '{kind}' (smooth_l1, mse or l1)")


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows ``[N, D]`` of every rank concatenated in rank order, offset of this rank's rows); gradients flow back to
    each rank's own rows. In a single process: ``(x, 0)``. Batch-level terms (InfoNCE's negatives, VICReg's
    statistics) are computed on the gathered rows, so with DDP averaging the gradients the same config trains the
    same way on N processes as on one with the whole batch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    counts = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor(x.shape[0], device=x.device))
    if len({int(c) for c in counts}) != 1:
        raise ValueError(f"every rank must hold the same number of rows to gather, got {[int(c) for c in counts]}")
    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def infonce_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Contrastive prediction: each predicted state must pick its own target among the targets of the whole batch
    (every rank's), except the other frames of its own window.

    ``pred`` and ``target`` are ``[B, T, N, C]`` grids (or ``[B, N, C]``: one frame per window). The similarity of
    two states is the mean cosine similarity of their tokens, cell by cell (each token unit-normalised, the space
    ``unit`` of drivejepa/latent_space.py), divided by ``temperature``; cross-entropy picks the matching target. The
    adjacent frames of the same window are nearly identical to the target, so they are not negatives (masked out)."""
    if pred.dim() == 3:
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    b, t, n, c = pred.shape
    scale = n ** -0.5
    p = F.normalize(pred.float(), dim=-1).reshape(b * t, n * c) * scale
    targets, offset = gather_rows(F.normalize(target.float(), dim=-1).reshape(b * t, n * c) * scale)
    logits = p @ targets.T / temperature
    rows = torch.arange(b * t, device=p.device)
    labels = rows + offset
    window = (labels // t)[:, None] == (torch.arange(targets.shape[0], device=p.device) // t)[None, :]
    own = torch.zeros_like(window)
    own[rows, labels] = True
    logits = logits.masked_fill(window & ~own, float("-inf"))
    return F.cross_entropy(logits, labels)


def vicreg_terms(z: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance hinge, off-diagonal covariance) of vectors ``[..., D]`` flattened to rows, as in VICReg; the
    statistics are over the rows of every rank (:func:`gather_rows`). For states the rows are their tokens."""
    z, _ = gather_rows(z.reshape(-1, z.shape[-1]).float())
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


def equivariance_ratio(source: torch.Tensor, warped: torch.Tensor, target: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """How much better the states ``source [..., N, C]`` predict ``target`` carried by the ego's motion (``warped``,
    ``bev.warp`` of ``source``) than left where they are: ``sum ||warped - target||^2 / sum ||source - target||^2``
    over the cells of ``mask [..., N]``. A grid that is flat in space scores 1 (warping it changes nothing), one whose
    content moves with the world scores below 1, and shrinking how much the state changes from frame to frame
    lowers both sums alike (the failure of a plain warp-error term, which did so rather than move the state)."""
    mask = mask.to(source.dtype)
    num = (((warped - target) ** 2).mean(dim=-1) * mask).sum()
    den = (((source - target) ** 2).mean(dim=-1) * mask).sum()
    return num / den.clamp(min=1e-8)


def sibling_contrast_loss(pred: torch.Tensor, target: torch.Tensor, group: torch.Tensor, parted_after: torch.Tensor,
                          first: int, temperature: float) -> tuple[torch.Tensor, int]:
    """Counterfactual discrimination: each rollout must land nearest its own future among its siblings' futures.

    ``pred`` and ``target`` are ``[B, K, N, C]`` rollouts and true latents in the model's space, step h at window
    position ``first + h``; ``group [B]`` says which rows share their context (``WindowDataset.context_group``: a
    scene and its counterfactual branches from the same key frame), so that they differ only in the actions they
    are given, and ``parted_after [B]`` where each row's future leaves its parent's (``WindowDataset.parted_after``).
    Rows i and j see different scenes at position p once p > min(parted_after_i, parted_after_j). For row i at step
    h the candidates are its own future and those of the siblings parted from it by then; the logits are
    ``-latent_space.distance(pred_i(h), target_j(h)) / temperature`` and cross-entropy picks j = i: the evaluation's
    counterfactual top-1 (drivejepa/evaluation/counterfactual.py) made differentiable. A sibling not yet parted
    shows the same scene (only sensor noise differs) and is no candidate. Returns (loss, number of terms); (0, 0)
    when no row has a parted sibling."""
    from drivejepa import latent_space

    b, k = pred.shape[:2]
    eye = torch.eye(b, dtype=torch.bool, device=pred.device)
    sibling = (group[:, None] == group[None, :]) & ~eye                                    # [B, B]
    positions = first + torch.arange(k, device=pred.device)                                # [K]
    parted = torch.minimum(parted_after[:, None], parted_after[None, :])[..., None] < positions   # [B, B, K]
    candidate = (sibling[..., None] & parted) | eye[..., None]
    active = (candidate & ~eye[..., None]).any(dim=1)                                      # [B, K]
    if not bool(active.any()):
        return pred.sum() * 0.0, 0
    d = latent_space.distance(pred.float().unsqueeze(1), target.float().unsqueeze(0))      # [B, B, K]
    logits = (-d / temperature).masked_fill(~candidate, float("-inf"))
    labels = torch.arange(b, device=pred.device)[:, None].expand(b, k)
    ce = F.cross_entropy(logits.permute(0, 2, 1)[active], labels[active])
    return ce, int(active.sum())


def prediction_loss(pred: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The configured objective between predicted and target latents; the targets are stop-gradient and already in
    the objective's latent space (``latent_space.targets``), the one validation and evaluation compare in."""
    if cfg.objective == "jepa":
        return regression_loss(pred, target, cfg.regression)
    if cfg.objective == "infonce":
        return infonce_loss(pred, target, cfg.temperature)
    raise ValueError(f"unknown objective '{cfg.objective}' (jepa or infonce)")
