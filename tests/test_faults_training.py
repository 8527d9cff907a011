"""Fault injection, training side: SIGTERM, unreadable checkpoints, resume with other settings, checkpoints that do
not fit, shards that do not fit the checkpoint, NaN in validation data, an empty schedule. Each test asserts what the
user sees (exit code, one line naming the file or key) and what is kept."""
from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from drivejepa.cli import main
from drivejepa.config import TrainConfig, load_config, save_config
from drivejepa.errors import UserError
from drivejepa.training.checkpoint import (check_shards, find_latest, load_checkpoint, load_world_model,
                                           save_checkpoint)
from drivejepa.training.metrics_log import read_metrics
from test_faults import error_line, rewrite

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines/train_smoke.yaml"
TIMING = ("windows_per_s", "data_wait", "time", "seconds")


def _cfg(shard_dir, *overrides) -> TrainConfig:
    """The smoke recipe, deterministic on one thread, logging every step; validation on the val split."""
    return load_config(TrainConfig, SMOKE, [f"data.shards={shard_dir}", "threads=1", "deterministic=true",
                                            "log_every=1", *overrides])


def _records(run: Path) -> dict[tuple[str, int], dict]:
    """metrics.jsonl by (split, step), without wall-clock fields; a step logged twice fails."""
    out = {}
    for r in read_metrics(run / "metrics.jsonl"):
        if r.get("split") not in ("train", "val"):
            continue
        key = (r["split"], r["step"])
        assert key not in out, f"{run}: {key} logged twice"
        out[key] = {k: v for k, v in r.items() if not any(t in k for t in TIMING)}
    return out


def _signal_at(monkeypatch, step: int, signum=signal.SIGTERM) -> None:
    """Deliver ``signum`` to this process while training step ``step`` runs (what a cluster does at any moment)."""
    from drivejepa.training.trainer import _Run

    original = _Run._train_step

    def train_step(self, batch):
        out = original(self, batch)
        if self.step + 1 == step:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(_Run, "_train_step", train_step)


def test_sigterm_saves_the_current_step_and_the_resumed_run_equals_an_uninterrupted_one(shard_dir, tmp_path,
                                                                                        monkeypatch, capsys):
    from drivejepa.training.trainer import EXIT_INTERRUPTED, train

    # 21 train windows, batch 4: 6 steps an epoch; validation at steps 6, 12 and 14. SIGTERM in step 8.
    cfg = _cfg(shard_dir, "ckpt_every=0", "optim.max_steps=14", "optim.epochs=3")
    train(cfg, tmp_path / "whole", progress=False)
    reference = _records(tmp_path / "whole")
    assert {s for split, s in reference if split == "val"} == {6, 12, 14}

    config = save_config(cfg, tmp_path / "cfg.yaml")
    run = tmp_path / "stopped"
    argv = ["train", "-q", "--config", str(config), "--out", str(run)]
    with monkeypatch.context() as m:
        _signal_at(m, 8)
        assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert "SIGTERM at step 8" in line and str(run / "checkpoints" / "last.pt") in line and "--resume auto" in line
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 8 and state["position"] == 2 and state["val_step"] == 6

    assert main(argv + ["--resume", "auto"]) == 0
    resumed = _records(run)
    assert sorted(resumed) == sorted(reference)
    for key, record in reference.items():
        for name, value in record.items():
            if isinstance(value, float) and math.isfinite(value):
                assert resumed[key][name] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, name)
            else:
                assert resumed[key][name] == value, (key, name)


