"""Checkpoints: one dict written atomically with torch.save, read back with weights_only=True.

Layout of RUN/checkpoints/: ``step_XXXXXXX.pt`` (written every ``ckpt_every`` steps, at each epoch end and when a
signal stops the run; the newest ``keep_checkpoints`` are kept), ``last.pt`` (a copy of the newest step file),
``best.pt`` (lowest validation latent error relative to copy-last, averaged over horizons; weights only). Each holds
``config`` (config_to_dict(TrainConfig) with the model's architecture resolved), ``cameras``, ``model``
(WorldModel.state_dict(): online encoder, EMA target encoder, predictor), ``constants`` (the model's non-persistent
buffers: action and point scales, image mean/std, ...), ``shards`` (config hash and preprocessing config of the
shards it was trained on) and the resume state: optimizer, scheduler, scaler, RNG states, step, epoch, position
(batches of the epoch already consumed), the step of the last validation, best validation error and the world size.

Loading refuses, in one line naming them, weights that do not fit the config and constants that differ from the
code's (:func:`load_world_model`), and shards made with another preprocessing config (:func:`check_shards`)."""
from __future__ import annotations

import dataclasses
import logging
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from drivejepa.config import TrainConfig, from_dict
from drivejepa.errors import UserError
from drivejepa.io import atomic_path

log = logging.getLogger(__name__)

