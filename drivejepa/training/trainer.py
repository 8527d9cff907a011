"""The training loop: one process on a CPU, or one process per device under torchrun / Ray Train (DDP).

``train(cfg, run_dir, resume=None | "auto" | path)`` writes RUN/config.yaml, RUN/metrics.jsonl, RUN/tb/,
RUN/checkpoints/{last,best,step_XXXXXXX}.pt and RUN/summary.json, and returns the summary.

Reproducibility: the order of the training windows is a pure function of (seed, epoch) (``ResumableSampler``), the
DataLoader draws its worker seeds from its own generator, and checkpoints hold every RNG state and the number of
batches of the current epoch already used. A deterministic CPU run killed at any moment and resumed from its last
checkpoint therefore replays the same batches with the same random numbers and logs the same losses.

Preemption: SIGTERM (what SLURM, Kubernetes and spot instances send) or SIGINT makes every rank finish its step,
save a checkpoint at that step and stop with :class:`TrainingInterrupted` (``drivejepa train`` exits with
:data:`EXIT_INTERRUPTED`); ``--resume auto`` continues it with the losses of an uninterrupted run. Resuming applies
and records the optimiser settings given now (lr, weight decay, schedule), refuses another architecture or another
data order (batch size, window, seed, cameras) with the reason, and refuses shards made with another preprocessing
config than the checkpoint's unless ``allow_other_shards``.

``data.batch_size`` is the global batch: with N processes each takes batch_size / N windows, so the same config
trains the same way on one CPU or on N GPUs (up to BatchNorm statistics, which SyncBatchNorm shares on CUDA).
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from drivejepa.config import SIZE_PRESETS, TrainConfig, config_to_dict, resolve_train_config, save_config
from drivejepa.data.shards import SENSOR_KEYS
from drivejepa.errors import UserError
from drivejepa.io import atomic_write_json, remove_stale_temps
from drivejepa.precision import choose_precision
from drivejepa.runtime import seed_everything
from drivejepa.training import checkpoint as ckpt_mod
from drivejepa.training.distributed import (DistInfo, ResumableSampler, all_true, gather_objects, init_distributed,
                                            shutdown)
from drivejepa.training.metrics_log import MetricsLogger
from drivejepa.training.optim import build_optimizer, build_scheduler, scaler_step, step_scheduler
from drivejepa.training.validation import beats_copy_last, to_device, validate

log = logging.getLogger(__name__)

MODEL_KEYS = SENSOR_KEYS + ("actions", "action_valid", "context_group", "parted_after")


# Exit status of ``drivejepa train`` stopped by SIGTERM / SIGINT after saving its checkpoint (EX_TEMPFAIL: "try
# again"); a run killed without a chance to save exits by the signal itself (137, 143).
EXIT_INTERRUPTED = 75

# Resume refuses changes to these: the architecture (the weights would not fit) ...
ARCHITECTURE_KEYS = ("image_backbone", "action_dim", "max_context", "bev_range", "lift_heights",
                     *SIZE_PRESETS["demo"])
# ... and what fixes the data order (the position in the epoch would point at other windows).
DATA_ORDER_KEYS = ("data.batch_size", "data.context", "data.horizon", "data.stride", "data.train_split",
                   "data.cameras", "data.sibling_batches", "seed")
# Optimiser settings applied on resume by rebuilding the schedule at the current step.
OPTIM_KEYS = ("lr", "weight_decay", "warmup_steps", "t0", "t_mult", "min_lr")


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite losses in a row); the last good checkpoint is left as it was."""