def test_checkpoints_rotate_and_stale_temporary_files_are_removed(shard_dir, tmp_path):
    from drivejepa.io import _host
    from drivejepa.training.trainer import train

    run = tmp_path / "run"
    stale = run / "checkpoints" / f".last.pt.{_host()}-999999999.abcdef.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    cfg = _cfg(shard_dir, "data.val_split=''", "ckpt_every=2", "optim.max_steps=8", "keep_checkpoints=2")
    # A temporary file alone is not a checkpoint: the run starts.
    train(cfg, run, resume="auto", progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step_0000006.pt", "step_0000008.pt"], names


def _copy_run(smoke_run: Path, dest: Path) -> Path:
    shutil.copytree(smoke_run, dest)
    return dest


def test_an_unreadable_last_checkpoint_falls_back_to_the_newest_readable_one(smoke_run, tmp_path, caplog):
    from drivejepa.training.trainer import train

    run = _copy_run(smoke_run, tmp_path / "run")
    before = _records(run)
    best = (run / "checkpoints" / "best.pt").read_bytes()
    (run / "checkpoints" / "last.pt").write_bytes(b"\0" * 1000)
    newest = find_latest(run)
    assert newest.name.startswith("step_") and "last.pt" in caplog.text
    cfg = load_config(TrainConfig, run / "config.yaml")
    summary = train(cfg, run, resume="auto", progress=False)
    assert summary["steps"] == load_checkpoint(newest)["step"] == 30
    assert _records(run) == before  # nothing repeated, nothing started over
    assert (run / "checkpoints" / "best.pt").read_bytes() == best


def test_no_readable_checkpoint_refuses_to_start_over_and_keeps_best(smoke_run, tmp_path, capsys):
    run = _copy_run(smoke_run, tmp_path / "run")
    best = (run / "checkpoints" / "best.pt").read_bytes()
    for path in (run / "checkpoints").glob("*.pt"):
        if path.name != "best.pt":
            path.write_bytes(path.read_bytes()[:500])
    assert main(["train", "-q", "--config", str(run / "config.yaml"), "--out", str(run), "--resume", "auto"]) == 2
    line = error_line(capsys)
    assert "last.pt" in line and "refusing to start over" in line
    assert (run / "checkpoints" / "best.pt").read_bytes() == best
    assert max(s for _, s in _records(run)) == 30


def test_resume_applies_and_records_a_new_learning_rate(shard_dir, tmp_path):
    from drivejepa.training.optim import build_optimizer, build_scheduler, step_scheduler
    from drivejepa.training.trainer import train

    run = tmp_path / "run"
    base = ["data.val_split=''", "ckpt_every=0", "optim.warmup_steps=0"]
    train(_cfg(shard_dir, *base, "optim.max_steps=3"), run, progress=False)
    cfg = _cfg(shard_dir, *base, "optim.max_steps=5", "optim.lr=0.03", "optim.weight_decay=0.1")
    train(cfg, run, resume="auto", progress=False)

    # The lr logged after steps 4 and 5 is the new schedule's (lr 0.03) after 4 and 5 steps, not the old one's.
    probe = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    schedule = build_scheduler(probe, cfg.optim)
    expected = [probe.param_groups[0]["lr"]]
    for _ in range(5):
        step_scheduler(schedule)
        expected.append(probe.param_groups[0]["lr"])
    logged = {s: r["lr"] for (split, s), r in _records(run).items() if split == "train"}
    assert logged[4] == pytest.approx(expected[4]) and logged[5] == pytest.approx(expected[5])
    assert logged[5] > 0.01
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(0.1)
    assert state["optimizer"]["param_groups"][1]["weight_decay"] == 0.0
    assert load_config(TrainConfig, run / "config.yaml").optim.lr == pytest.approx(0.03)
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "resume_changes"
              or r.get("kind") == "resume_changes"]
    assert events and any("optim.lr" in c for c in events[-1]["applied"])


@pytest.mark.parametrize("override, fragment", [
    ("model.size=demo", "another model architecture (model.bev_size: 8 -> 16; model.fusion_depth: 1 -> 2"),
    ("data.batch_size=8", "another data order (data.batch_size: 4 -> 8)"),
])
def test_resume_refuses_another_architecture_or_data_order_in_one_line(smoke_run, tmp_path, capsys, override,
                                                                        fragment):
    run = _copy_run(smoke_run, tmp_path / "run")
    assert main(["train", "-q", "--config", str(SMOKE), "--out", str(run), "--resume", "auto",
                 f"data.shards={load_config(TrainConfig, run / 'config.yaml').data.shards}", override]) == 2
    assert fragment in error_line(capsys)