# 2: the config holds the resolved architecture, plus ``constants`` and ``shards``.
# 3: the state is a bird's-eye grid of tokens (model.bev_size, bev_range); earlier formats hold one-vector states,
#    which no code reads any more.
FORMAT = 3


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` so that ``path`` is either the old file or the complete new one, never a partial file.

    Through a Python file object, so that a failed write (a full disk) is the OSError itself, naming ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise UserError(f"{path}: not a readable drivejepa checkpoint ({type(exc).__name__}: {reason})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a drivejepa checkpoint (no 'model' and 'config' entries)")
    return ckpt


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """Every checkpoint file of RUN (step files, last.pt, best.pt)."""
    folder = checkpoint_dir(run_dir)
    return sorted(folder.glob("step_*.pt")) + [p for p in (folder / "last.pt", folder / "best.pt") if p.is_file()]


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The readable, resumable checkpoint of RUN with the highest step (``last.pt`` wins a tie); None when RUN
    holds no checkpoint at all. An unreadable one is named and passed over; when checkpoints exist but none can be
    resumed from, a UserError names each and why, so that a run never starts over on top of them."""
    folder = checkpoint_dir(run_dir)
    candidates = sorted(folder.glob("step_*.pt")) + [folder / "last.pt"]
    best: Optional[tuple[int, int, Path]] = None
    problems = []
    for rank, path in enumerate(candidates):
        if not path.is_file():
            continue
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except UserError as exc:
            log.warning("passing over %s", exc)
            problems.append(f"{path.name} unreadable")
            continue
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            problems.append(f"{path.name} has no resume state")
            continue
        key = (int(ckpt["step"]), rank, path)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None and checkpoint_files(run_dir):
        raise UserError(f"{folder}: no checkpoint to resume from ({'; '.join(problems) or 'only best.pt'}); "
                        "refusing to start over on top of this run: move it away or choose another --out")
    return None if best is None else best[2]


RESUME_KEYS = ("optimizer", "scheduler", "rng", "step")


def save_rotated(run_dir: str | Path, state: dict, step: int, keep: int) -> Path:
    """Write ``step_XXXXXXX.pt`` and a copy of it as ``last.pt`` (each atomically; separate files, so damage to one
    leaves the other) and delete all but the newest ``keep`` step files. Returns the step file."""
    folder = checkpoint_dir(run_dir)
    step_file = save_checkpoint(folder / f"step_{step:07d}.pt", state)
    with atomic_path(folder / "last.pt") as tmp:
        shutil.copyfile(step_file, tmp)
    for old in sorted(folder.glob("step_*.pt"))[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return step_file


def model_constants(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's non-persistent buffers (constants defined by the code, not learned), by name, on the CPU."""
    persistent = set(model.state_dict())
    return {name: buf.detach().cpu().clone() for name, buf in model.named_buffers() if name not in persistent}


def check_constants(model: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """UserError naming every constant whose value in the checkpoint differs from the code's."""
    saved = ckpt.get("constants")
    if saved is None:
        log.warning("%s: holds no model constants (written by an older drivejepa); assuming they match", path)
        return
    mine = model_constants(model)
    changed = sorted(name for name in set(saved) | set(mine)
                     if name not in saved or name not in mine or saved[name].shape != mine[name].shape
                     or not torch.equal(saved[name].to(mine[name].dtype), mine[name]))
    if changed:
        raise UserError(f"{path}: the model constants {changed} differ from this code's; the weights were trained "
                        "with the old values, so this checkpoint would mean something else (use the drivejepa "
                        "version that wrote it)")


SHARD_FIELDS = ("cameras", "image_size", "lidar_points", "radar_points")


def shards_provenance(shard_dir: str | Path) -> dict:
    """What a checkpoint records about the shards it was trained on."""
    from drivejepa.data.shards import load_manifest

    manifest = load_manifest(shard_dir)
    return {"config_hash": manifest.get("config_hash"), "config": manifest.get("config", {})}


def check_shards(ckpt: dict, shard_dir: str | Path, path: str | Path, *, allow_other: bool = False) -> None:
    """Refuse (UserError) shards made with another preprocessing config than the checkpoint's, naming the fields
    that differ (cameras, image size, point counts); ``allow_other`` turns the refusal into a warning. Cameras the
    model needs and the shards lack are always refused."""
    trained = ckpt.get("shards")
    if not trained:
        log.warning("%s: records no shard config (written by an older drivejepa); shards are not compared", path)
        return
    now = shards_provenance(shard_dir)
    missing = [c for c in ckpt.get("cameras", []) if c not in now["config"].get("cameras", [])]
    if missing:
        raise UserError(f"{shard_dir}: shards lack cameras {missing} that {path} was trained with")
    if now["config_hash"] == trained["config_hash"]:
        return
    diffs = [f"{k} {trained['config'].get(k)!r} -> {now['config'].get(k)!r}" for k in SHARD_FIELDS
             if trained["config"].get(k) != now["config"].get(k)]
    what = ", ".join(diffs) or "other preprocessing settings"
    message = (f"{shard_dir}: shards made with preprocess config {now['config_hash']}, {path} was trained on "
               f"{trained['config_hash']} ({what})")
    if not allow_other:
        raise UserError(message + "; pass --allow-other-shards to use them anyway")
    log.warning("%s; used anyway (--allow-other-shards)", message)


def capture_rng() -> dict:
    """RNG states of python, numpy, torch (CPU) and every CUDA device, as tensors and plain lists."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict) -> None:
    py = rng["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = rng["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])


def config_of(ckpt: dict, source: str = "<checkpoint>") -> TrainConfig:
    if ckpt.get("format", 1) < FORMAT:
        raise UserError(f"{source}: checkpoint format {ckpt.get('format', 1)} holds a model whose state is one vector "
                        f"a frame; this drivejepa builds bird's-eye grid states (format {FORMAT}): train it again")
    return from_dict(TrainConfig, ckpt["config"], source)


def refuse_other_shards(checkpoint: str | Path, shard_dir: str | Path, *, allow_other: bool = False) -> None:
    """:func:`check_shards` for a checkpoint file: what ``evaluate`` and ``visualize`` run before any compute."""
    check_shards(load_checkpoint(checkpoint, mmap=True), shard_dir, checkpoint, allow_other=allow_other)


def load_world_model(path: str | Path, device: str | torch.device = "cpu"):
    """(WorldModel in eval mode on ``device``, its TrainConfig) from any checkpoint of a run."""
    from drivejepa.models.world_model import build_world_model

    ckpt = load_checkpoint(path, "cpu")
    cfg = config_of(ckpt, f"{path} (config)")
    if ckpt.get("cameras"):
        cfg.data.cameras = list(ckpt["cameras"])
    # The checkpoint holds the image weights; the file training started from need not exist where it is loaded.
    model = build_world_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_weights="")))
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as exc:  # shapes that differ
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:300])
        raise UserError(f"{path}: weights do not fit the model its config describes ({first})") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model its config describes "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    check_constants(model, ckpt, path)
    return model.to(device).eval(), cfg
