"""The predictor stage (drivejepa/training/predictor_stage.py): the predictor alone on cached target latents."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from drivejepa.config import TrainConfig, load_config
from drivejepa.data.dataset import WindowDataset, collate_windows
from drivejepa.data.shards import scenes_in_split
from drivejepa.training import checkpoint as ckpt_mod
from drivejepa.training import predictor_stage
from drivejepa.training.metrics_log import read_metrics
from drivejepa.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
STAGE = ["predictor_stage.steps=6", "predictor_stage.val_every=3", "predictor_stage.batch_size=4",
         "predictor_stage.warmup_steps=1", "predictor_stage.lr=5e-3"]


def _cfg(shard_dir, *overrides) -> TrainConfig:
    return load_config(TrainConfig, REPO / "pipelines/train_smoke.yaml",
                       [f"data.shards={shard_dir}", "threads=1", "deterministic=true", *STAGE, *overrides])


def _joint_steps(run: Path) -> int:
    return int(json.loads((run / "summary.json").read_text())["steps"])


def _weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt_mod.load_checkpoint(path)["model"].items() if k.startswith(prefix)}


def test_cached_latents_are_the_target_encoders_latents_of_each_window(smoke_run, shard_dir):
    model, cfg = ckpt_mod.load_world_model(smoke_run / "checkpoints/best.pt")
    windows = WindowDataset(shard_dir, scenes_in_split(shard_dir, "val"), context=cfg.data.context,
                            horizon=cfg.data.horizon, cameras=cfg.data.cameras)
    cached = predictor_stage.LatentWindows(windows, model, contextlib.nullcontext, batch_frames=5, progress=False)
    for i in (0, len(windows) // 2, len(windows) - 1):
        item = cached[i]
        with torch.no_grad():
            expected = model.context_states(collate_windows([windows[i]]))[0]
        torch.testing.assert_close(item["latents"], expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(item["actions"], windows[i]["actions"])
        assert "images" not in item and "lidar" not in item


def test_stage_trains_the_predictor_alone_and_best_pt_keeps_the_encoders(smoke_run, shard_dir, tmp_path):
    run = shutil.copytree(smoke_run, tmp_path / "run")
    before = run / "checkpoints/best_before.pt"
    shutil.copyfile(run / "checkpoints/best.pt", before)
    summary = train(_cfg(shard_dir), run, resume="auto", progress=False)
    stage = summary["predictor_stage"]
    assert stage["steps"] == 6 and stage["train_windows"] > 0
    assert stage["val"]["windows"] > 0
    for prefix in ("encoder.", "target_encoder."):
        old, new = _weights(before, prefix), _weights(run / "checkpoints/best.pt", prefix)
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old), prefix
    trained = ckpt_mod.load_checkpoint(run / "checkpoints" / predictor_stage.STAGE_CHECKPOINT)["predictor"]
    old = _weights(before, "predictor.")
    assert any(not torch.equal(old[f"predictor.{k}"], v) for k, v in trained.items())
    best = ckpt_mod.load_checkpoint(run / "checkpoints/best.pt")
    improved = best["best_error"] < ckpt_mod.load_checkpoint(before)["best_error"]
    joint = _joint_steps(smoke_run)
    assert improved == (best["step"] > joint)          # best.pt takes the stage's predictor only when val improves
    assert stage["best_error"] == best["best_error"]
    logged = [r for r in read_metrics(run / "predictor_stage.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in logged] == [3, 6]
    ckpt_mod.load_world_model(run / "checkpoints/best.pt")
    again = train(_cfg(shard_dir), run, resume="auto", progress=False)["predictor_stage"]
    assert again["steps"] == 6 and again["best_error"] == stage["best_error"]   # done: nothing rerun


def test_stage_killed_midway_resumes_to_the_same_predictor(smoke_run, shard_dir, tmp_path, monkeypatch, caplog):
    straight = shutil.copytree(smoke_run, tmp_path / "straight")
    train(_cfg(shard_dir), straight, resume="auto", progress=False)

    interrupted = shutil.copytree(smoke_run, tmp_path / "interrupted")
    save = ckpt_mod.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        out = save(path, state)
        if Path(path).name == predictor_stage.STAGE_CHECKPOINT and state["step"] == 3:
            raise Killed
        return out

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_then_die)
    try:
        train(_cfg(shard_dir), interrupted, resume="auto", progress=False)
    except Killed:
        pass
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save)
    assert ckpt_mod.load_checkpoint(interrupted / "checkpoints" / predictor_stage.STAGE_CHECKPOINT)["step"] == 3
    legacy = shutil.copytree(interrupted, tmp_path / "legacy")
    train(_cfg(shard_dir), interrupted, resume="auto", progress=False)
    a = ckpt_mod.load_checkpoint(straight / "checkpoints" / predictor_stage.STAGE_CHECKPOINT)["predictor"]
    b = ckpt_mod.load_checkpoint(interrupted / "checkpoints" / predictor_stage.STAGE_CHECKPOINT)["predictor"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(interrupted / "predictor_stage.jsonl") if r["split"] == "val"]
    assert steps == [3, 6]

    # a half-done stage of the code before the joint run's optimiser recipe: its optimiser and schedule states do
    # not fit this recipe's, so the stage starts over (and says why) instead of failing to load them
    state_path = legacy / "checkpoints" / predictor_stage.STAGE_CHECKPOINT
    state = ckpt_mod.load_checkpoint(state_path)
    del state["recipe"]
    ckpt_mod.save_checkpoint(state_path, state)
    with caplog.at_level("WARNING", logger="drivejepa.training.predictor_stage"):
        redone = train(_cfg(shard_dir), legacy, resume="auto", progress=False)["predictor_stage"]
    assert "older optimiser recipe" in caplog.text and redone["steps"] == 6
