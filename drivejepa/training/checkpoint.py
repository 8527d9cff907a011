"""Checkpoints: one dict written atomically with torch.save, read back with weights_only=True.

Layout of RUN/checkpoints/: ``last.pt`` (rewritten every ``ckpt_every`` steps and at each epoch end),
``step_XXXXXXX.pt`` (kept at each epoch end), ``best.pt`` (lowest validation latent error relative
to copy-last, averaged over horizons). Each holds
``config`` (config_to_dict(TrainConfig)), ``cameras``, ``model`` (WorldModel.state_dict(): online encoder, EMA
target encoder, predictor) and the resume state: optimizer, scheduler, scaler, RNG states, step, epoch, position
(batches of the epoch already consumed), best validation error and the world size the run had."""
from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from drivejepa.config import TrainConfig, from_dict
from drivejepa.errors import UserError
from drivejepa.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` so that ``path`` is either the old file or the complete new one, never a partial file."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise UserError(f"{path}: not a readable drivejepa checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path}: not a drivejepa checkpoint (no 'model' and 'config' entries)")
    return ckpt


def find_latest(run_dir: str | Path) -> Optional[Path]:
    """The resumable checkpoint of RUN with the highest step (``last.pt`` wins a tie), or None when there is none."""
    folder = checkpoint_dir(run_dir)
    candidates = sorted(folder.glob("step_*.pt")) + [folder / "last.pt"]
    best: Optional[tuple[int, int, Path]] = None
    for rank, path in enumerate(candidates):
        if not path.is_file():
            continue
        try:
            step = int(load_checkpoint(path, mmap=True).get("step", -1))
        except UserError as exc:
            log.warning("skipping %s", exc)
            continue
        key = (step, rank, path)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


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
    return from_dict(TrainConfig, ckpt["config"], source)


def load_world_model(path: str | Path, device: str | torch.device = "cpu"):
    """(WorldModel in eval mode on ``device``, its TrainConfig) from any checkpoint of a run."""
    from drivejepa.models.world_model import build_world_model

    ckpt = load_checkpoint(path, "cpu")
    cfg = config_of(ckpt, f"{path} (config)")
    if ckpt.get("cameras"):
        cfg.data.cameras = list(ckpt["cameras"])
    # The checkpoint holds the image weights; the file training started from need not exist where it is loaded.
    model = build_world_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image_weights="")))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the model its config describes "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), cfg