def test_a_checkpoint_whose_config_does_not_fit_its_weights_is_one_line(smoke_run, tmp_path):
    ckpt = load_checkpoint(smoke_run / "checkpoints" / "best.pt")
    ckpt["config"]["model"].update(size="custom", latent_dim=48)
    save_checkpoint(tmp_path / "bad.pt", ckpt)
    with pytest.raises(UserError, match=r"bad.pt: weights do not fit the model its config describes") as info:
        load_world_model(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


def test_a_checkpoint_whose_constants_differ_from_the_code_is_refused_naming_them(smoke_run, tmp_path):
    ckpt = load_checkpoint(smoke_run / "checkpoints" / "best.pt")
    assert "predictor.action_scales" in ckpt["constants"]
    ckpt["constants"]["predictor.action_scales"] = ckpt["constants"]["predictor.action_scales"] * 2
    save_checkpoint(tmp_path / "old.pt", ckpt)
    with pytest.raises(UserError, match=r"old.pt: the model constants \['predictor.action_scales'\] differ"):
        load_world_model(tmp_path / "old.pt")


def test_the_checkpoint_records_the_resolved_architecture(smoke_run):
    from drivejepa.config import SIZE_PRESETS

    ckpt = load_checkpoint(smoke_run / "checkpoints" / "best.pt")
    for key, value in SIZE_PRESETS["tiny"].items():
        assert ckpt["config"]["model"][key] == value, key
    assert load_config(TrainConfig, smoke_run / "config.yaml").model.lidar_widths == SIZE_PRESETS["tiny"]["lidar_widths"]


def _other_image_size(shard_dir: Path, dest: Path) -> Path:
    """A shard directory made (by its manifest and shard headers) with another image size."""
    import json

    shutil.copytree(shard_dir, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["config"]["image_size"] = [56, 32]
    manifest["config_hash"] = "feedfacefeedface"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    for path in dest.glob("*.shard"):
        rewrite(path, lambda meta: meta.update(config_hash="feedfacefeedface"))
    return dest


def test_evaluate_refuses_shards_of_another_preprocessing_before_any_compute(smoke_run, shard_dir, tmp_path,
                                                                            capsys):
    shards = _other_image_size(shard_dir, tmp_path / "shards")
    out = tmp_path / "eval"
    assert main(["evaluate", "-q", "--checkpoint", str(smoke_run / "checkpoints" / "best.pt"), "--shards",
                 str(shards), "--out", str(out), "--num-workers", "0"]) == 2
    line = error_line(capsys)
    assert "image_size [112, 64] -> [56, 32]" in line and "--allow-other-shards" in line
    assert not out.exists()
    ckpt = load_checkpoint(smoke_run / "checkpoints" / "best.pt")
    check_shards(ckpt, shards, "best.pt", allow_other=True)  # the override: a warning, not a refusal


def test_resume_refuses_shards_of_another_preprocessing(smoke_run, shard_dir, tmp_path, capsys):
    run = _copy_run(smoke_run, tmp_path / "run")
    shards = _other_image_size(shard_dir, tmp_path / "shards")
    assert main(["train", "-q", "--config", str(run / "config.yaml"), "--out", str(run), "--resume", "auto",
                 "--shards", str(shards)]) == 2
    assert "image_size [112, 64] -> [56, 32]" in error_line(capsys)


def test_nan_in_a_validation_shard_is_skipped_and_reported(shard_dir, tmp_path):
    from drivejepa.data.shards import scenes_in_split, shard_path
    from drivejepa.training.trainer import train

    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    val = scenes_in_split(shards, "val")[0]

    def poison(arrays):
        arrays["lidar"][3:5, :, :] = np.nan

    rewrite(shard_path(shards, val), array_change=poison)
    run = tmp_path / "run"
    summary = train(_cfg(shards, "ckpt_every=0", "optim.max_steps=6", "optim.epochs=1"), run, progress=False)
    assert summary["val"]["nonfinite_windows"] > 0 and summary["val"]["windows"] > 0
    assert math.isfinite(summary["val"]["ratio"])
    assert (run / "checkpoints" / "best.pt").is_file()


def test_zero_epochs_is_refused_before_a_run_directory_exists(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-q", "--config", str(SMOKE), "--shards", str(shard_dir), "--out", str(out),
                 "optim.epochs=0"]) == 2
    assert "optim.epochs" in error_line(capsys) and not out.exists()


def test_nan_in_an_evaluation_shard_is_skipped_and_reported(smoke_run, shard_dir, tmp_path):
    from drivejepa.data.shards import scenes_in_split, shard_path
    from drivejepa.evaluation.runner import evaluate

    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    scenes = scenes_in_split(shards, "train")

    def poison(arrays):
        arrays["lidar"][3:5, :, :] = np.nan

    rewrite(shard_path(shards, scenes[0]), array_change=poison)
    metrics = evaluate(smoke_run / "checkpoints" / "best.pt", shards, tmp_path / "eval", split="train",
                       num_workers=0, progress=False, overrides=["probe_epochs=5", "train_split=val"])
    assert metrics["settings"]["nonfinite_windows"] > 0 and metrics["settings"]["windows"] > 0
    skipped = metrics["provenance"]["skipped_scenes"]
    assert [s["scene"] for s in skipped] == [scenes[0]] and "non-finite latents" in skipped[0]["reason"]
    assert metrics["provenance"]["eval_scenes"] == scenes[1:]


def test_a_checkpoint_of_a_one_vector_state_is_refused_in_one_line(smoke_run, tmp_path):
    """Formats 1 and 2 hold models whose state is one vector a frame: no code reads them since the grid state."""
    ckpt = load_checkpoint(smoke_run / "checkpoints" / "best.pt")
    for old in (1, 2):
        ckpt["format"] = old
        torch.save(ckpt, tmp_path / f"v{old}.pt")
        with pytest.raises(UserError, match=rf"v{old}.pt.*format {old}.*train it again"):
            load_world_model(tmp_path / f"v{old}.pt")


def test_a_full_disk_while_checkpointing_stops_with_the_path_and_keeps_the_last_good_checkpoint(
        shard_dir, tmp_path, monkeypatch, capsys):
    import contextlib
    import errno

    from drivejepa.io import atomic_path
    from drivejepa.training import checkpoint as ckpt_mod

    writes = []

    @contextlib.contextmanager
    def filling(path):
        with atomic_path(path) as tmp:
            yield tmp
            writes.append(path)
            if len(writes) > 2:  # step_0000002.pt and last.pt fit, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod, "atomic_path", filling)
    config = save_config(_cfg(shard_dir, "data.val_split=''", "ckpt_every=2", "optim.max_steps=6"),
                         tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    assert main(["train", "-q", "--config", str(config), "--out", str(run)]) == 2
    assert error_line(capsys) == (f"drivejepa train: error: {run / 'checkpoints' / 'step_0000004.pt'}: "
                                  "No space left on device")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_sigint_also_saves_the_current_step_and_exits_75(shard_dir, tmp_path, monkeypatch, capsys):
    config = save_config(_cfg(shard_dir, "data.val_split=''", "ckpt_every=0", "optim.max_steps=6"),
                         tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)     # SIG_IGN when the suite runs in a background job
    _signal_at(monkeypatch, 3, signal.SIGINT)
    assert main(["train", "-q", "--config", str(config), "--out", str(run)]) == 75
    assert "SIGINT at step 3" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_visualize_names_a_corrupt_scene_before_any_compute(smoke_run, shard_dir, tmp_path, capsys):
    from drivejepa.data.shards import scenes_in_split, shard_path
    from test_faults import _flip_image_bytes

    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    scene = scenes_in_split(shards, "val")[0]
    _flip_image_bytes(shard_path(shards, scene))
    out = tmp_path / "vis"
    assert main(["visualize", "-q", "--checkpoint", str(smoke_run / "checkpoints" / "best.pt"), "--shards",
                 str(shards), "--scene", scene, "--out", str(out), "--no-progress"]) == 2
    line = error_line(capsys)
    assert str(shard_path(shards, scene)) in line and "fails its checksum" in line and not out.exists()
