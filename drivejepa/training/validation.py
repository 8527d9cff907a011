"""Validation on held-out scenes: latent prediction error at each horizon next to the copy-last baseline.

For each window (context frames 0..c-1, future frames c..c+H-1) the predictor is rolled out from the latents
rollouts start from (``WorldModel.context_states``: the EMA target encoder's) with the true actions
a_{c-1}..a_{c+H-2}; its predictions are compared with the target encoder's latents of the future frames in the
model's latent space (``drivejepa.latent_space``: the space evaluation reports in, so best.pt is chosen by the number
metrics.json shows). The copy-last baseline (``drivejepa.baselines``) predicts the latent of the last context frame
at every horizon. An error ratio below 1 at horizon h means the predictor knows more about frame c+h-1 than "nothing
moves". The warp-last baseline carries that state along the true ego motions ("nothing but the ego moves": the
predictor's geometric path alone); ``warp_ratio_h{k}`` below 1 means the network adds to the geometry. The shuffled-action baseline (``drivejepa.baselines``: past and future actions of another validation
window, a seeded derangement of the validation set, attached to each item as ``shuffled_actions`` by the dataset)
measures the action sensitivity: its error over the true-action error is 1 when the predictions ignore the actions.
Collapse diagnostics (drivejepa.diagnostics) are computed on the pooled target states (``latent_space.summary``)
and the first-step predictions.
A window whose latents or predictions are not finite (a NaN in a shard) is left out and counted
(``nonfinite_windows``), so one bad window cannot stop training at an epoch end.
"""
from __future__ import annotations

from typing import Iterable

import torch

from drivejepa import latent_space
from drivejepa.baselines import copy_last, warp_last
from drivejepa.config import TrainConfig
from drivejepa.diagnostics import collapse_diagnostics
from drivejepa.training.distributed import DistInfo, all_reduce_sum

MAX_DIAGNOSTIC_ROWS = 4096


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def validate(model, batches: Iterable[dict], cfg: TrainConfig, info: DistInfo, autocast) -> dict:
    """Metrics over every window of ``batches`` (this rank's share; sums are reduced over ranks).

    Returns ``err_h{k}``, ``copy_last_h{k}``, ``ratio_h{k}``, ``warp_last_h{k}``, ``warp_ratio_h{k}``,
    ``shuffled_h{k}``, ``action_ratio_h{k}`` for k = 1..H, their means ``err``, ``copy_last``, ``ratio``,
    ``warp_last``, ``warp_ratio``, ``shuffled``, ``action_ratio``, ``windows``, and the collapse diagnostics (of this
    rank's windows) prefixed ``diag_``."""
    context, horizon = cfg.data.context, cfg.data.horizon
    was_training = model.training
    model.eval()
    device = info.device
    sums = torch.zeros(5, horizon, dtype=torch.float64, device=device)
    count = torch.zeros(3, dtype=torch.float64, device=device)  # windows, windows with shuffled actions, non-finite
    latents, first_pred, first_target, last_context = [], [], [], []
    space = model.space
    for batch in batches:
        batch = to_device(batch, device)
        actions = batch["actions"].float()
        valid = batch["action_valid"][:, context - 1 : context - 1 + horizon].bool().all(dim=1)
        if not bool(valid.any()):
            continue
        future_actions = actions[:, context - 1 : context - 1 + horizon][valid]
        other = batch.get("shuffled_actions")
        with autocast():
            # A batch of the predictor stage carries its cached target latents (training/predictor_stage.py).
            target = (batch["latents"] if "latents" in batch else model.context_states(batch))[valid]
            context_states, past = target[:, :context], actions[valid][:, : context - 1]
            pred = model.rollout(context_states, future_actions, past)
            shuffled = None
            if other is not None:
                other = other.float()[valid]
                shuffled = model.rollout(context_states, other[:, context - 1 : context - 1 + horizon],
                                         other[:, : context - 1])
        target = latent_space.targets(target.float(), space)
        pred = latent_space.predictions(pred.float(), space)
        finite = torch.isfinite(pred).flatten(1).all(1) & torch.isfinite(target).flatten(1).all(1)
        if shuffled is not None:
            shuffled = latent_space.predictions(shuffled.float(), space)
            finite &= torch.isfinite(shuffled).flatten(1).all(1)
        if not bool(finite.all()):
            count[2] += float((~finite).sum())
            if not bool(finite.any()):
                continue
            pred, target = pred[finite], target[finite]
            shuffled = shuffled[finite] if shuffled is not None else None
        future = target[:, context : context + horizon]
        last = copy_last(target[:, :context], horizon)
        err = latent_space.distance(pred, future).sum(dim=0).double()
        sums[0] += err
        sums[1] += latent_space.distance(last, future).sum(dim=0).double()
        warped = latent_space.predictions(warp_last(target[:, :context], future_actions[finite], model.grid), space)
        sums[4] += latent_space.distance(warped, future).sum(dim=0).double()
        count[0] += pred.shape[0]
        if shuffled is not None:
            sums[2] += latent_space.distance(shuffled, future).sum(dim=0).double()
            sums[3] += err
            count[1] += pred.shape[0]
        if sum(x.shape[0] for x in latents) < MAX_DIAGNOSTIC_ROWS:
            latents.append(latent_space.summary(target, space).reshape(-1, target.shape[-1]).cpu())
            first_pred.append(pred[:, 0].cpu())
            first_target.append(future[:, 0].cpu())
            last_context.append(last[:, 0].cpu())
    all_reduce_sum(sums, info)
    all_reduce_sum(count, info)
    model.train(was_training)
    n, n_shuffled, nonfinite = count.tolist()
    if n == 0:
        return {"windows": 0.0, "nonfinite_windows": nonfinite}
    err, copy = (sums[:2] / n).tolist()
    warped = (sums[4] / n).tolist()
    out: dict[str, float] = {"windows": n, "nonfinite_windows": nonfinite}
    for k in range(horizon):
        out[f"err_h{k + 1}"] = err[k]
        out[f"copy_last_h{k + 1}"] = copy[k]
        out[f"ratio_h{k + 1}"] = _ratio(err[k], copy[k])
        out[f"warp_last_h{k + 1}"] = warped[k]
        out[f"warp_ratio_h{k + 1}"] = _ratio(err[k], warped[k])
    out["err"] = sum(err) / horizon
    out["copy_last"] = sum(copy) / horizon
    out["ratio"] = _ratio(out["err"], out["copy_last"])
    out["warp_last"] = sum(warped) / horizon
    out["warp_ratio"] = _ratio(out["err"], out["warp_last"])
    if n_shuffled:
        # Shuffled against true actions on the same windows (all of them when the validation set has two or more).
        shuffled, same = (sums[2:4] / n_shuffled).tolist()
        for k in range(horizon):
            out[f"shuffled_h{k + 1}"] = shuffled[k]
            out[f"action_ratio_h{k + 1}"] = _ratio(shuffled[k], same[k])
        out["shuffled"] = sum(shuffled) / horizon
        out["action_ratio"] = _ratio(out["shuffled"], sum(same) / horizon)
    if latents:
        diag = collapse_diagnostics(torch.cat(latents), torch.cat(first_pred), torch.cat(first_target),
                                    torch.cat(last_context))
        out.update({f"diag_{k}": float(v) for k, v in diag.items()})
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def beats_copy_last(metrics: dict, horizon: int) -> bool:
    """True when the prediction error is below copy-last at every horizon."""
    return metrics.get("windows", 0) > 0 and all(
        metrics[f"err_h{k}"] < metrics[f"copy_last_h{k}"] for k in range(1, horizon + 1))
