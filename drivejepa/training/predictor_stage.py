"""The predictor stage: after the joint run, the predictor alone on the frozen target encoder's latents.

Why: a joint step is mostly the encoders (ResNet18 and the point branches on every frame of the window, online and
target), and the predictor learns from one batch of windows a step; in the demo's 250 steps it sees fewer windows
than the train split holds. With the encoders frozen and their latents cached, a predictor step costs the
predictor alone, so it sees many more windows in the same time (V-JEPA 2-AC trains its action-conditioned predictor
on a frozen encoder the same way). Measured on the larger branch set (eval/experiments.md, counterfactual futures).

How: every key frame of the train and val windows is encoded once by the target encoder, the latents that rollouts
start from and are scored against outside training (``WorldModel.context_states``), and held in memory
(:class:`LatentWindows`; a demo state is 16 x 16 x 64 float32, 64 KB; a ``base`` one 512 KB, so the 28k train key
frames of nuScenes trainval need about 14 GB). The objective is the joint run's predictor
share (``WorldModel.predictor_terms``) with the cached latents as inputs and targets: exactly the setting of
validation and evaluation. Validation is ``training.validation.validate`` on the cached val windows, and best.pt
(the encoders of the joint run's best.pt, which the stage starts from) takes the stage's predictor whenever the val
error relative to copy-last beats the best so far.

Optimiser: the joint run's recipe (``training.optim``: AdamW with its parameter groups and betas, linear warm-up),
with the stage's learning rate and decay and one cosine cycle over its remaining steps down to ``optim.min_lr``.

Logs: ``RUN/predictor_stage.jsonl`` (``train`` and ``val`` records by stage step) and ``RUN/tb/predictor_stage``.
Resume: ``RUN/checkpoints/predictor_stage.pt`` (predictor, optimiser, schedule, position, RNG) every
``predictor_stage.val_every`` steps; the window order is a pure function of (seed, epoch). The stage runs in one
process (under torchrun, on rank 0 after the joint run).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from drivejepa import latent_space
from drivejepa.config import TrainConfig
from drivejepa.data.dataset import WindowDataset, collate_windows, sibling_batches
from drivejepa.data.shards import SENSOR_KEYS
from drivejepa.errors import UserError
from drivejepa.training import checkpoint as ckpt_mod
from drivejepa.training.distributed import DistInfo
from drivejepa.training.metrics_log import MetricsLogger
from drivejepa.training.validation import to_device, validate

log = logging.getLogger(__name__)

STAGE_CHECKPOINT = "predictor_stage.pt"
RECIPE = 2                         # the optimiser recipe a stage checkpoint was written with (1: its own AdamW)
ORDER_TAG = 0x5354                 # keeps the stage's window order apart from the joint run's
LABEL_KEYS = ("actions", "action_valid")


class LatentWindows(Dataset):
    """The windows of a :class:`WindowDataset` with the target encoder's latents of their key frames (``latents``
    [L, N, C]) in place of the sensors; each frame is encoded once however many windows hold it."""

    def __init__(self, windows: WindowDataset, model, autocast, batch_frames: int = 16, desc: str = "",
                 progress: bool = True):
        from tqdm.auto import tqdm

        self.windows = windows
        spans: dict[str, tuple[int, int]] = {}
        for scene, start in windows.index:
            lo, hi = spans.get(scene, (start, start + windows.length))
            spans[scene] = (min(lo, start), max(hi, start + windows.length))
        self.latents: dict[str, torch.Tensor] = {}
        self.offset = {scene: lo for scene, (lo, _) in spans.items()}
        device = next(model.parameters()).device
        with tqdm(total=sum(hi - lo for lo, hi in spans.values()), unit="frame", desc=desc,
                  disable=not progress) as bar, torch.no_grad():
            for scene, (lo, hi) in spans.items():
                parts = []
                for a in range(lo, hi, batch_frames):
                    b = min(hi, a + batch_frames)
                    frames = windows.frames(scene, a, b, SENSOR_KEYS)
                    batch = {k: v.unsqueeze(0).to(device) for k, v in frames.items()}
                    with autocast():
                        parts.append(model.context_states(batch)[0].float().cpu())
                    bar.update(b - a)
                self.latents[scene] = torch.cat(parts)
        size = sum(t.numel() * t.element_size() for t in self.latents.values())
        log.info("%s: %d key frames of %d windows, %.2f GB in memory", desc or "cached latents",
                 sum(len(t) for t in self.latents.values()), len(windows), size / 1e9)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        item = self.windows.item(i, LABEL_KEYS)
        first = item["start"] - self.offset[item["scene"]]
        item["latents"] = self.latents[item["scene"]][first:first + self.windows.length]
        return item


def epoch_batches(data: LatentWindows, batch: int, seed: int, epoch: int, siblings: bool) -> list[list[int]]:
    """The stage's batches of one epoch, a pure function of (seed, epoch): sibling batches
    (``dataset.sibling_batches``) with ``data.sibling_batches``, else a shuffle cut into batches."""
    from drivejepa.training.trainer import derived_seed

    rng = np.random.default_rng(derived_seed(seed, ORDER_TAG, epoch))
    n = len(data)
    if siblings:
        return sibling_batches(data.windows.sibling_groups(), n, batch, rng)
    order = rng.permutation(n).tolist()
    return [order[i:i + batch] for i in range(0, n, batch)]


def fit_predictor_stage(cfg: TrainConfig, run_dir: str | Path, joint_step: int, device: torch.device,
                        resume: bool, progress: bool = True) -> dict:
    """Run ``cfg.predictor_stage`` on RUN after a joint run that ended at ``joint_step``; ``resume``: continue
    RUN/checkpoints/predictor_stage.pt when it belongs to this joint run. Returns the stage's summary."""
    from tqdm.auto import tqdm

    from drivejepa.precision import choose_precision
    from drivejepa.training.optim import build_optimizer, build_scheduler, step_scheduler
    from drivejepa.training.trainer import windows_datasets

    stage, run_dir = cfg.predictor_stage, Path(run_dir)
    folder = ckpt_mod.checkpoint_dir(run_dir)
    best_path, state_path = folder / "best.pt", folder / STAGE_CHECKPOINT
    saved = ckpt_mod.load_checkpoint(state_path, "cpu") if resume and state_path.is_file() else None
    if saved is not None and int(saved["joint_step"]) != joint_step:
        log.warning("%s belongs to the joint run's step %d, not %d: the predictor stage starts over", state_path,
                    int(saved["joint_step"]), joint_step)
        saved = None
    if saved is not None and int(saved.get("recipe", 1)) != RECIPE and int(saved["step"]) < stage.steps:
        log.warning("%s was written with an older optimiser recipe (%d, this code's is %d): the predictor stage "
                    "starts over", state_path, int(saved.get("recipe", 1)), RECIPE)
        saved = None
    if saved is not None and int(saved["step"]) >= stage.steps:
        log.info("predictor stage already done (%d steps)", int(saved["step"]))
        return dict(saved["summary"])
    best = ckpt_mod.load_checkpoint(best_path, "cpu")
    model, _ = ckpt_mod.load_world_model(best_path, device)

    precision = choose_precision(device, cfg.optim.amp, cfg.optim.amp_dtype)

    train_windows, val_windows, _ = windows_datasets(cfg)
    started = time.perf_counter()
    train_data = LatentWindows(train_windows, model, precision.autocast, desc="cache train latents",
                               progress=progress)
    val_data = None if val_windows is None else LatentWindows(val_windows, model, precision.autocast,
                                                              desc="cache val latents", progress=progress)
    cache_seconds = time.perf_counter() - started

    predictor = model.predictor
    model.requires_grad_(False)
    predictor.requires_grad_(True)
    recipe = dataclasses.replace(cfg.optim, lr=stage.lr, weight_decay=stage.weight_decay,
                                 warmup_steps=stage.warmup_steps, t0=max(1, stage.steps - stage.warmup_steps), t_mult=1)
    optimizer = build_optimizer(predictor, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    step = epoch = position = 0
    best_error = float(best.get("best_error", math.inf))
    start_error = best_error
    if saved is not None:
        predictor.load_state_dict(saved["predictor"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, epoch, position = int(saved["step"]), int(saved["epoch"]), int(saved["position"])
        best_error, start_error = float(saved["best_error"]), float(saved["start_error"])
        ckpt_mod.restore_rng(saved["rng"])
        log.info("resumed the predictor stage at step %d of %d", step, stage.steps)
    info = DistInfo(device=device)
    logger = MetricsLogger(run_dir, resume_step=step, name="predictor_stage")
    val: dict = {}

    def evaluate_and_save() -> None:
        nonlocal val, best_error
        if val_data is not None:
            batches = (collate_windows([val_data[i] for i in range(a, min(len(val_data), a + stage.batch_size))])
                       for a in range(0, len(val_data), stage.batch_size))
            val = validate(model, batches, cfg, info, precision.autocast)
            logger.scalars("val", step, val, epoch=epoch)
            if val.get("ratio", math.inf) < best_error:
                best_error = val["ratio"]
                ckpt_mod.save_checkpoint(best_path, {**best, "model": model.state_dict(), "step": joint_step + step,
                                                     "best_error": best_error, "val": val})
        ckpt_mod.save_checkpoint(state_path, {
            "config": best["config"], "model": {}, "predictor": predictor.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": ckpt_mod.capture_rng(),
            "step": step, "epoch": epoch, "position": position, "joint_step": joint_step, "recipe": RECIPE,
            "best_error": best_error, "start_error": start_error, "summary": summary()})

    def summary() -> dict:
        return {"steps": step, "train_windows": len(train_data), "cache_seconds": cache_seconds,
                "seconds": time.perf_counter() - started, "start_error": start_error,
                "best_error": None if math.isinf(best_error) else best_error, "val": val}

    first_step = step
    bar = tqdm(total=stage.steps, initial=step, unit="step", desc="predictor stage", disable=not progress)
    model.train()
    try:
        while step < stage.steps:
            batches = epoch_batches(train_data, stage.batch_size, cfg.seed, epoch, cfg.data.sibling_batches)
            while position < len(batches) and step < stage.steps:
                batch = to_device(collate_windows([train_data[i] for i in batches[position]]), device)
                latents = batch["latents"]
                targets = latent_space.targets(latents, model.space)
                with precision.autocast():
                    loss, stats, _ = model.predictor_terms(latents, latents, targets, batch,
                                                           batch["action_valid"].bool(), cfg.loss, cfg.data.context)
                if not bool(torch.isfinite(loss.detach())):
                    raise UserError(f"predictor stage step {step + 1}: non-finite loss on windows "
                                    f"{list(zip(batch['scene'], batch['start'].tolist()))}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(predictor.parameters(), cfg.optim.clip_grad)
                optimizer.step()
                step_scheduler(scheduler)
                step, position = step + 1, position + 1
                bar.update(1)
                if step % max(1, cfg.log_every) == 0:
                    logger.scalars("train", step, {**stats, "loss": float(loss.detach()),
                                                   "lr": optimizer.param_groups[0]["lr"]}, epoch=epoch)
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if step % stage.val_every == 0 or step == stage.steps:
                    model.eval()
                    evaluate_and_save()
                    model.train()
            if position >= len(batches):
                epoch, position = epoch + 1, 0
    finally:
        bar.close()
        logger.close()
    model.eval()
    out = summary()
    out["windows_per_s"] = (step - first_step) * stage.batch_size / max(out["seconds"] - cache_seconds, 1e-9)
    return out