class TrainingInterrupted(RuntimeError):
    """A signal stopped the run after it saved a checkpoint at the current step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: saved {checkpoint}; continue with --resume auto")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def train(cfg: TrainConfig, run_dir: str | Path, *, resume: Optional[str | Path] = None,
          progress: bool = True, allow_other_shards: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir``; ``resume`` = None (fresh run), "auto" (latest checkpoint in run_dir, fresh
    when there is none) or a checkpoint path. Returns the final summary (see ``training.summary.format_summary``)."""
    info = init_distributed(cfg.device)
    try:
        summary = _Run(cfg, Path(run_dir), info, progress, allow_other_shards).fit(resume)
        if info.world_size > 1:
            # Every rank leaves the joint run together: a rank that tore its gloo group down while another still
            # wrote the last checkpoint aborted now and then ('terminate called without an active exception').
            torch.distributed.barrier()
        if cfg.predictor_stage.steps > 0 and info.is_main:
            from drivejepa.training.predictor_stage import fit_predictor_stage

            summary["predictor_stage"] = fit_predictor_stage(cfg, run_dir, summary["steps"], info.device,
                                                             resume is not None, progress)
            summary["best_error"] = summary["predictor_stage"]["best_error"]
            atomic_write_json(Path(run_dir) / "summary.json", summary)
        return summary
    finally:
        shutdown(info)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (seed, rank, epoch, ...), distinct for distinct parts."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _LossModule(nn.Module):
    """Routes ``forward`` to ``WorldModel.loss`` so that DistributedDataParallel sees the pass it synchronises."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.loss_cfg = cfg.loss
        self.context = cfg.data.context

    def forward(self, batch: dict):
        return self.model.loss(batch, self.loss_cfg, self.context)


def windows_datasets(cfg: TrainConfig):
    """(train windows, val windows or None, skipped shards) of a training config: the val windows carry the
    shuffled-action partner of ``cfg.seed``; a UserError when the train split has no window."""
    from drivejepa.data.dataset import WindowDataset
    from drivejepa.data.shards import readable_scenes, scenes_in_split

    shards = cfg.data.shards
    if not shards:
        raise UserError("data.shards is empty: pass --shards SHARDS (a directory written by `drivejepa preprocess`)")
    if not Path(shards).is_dir():
        raise UserError(f"{shards}: shard directory not found")

    skipped: list[dict] = []

    def windows(split: str, shuffle_actions_seed=None):
        listed = scenes_in_split(shards, split)
        scenes, bad = readable_scenes(shards, listed, split)
        skipped.extend(bad)
        if not scenes:
            return None, listed
        ds = WindowDataset(shards, scenes, context=cfg.data.context, horizon=cfg.data.horizon,
                           stride=cfg.data.stride, cameras=cfg.data.cameras,
                           shuffle_actions_seed=shuffle_actions_seed)
        return (ds if len(ds) else None), scenes

    train_ds, train_scenes = windows(cfg.data.train_split)
    if train_ds is None:
        raise UserError(f"{shards}: split '{cfg.data.train_split}' ({len(train_scenes)} scenes) has no window of "
                        f"{cfg.data.context + cfg.data.horizon} consecutive key frames")
    val_ds = None
    if cfg.data.val_split:
        val_ds, val_scenes = windows(cfg.data.val_split, shuffle_actions_seed=cfg.seed)
        if val_ds is None:
            log.warning("%s: split '%s' (%d scenes) has no window; validation is skipped", shards,
                        cfg.data.val_split, len(val_scenes))
    return train_ds, val_ds, skipped


class _Run:
    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, progress: bool,
                 allow_other_shards: bool = False):
        from drivejepa.data.dataset import collate_windows
        from drivejepa.models.world_model import build_world_model

        # The architecture as built is what config.yaml and every checkpoint record (no preset re-resolved later).
        cfg = resolve_train_config(cfg)
        self.cfg, self.run_dir, self.info, self.progress = cfg, run_dir, info, progress
        self.allow_other_shards = allow_other_shards
        self.ckpt_dir = ckpt_mod.checkpoint_dir(run_dir)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.data.batch_size % info.world_size:
            raise UserError(f"data.batch_size = {cfg.data.batch_size} (the global batch) must be divisible by the "
                            f"{info.world_size} processes")
        self.local_batch = cfg.data.batch_size // info.world_size
        seed_everything(cfg.seed, cfg.deterministic)

        self.train_ds, self.val_ds, self.skipped_shards = windows_datasets(cfg)
        self.shards = ckpt_mod.shards_provenance(cfg.data.shards)
        if cfg.data.sibling_batches and self.local_batch < 2:
            raise UserError(f"data.sibling_batches needs at least 2 windows a batch on each process, got "
                            f"data.batch_size = {cfg.data.batch_size} over {info.world_size} processes")
        self.sampler = ResumableSampler(self.train_ds, info, shuffle=True, seed=cfg.seed,
                                        sibling_batch=self.local_batch if cfg.data.sibling_batches else 0)
        loader_kwargs = dict(collate_fn=collate_windows, num_workers=cfg.data.num_workers,
                             pin_memory=info.device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
        # Own generators: creating a DataLoader iterator must not draw from the global torch RNG, or a resumed run
        # (which starts its iterator mid-epoch) would drift from an uninterrupted one. Each epoch reseeds it from
        # (seed, rank, epoch) (``_train_epoch``), so the workers of different ranks get different seeds, and so do
        # those of each epoch unless workers are persistent (they then keep the seeds of the first epoch they run).
        self.loader = DataLoader(self.train_ds, batch_size=self.local_batch, sampler=self.sampler,
                                 generator=torch.Generator(), **loader_kwargs)
        self.val_loader = None
        if self.val_ds is not None:
            # A fixed shuffled order, split over the ranks.
            order = torch.randperm(len(self.val_ds), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            self.val_loader = DataLoader(self.val_ds, batch_size=self.local_batch,
                                         sampler=order[info.rank::info.world_size],
                                         generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        if cfg.optim.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.optim.max_steps)

        model = build_world_model(cfg).to(info.device)
        if info.distributed and info.device.type == "cuda" and cfg.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.forward = _LossModule(model, cfg)
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # Modality dropout can leave a branch without gradient in a step, hence find_unused_parameters.
            self.forward = nn.parallel.DistributedDataParallel(self.forward, device_ids=ids,
                                                               find_unused_parameters=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.precision = choose_precision(info.device, cfg.optim.amp, cfg.optim.amp_dtype)
        self.autocast = self.precision.autocast
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.precision.grad_scaler)
        # Each rank draws its own dropout masks; rank 0 of a DDP run draws what a single process would.
        seed_everything(cfg.seed + info.rank, cfg.deterministic)

        self.step = self.epoch = self.position = 0
        self.best_error = math.inf
        self.bad_in_row = self.bad_total = 0
        self.last_saved_step = -1
        self.last_val: dict = {}
        self.last_val_step = -1
        self.logger: Optional[MetricsLogger] = None
        self.stop_signal: Optional[int] = None

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        return {
            "config": config_to_dict(self.cfg), "cameras": list(self.cfg.data.cameras),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": gather_objects(ckpt_mod.capture_rng(), self.info),
            "step": self.step, "epoch": self.epoch, "position": self.position, "best_error": self.best_error,
            "bad_in_row": self.bad_in_row, "bad_total": self.bad_total, "world_size": self.info.world_size,
            "val": self.last_val, "val_step": self.last_val_step,
            "constants": ckpt_mod.model_constants(self.model), "shards": self.shards,
        }

    def _save(self, *, best: bool = False) -> None:
        state = self._state()  # collective (RNG states of every rank): every rank calls it
        self.last_saved_step = self.step
        if not self.info.is_main:
            return
        ckpt_mod.save_rotated(self.run_dir, state, self.step, self.cfg.keep_checkpoints)
        if best:
            # best.pt is for evaluation: the weights and how they scored, not the optimiser state.
            ckpt_mod.save_checkpoint(self.ckpt_dir / "best.pt", {
                k: state[k] for k in ("config", "cameras", "model", "constants", "shards", "step", "epoch",
                                      "best_error", "val")})

    def _resume(self, resume: Optional[str | Path]) -> bool:
        if self.info.is_main:
            remove_stale_temps(self.ckpt_dir)
        if resume is None:
            if ckpt_mod.checkpoint_files(self.run_dir):
                raise UserError(f"{self.run_dir}: already holds checkpoints; pass --resume auto to continue that run "
                                "or choose another --out")
            return False
        path = ckpt_mod.find_latest(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            log.info("%s: no checkpoint to resume from; starting a new run", self.run_dir)
            return False
        ckpt = ckpt_mod.load_checkpoint(path, "cpu")
        for key in ckpt_mod.RESUME_KEYS:
            if key not in ckpt:
                raise UserError(f"{path}: holds no '{key}' (best.pt keeps weights only); resume from last.pt")
        saved_cfg = ckpt_mod.config_of(ckpt, f"{path} (config)")
        saved_cfg = resolve_train_config(saved_cfg)
        changes = _differences(config_to_dict(saved_cfg), config_to_dict(self.cfg))
        refused = [c for c in changes if c.split(":")[0] in {f"model.{k}" for k in ARCHITECTURE_KEYS}]
        if refused:
            raise UserError(f"{path}: cannot resume with another model architecture ({'; '.join(refused)}); "
                            "start a new run in another --out")
        refused = [c for c in changes if c.split(":")[0] in DATA_ORDER_KEYS]
        if refused:
            raise UserError(f"{path}: cannot resume with another data order ({'; '.join(refused)}): the checkpoint's "
                            "position in the epoch would point at other windows; start a new run in another --out")
        if ckpt.get("shards"):
            ckpt_mod.check_shards(ckpt, self.cfg.data.shards, path, allow_other=self.allow_other_shards)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise UserError(f"{path}: weights do not fit the model its config describes "
                            f"({str(exc).strip().splitlines()[-1][:300]})") from None
        ckpt_mod.check_constants(self.model, ckpt, path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch, self.position = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["position"])
        optim_changes = [c for c in changes if c.split(":")[0] in {f"optim.{k}" for k in OPTIM_KEYS}]
        if optim_changes:
            self._apply_optim_settings()
        self.best_error = float(ckpt.get("best_error", math.inf))
        self.bad_in_row, self.bad_total = int(ckpt.get("bad_in_row", 0)), int(ckpt.get("bad_total", 0))
        self.last_val = dict(ckpt.get("val") or {})
        self.last_val_step = int(ckpt.get("val_step", -1))
        rng = ckpt["rng"]
        if int(ckpt.get("world_size", 1)) != self.info.world_size:
            log.warning("%s was written by %s processes, this run has %d: the rest of epoch %d sees a different "
                        "window order", path, ckpt.get("world_size"), self.info.world_size, self.epoch)
        if self.info.rank < len(rng):
            ckpt_mod.restore_rng(rng[self.info.rank])
        else:  # a rank the checkpoint did not have: its own stream, not a copy of rank 0's
            seed_everything(derived_seed(self.cfg.seed, self.info.rank, self.step) % 2 ** 32, self.cfg.deterministic)
        self.last_saved_step = self.step
        self.resume_changes = changes
        if changes and self.info.is_main:
            log.warning("resuming %s with settings that differ from the checkpoint's, applied from step %d on: %s",
                        path, self.step, "; ".join(changes))
        log.info("resumed %s at step %d (epoch %d, batch %d of %d)", path, self.step, self.epoch, self.position,
                 self.steps_per_epoch)
        return True

    def _apply_optim_settings(self) -> None:
        """Give the restored optimiser this config's lr and weight decay and a schedule built from this config,
        positioned at the current step (Adam's moments are kept)."""
        from drivejepa.training.optim import build_scheduler, step_scheduler

        o = self.cfg.optim
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = o.lr
        self.optimizer.param_groups[0]["weight_decay"] = o.weight_decay  # optim.param_groups: [decay, no decay]
        self.scheduler = build_scheduler(self.optimizer, o)
        for _ in range(self.step):
            step_scheduler(self.scheduler)

    # ------------------------------------------------------------------------------------------------ one step
    def _train_step(self, batch: dict) -> Optional[dict]:
        """One optimiser step; None when the batch was skipped for a non-finite loss or gradient."""
        batch = to_device({k: batch[k] for k in MODEL_KEYS if k in batch} | {"scene": batch["scene"],
                                                                              "start": batch["start"]},
                          self.info.device)
        try:
            with self.autocast():
                loss, stats = self.forward(batch)
            finite, what = bool(torch.isfinite(loss.detach()).item()), f"loss {float(loss.detach())}"
        except torch.linalg.LinAlgError as exc:
            # An SVD inside the loss's diagnostics fails to converge exactly when the latents are not finite.
            finite, what = False, f"latents ({exc})"
        if not all_true(finite, self.info):
            self._bad_step(batch, what)
            return None
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if not self.scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_step(batch, f"gradient norm {float(grad_norm)}")
            return None
        stepped = scaler_step(self.scaler, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        from drivejepa.models.world_model import ema_momentum

        momentum = ema_momentum(self.step, self.total_steps, self.cfg.loss.ema_start, self.cfg.loss.ema_end)
        if stepped:             # a step the GradScaler skipped moves neither the schedule nor the target encoder
            step_scheduler(self.scheduler)
            self.model.update_target(momentum)
        self.bad_in_row = 0
        return {**stats, "loss": float(loss.detach()), "grad_norm": float(grad_norm), "ema_momentum": momentum,
                "scaler_skipped": float(not stepped)}

    def _bad_step(self, batch: dict, what: str) -> None:
        self.bad_in_row += 1
        self.bad_total += 1
        length = self.cfg.data.context + self.cfg.data.horizon
        windows = [w for part in gather_objects(list(zip(batch["scene"], batch["start"].tolist())), self.info)
                   for w in part]
        where = [{"scene": s, "frames": [int(a), int(a) + length - 1]} for s, a in windows]
        if self.info.is_main:
            log.warning("step %d: non-finite %s; batch skipped (%d in a row, the run stops at %d). Windows: %s",
                        self.step + 1, what, self.bad_in_row, self.cfg.max_bad_steps,
                        "; ".join(f"{w['scene']} frames {w['frames'][0]}-{w['frames'][1]}" for w in where))
        self.logger.event("nonfinite", self.step + 1, what=what, windows=where, in_a_row=self.bad_in_row)
        if self.bad_in_row >= self.cfg.max_bad_steps:
            last = self.ckpt_dir / "last.pt"
            kept = f"the last good checkpoint is {last} (step {self.last_saved_step})" if last.exists() else \
                "no checkpoint had been written yet"
            raise TrainingStopped(
                f"{self.bad_in_row} non-finite losses in a row (max_bad_steps = {self.cfg.max_bad_steps}) at step "
                f"{self.step + 1}: training stopped; {kept}. The skipped windows are in {self.logger.path}. "
                "Check those scenes, lower optim.lr, or try optim.amp=false.")

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self, resume: Optional[str | Path]) -> dict:
        self.resume_changes: list[str] = []
        resumed = self._resume(resume)
        info, cfg = self.info, self.cfg
        if info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, enabled=info.is_main, resume_step=self.step if resumed else None)
        if self.resume_changes:
            self.logger.event("resume_changes", self.step, applied=self.resume_changes)
        if self.skipped_shards:
            self.logger.event("skipped_shards", self.step, shards=self.skipped_shards)
        n_params = sum(p.numel() for p in self.params)
        if info.is_main:
            log.info("training %.2fM parameters on %s x %d: %d train windows, %d val windows, global batch %d, "
                     "%d steps/epoch, %d steps", n_params / 1e6, info.device, info.world_size, len(self.train_ds),
                     len(self.val_ds) if self.val_ds else 0, cfg.data.batch_size, self.steps_per_epoch,
                     self.total_steps)
            log.info("precision: %s (%s)", self.precision.name, self.precision.reason)
        self.logger.event("precision", self.step, **self.precision.as_dict())
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=not (self.progress and info.is_main), desc="train")
        self.start_step = self.step
        self.clock = {"wait": 0.0, "total": 0.0}
        started = time.perf_counter()
        previous = self._catch_signals()
        try:
            while self.step < self.total_steps and self.epoch < cfg.optim.epochs:
                self._train_epoch()
                if self.position < self.steps_per_epoch:
                    break  # max_steps reached inside the epoch, or a signal
                self._end_epoch()
                self._stop_if_signalled()
            validated_now = self.last_val_step != self.step
            if validated_now:
                self._validate()
            # Saved again when this validation is new, even if a periodic save just wrote this step: best.pt must
            # get its chance, and last.pt its validation record.
            if self.last_saved_step != self.step or validated_now:
                self._save(best=self._improved())
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.bar.close()
            self.logger.close()
        elapsed = time.perf_counter() - started
        return self._summary(elapsed, n_params)

    def _catch_signals(self) -> dict:
        """SIGTERM / SIGINT set ``stop_signal`` (the step in progress finishes); a second signal acts as before."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread (Ray Train runs loops in threads)
        previous = {}

        def handler(signum, frame):
            self.stop_signal = signum
            for s, h in previous.items():
                signal.signal(s, h)
            log.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def _stop_if_signalled(self) -> None:
        """Collective: when any rank got a signal, every rank saves the current step and the run stops."""
        if all_true(self.stop_signal is None, self.info):
            return
        signum = self.stop_signal or signal.SIGTERM
        if self.last_saved_step != self.step:
            self._save()
        self.bar.close()
        raise TrainingInterrupted(int(signum), self.step, self.ckpt_dir / "last.pt")

    def _train_epoch(self) -> None:
        self.loader.generator.manual_seed(derived_seed(self.cfg.seed, self.info.rank, self.epoch))
        self.sampler.set_position(self.epoch, self.position * self.local_batch)
        self.model.train()
        window = {"t": time.perf_counter(), "wait": 0.0, "windows": 0, "stats": {}, "counts": {}}
        it = iter(self.loader)
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waited = time.perf_counter() - t0
            result = self._train_step(batch)
            self.step += 1
            self.position += 1
            window["wait"] += waited
            window["windows"] += len(batch["scene"]) * self.info.world_size
            if result is not None:
                for k, v in result.items():           # a term some batches lack is averaged over those it has
                    window["stats"][k] = window["stats"].get(k, 0.0) + float(v)
                    window["counts"][k] = window["counts"].get(k, 0) + 1
            self.bar.update(1)
            if self.step % max(1, self.cfg.log_every) == 0 or self.step == self.total_steps:
                self._log_window(window)
            if self.cfg.ckpt_every > 0 and self.step % self.cfg.ckpt_every == 0 \
                    and self.position < self.steps_per_epoch:
                self._save()
            if self.position < self.steps_per_epoch:
                self._stop_if_signalled()
        if window["windows"]:
            self._log_window(window)

    def _log_window(self, window: dict) -> None:
        now = time.perf_counter()
        elapsed = max(now - window["t"], 1e-9)
        self.clock["wait"] += window["wait"]
        self.clock["total"] += elapsed
        values = {k: v / window["counts"][k] for k, v in window["stats"].items()}
        values.update(lr=self.optimizer.param_groups[0]["lr"], windows_per_s=window["windows"] / elapsed,
                      data_wait=window["wait"] / elapsed)
        self.logger.scalars("train", self.step, values, epoch=self.epoch)
        if "loss" in values:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", win_s=f"{values['windows_per_s']:.1f}",
                                 epoch=self.epoch)
        window.update(t=now, wait=0.0, windows=0, stats={}, counts={})

    def _validate(self) -> None:
        if self.val_loader is None:
            return
        self.val_loader.generator.manual_seed(derived_seed(self.cfg.seed, self.info.rank))
        self.last_val = validate(self.model, self.val_loader, self.cfg, self.info, self.autocast)
        self.last_val_step = self.step
        self.logger.scalars("val", self.step, self.last_val, epoch=self.epoch)
        if self.info.is_main and self.last_val.get("nonfinite_windows"):
            log.warning("val step %d: %d windows with non-finite latents left out (check the shards of split '%s')",
                        self.step, int(self.last_val["nonfinite_windows"]), self.cfg.data.val_split)
        if self.info.is_main and self.last_val.get("windows"):
            h = self.cfg.data.horizon
            log.info("val step %d: latent error %.4f vs copy-last %.4f (ratio %.3f; horizon %d ratio %.3f), "
                     "shuffled actions / true %.3f, effective rank %.1f", self.step, self.last_val["err"],
                     self.last_val["copy_last"], self.last_val["ratio"], h, self.last_val[f"ratio_h{h}"],
                     self.last_val.get("action_ratio", float("nan")),
                     self.last_val.get("diag_effective_rank", float("nan")))

    def _improved(self) -> bool:
        # Ranked by the error relative to copy-last: the raw error's scale drifts as the target encoder moves.
        err = self.last_val.get("ratio", math.inf) if self.last_val_step == self.step else math.inf
        if self.val_loader is None:
            return True  # no held-out scenes: the newest weights are the best we can tell
        if err < self.best_error:
            self.best_error = err
            return True
        return False

    def _end_epoch(self) -> None:
        self._validate()
        self.epoch += 1
        self.position = 0
        self._save(best=self._improved())

    def _summary(self, elapsed: float, n_params: int) -> dict:
        records_loss = self.last_loss()
        steps_run = self.step - self.start_step
        summary = {
            "run_dir": str(self.run_dir), "rank": self.info.rank, "steps": self.step, "total_steps": self.total_steps,
            "epochs": self.step / self.steps_per_epoch, "seconds": elapsed, "parameters": n_params,
            "device": str(self.info.device), "processes": self.info.world_size,
            "precision": self.precision.as_dict(),
            "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(self.info.device) / 1e9
                                   if self.info.device.type == "cuda" else None),
            "windows_per_s": steps_run * self.cfg.data.batch_size / elapsed if elapsed > 0 else 0.0,
            "data_wait_share": self.clock["wait"] / self.clock["total"] if self.clock["total"] else 0.0,
            "train_loss": records_loss, "bad_steps": self.bad_total, "val": self.last_val,
            "best_error": None if math.isinf(self.best_error) else self.best_error,
            "beats_copy_last": beats_copy_last(self.last_val, self.cfg.data.horizon),
            "last_checkpoint": str(self.ckpt_dir / "last.pt"),
            "best_checkpoint": str(self.ckpt_dir / "best.pt"),
        }
        if self.info.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def last_loss(self) -> Optional[float]:
        from drivejepa.training.metrics_log import read_metrics

        losses = [r["loss"] for r in read_metrics(self.run_dir / "metrics.jsonl")
                  if r.get("split") == "train" and isinstance(r.get("loss"), float)]
        return losses[-1] if losses else None


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out
