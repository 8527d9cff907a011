"""Training: DDP equals one process, kill-and-resume replays the same losses, non-finite batches, the smoke run."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from drivejepa.config import TrainConfig, load_config, save_config
from drivejepa.runtime import free_port
from drivejepa.training.checkpoint import find_latest, load_checkpoint, load_world_model
from drivejepa.training.metrics_log import read_metrics

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "pipelines/train_smoke.yaml"


def _cfg(shard_dir, *overrides) -> TrainConfig:
    """The smoke recipe, one thread, deterministic, logging every step, no validation (not needed here)."""
    return load_config(TrainConfig, SMOKE, [f"data.shards={shard_dir}", "threads=1", "deterministic=true",
                                            "log_every=1", "data.val_split=''", *overrides])


def _train_losses(run: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train" and "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps in {run}/metrics.jsonl: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_two_process_gloo_step_equals_one_process(shard_dir, tmp_path):
    from drivejepa.training.trainer import train

    # No BatchNorm (per-replica statistics by design of DDP) and no random dropping, so the two runs see the same
    # function of the same four windows: one process takes all four, each of two ranks takes two. The VICReg term's
    # statistics are over the whole batch (gathered over ranks), so it too must give the one-process step.
    cfg = _cfg(shard_dir, "model.image_backbone=test_efficientnet_gn", "model.modality_dropout=0.0",
               "model.action_dropout=0.0", "optim.amp=false", "optim.warmup_steps=0", "optim.max_steps=1",
               "data.batch_size=4", "loss.vicreg_weight=1.0")
    config = save_config(cfg, tmp_path / "ddp.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "drivejepa.train", "-q", "--config", str(config),
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(cfg, tmp_path / "single", progress=False)

    ddp = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")
    one = load_checkpoint(tmp_path / "single/checkpoints/last.pt")
    assert ddp["world_size"] == 2 and one["world_size"] == 1 and ddp["step"] == one["step"] == 1
    moved = 0
    assert ddp["model"].keys() == one["model"].keys()
    # Adam's first step is about lr x g / (|g| + eps): float noise in a gradient that is zero in exact arithmetic
    # (attention key biases) moves a weight by a part of lr = 3e-4. Weights are compared to 1e-4, the gradients
    # themselves tightly below.
    for name, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][name], value, rtol=0, atol=1e-4, msg=name)
    # Adam's first moment after one step is 0.1 x the gradient: the averaged DDP gradient equals the full batch's.
    for i, state in one["optimizer"]["state"].items():
        torch.testing.assert_close(ddp["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-8)
        moved += int(state["exp_avg"].abs().max() > 0)
    assert moved > 10, "the step changed almost nothing: the comparison would be vacuous"


def test_sigkilled_run_resumes_with_the_same_losses(shard_dir, tmp_path):
    from drivejepa.training.trainer import train

    # 21 train windows, batch 4: 6 steps an epoch. Checkpoints every 2 steps and at the epoch end (step 6).
    cfg = _cfg(shard_dir, "ckpt_every=2", "optim.max_steps=10", "optim.epochs=2")
    train(cfg, tmp_path / "whole", progress=False)
    reference = _train_losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 11))

    run = tmp_path / "killed"
    config = save_config(cfg, tmp_path / "resume.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "drivejepa.train", "-q", "--config", str(config), "--out",
                             str(run)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while max(_train_losses(run) or [0]) < 9:  # step 9: in the middle of the second epoch
            assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "training did not reach step 9"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    latest = find_latest(run)
    state = load_checkpoint(latest)
    steps = [load_checkpoint(p)["step"] for p in (run / "checkpoints").glob("*.pt")]
    assert state["step"] == max(steps) >= 8 and state["position"] > 0, (latest, state["step"], state["position"])

    summary = train(cfg, run, resume="auto", progress=False)
    assert summary["steps"] == 10
    resumed = _train_losses(run)
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-6, abs=1e-9), f"step {step}: {resumed[step]} != {loss}"


def _poison(monkeypatch, which):
    """Make WindowDataset items for which ``which(scene, start)`` holds carry a NaN lidar point."""
    from drivejepa.data.dataset import WindowDataset

    original = WindowDataset.__getitem__

    def getitem(self, i):
        item = original(self, i)
        if which(item["scene"], item["start"]):
            item["lidar"][0, 0, 0] = float("nan")
        return item

    monkeypatch.setattr(WindowDataset, "__getitem__", getitem)


def test_nonfinite_batch_is_skipped_and_logged_and_a_streak_stops_the_run(shard_dir, tmp_path, monkeypatch):
    from drivejepa.data.dataset import WindowDataset
    from drivejepa.training.trainer import TrainingStopped, train

    cfg = _cfg(shard_dir, "optim.max_steps=6", "ckpt_every=3")
    bad_scene, bad_start = WindowDataset(shard_dir, None, cfg.data.context, cfg.data.horizon).index[0]
    _poison(monkeypatch, lambda scene, start: (scene, start) == (bad_scene, bad_start))
    run = tmp_path / "run"
    summary = train(cfg, run, progress=False)
    assert summary["bad_steps"] == 1 and summary["steps"] == 6
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "nonfinite"]
    assert len(events) == 1
    length = cfg.data.context + cfg.data.horizon
    assert {"scene": bad_scene, "frames": [bad_start, bad_start + length - 1]} in events[0]["windows"]
    losses = _train_losses(run)
    assert events[0]["step"] not in losses and len(losses) == 5
    assert all(math.isfinite(v) for v in losses.values())
    model, _ = load_world_model(run / "checkpoints/last.pt")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())

    # Every window poisoned from here on: two bad steps in a row stop the run; last.pt stays the good one.
    last = run / "checkpoints/last.pt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    _poison(monkeypatch, lambda scene, start: True)
    more = load_config(TrainConfig, run / "config.yaml", ["optim.max_steps=12", "max_bad_steps=2"])
    with pytest.raises(TrainingStopped, match="2 non-finite losses in a row"):
        train(more, run, resume="auto", progress=False)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert load_checkpoint(last)["step"] == 6


def test_smoke_run_learns_and_writes_a_complete_run(smoke_run):
    records = read_metrics(smoke_run / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["split"] == "train" and "loss" in r]
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    val = [r for r in records if r["split"] == "val"]
    assert val and all(f"err_h{k}" in val[-1] and f"copy_last_h{k}" in val[-1] for k in (1, 2, 3, 4))
    # Learning, not collapsing: a collapsed encoder drives every latent to one point (copy-last error 0, ratio NaN)
    # or onto a line (effective rank 1, per-dimension spread 0). The held-out latents keep spread and more than one
    # direction, and the predictor beats copy-last on them (at its best validation: over the 30 steps of the tiny
    # model the ratio hovers around 1, 0.994-1.001 on the session world).
    last = val[-1]
    assert last["copy_last"] > 0 and min(r["ratio"] for r in val) < 1.0, val
    assert last["diag_effective_rank"] > 1.5 and last["diag_std_min"] > 0.01, last
    assert list((smoke_run / "tb").glob("events.out.tfevents.*"))
    cfg = load_config(TrainConfig, smoke_run / "config.yaml")
    model, loaded = load_world_model(smoke_run / "checkpoints/best.pt")
    assert loaded == cfg and not model.training
    assert find_latest(smoke_run) == smoke_run / "checkpoints/last.pt"


def test_existing_run_needs_resume_and_bad_shards_name_the_problem(smoke_run, tmp_path):
    from drivejepa.errors import UserError
    from drivejepa.training.trainer import train

    cfg = load_config(TrainConfig, smoke_run / "config.yaml")
    with pytest.raises(UserError, match="--resume auto"):
        train(cfg, smoke_run, progress=False)
    cfg.data.shards = str(tmp_path / "missing")
    with pytest.raises(UserError, match="missing"):
        train(cfg, tmp_path / "run", progress=False)


def test_validation_reports_how_much_the_predictions_depend_on_the_actions():
    from drivejepa.config import ModelConfig
    from drivejepa.models.world_model import WorldModel
    from drivejepa.training.distributed import DistInfo
    from drivejepa.training.validation import validate

    torch.manual_seed(0)
    cfg = TrainConfig()
    cfg.data.context, cfg.data.horizon = 2, 3
    model = WorldModel(ModelConfig(size="tiny"), ["CAM_FRONT"])
    g = torch.Generator().manual_seed(0)
    b, length = 4, 5
    batches = [{
        "lidar": torch.randn(b, length, 64, 4, generator=g) * 20,
        "lidar_mask": torch.ones(b, length, 64, dtype=torch.bool),
        "actions": torch.randn(b, length, 5, generator=g) * torch.tensor([3.0, 0.3, 0.05, 5.0, 0.1]),
        "action_valid": torch.ones(b, length, dtype=torch.bool),
    } for _ in range(2)]
    for batch in batches:       # the partner's past and future actions, as WindowDataset(shuffle_actions_seed) adds
        batch["shuffled_actions"] = batch["actions"].roll(1, dims=0)
    info = DistInfo()
    uses = validate(model, batches, cfg, info, contextlib.nullcontext)
    assert {"shuffled_h1", "action_ratio_h3", "action_ratio"} <= set(uses)
    assert uses["action_ratio"] != pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():       # cut both action pathways: the predictor now ignores the action entirely
        model.predictor.action_in[-1].weight.zero_()
        model.predictor.action_in[-1].bias.zero_()
    from drivejepa.models.bev import motion_matrix
    model.predictor.motion = lambda actions, known: motion_matrix(torch.zeros(*actions.shape[:-1], 3))
    ignores = validate(model, batches, cfg, info, contextlib.nullcontext)
    assert ignores["action_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert all(ignores[f"action_ratio_h{k}"] == pytest.approx(1.0, abs=1e-6) for k in (1, 2, 3))
    assert ignores["err"] == pytest.approx(ignores["shuffled"], abs=1e-7)


def test_a_rank_the_checkpoint_did_not_have_draws_its_own_random_numbers(shard_dir, tmp_path):
    """Resuming a one-process run on two processes: rank 1 must not replay rank 0's random stream (dropout masks)."""
    from drivejepa.training.trainer import train

    base = ["model.image_backbone=test_efficientnet_gn", "optim.amp=false", "data.batch_size=4", "ckpt_every=0"]
    train(_cfg(shard_dir, *base, "optim.max_steps=1"), tmp_path / "run", progress=False)
    config = save_config(_cfg(shard_dir, *base, "optim.max_steps=2"), tmp_path / "more.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "drivejepa.train", "-q", "--config", str(config),
           "--out", str(tmp_path / "run"), "--resume", "auto"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["step"] == 2 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_weight_decay_spares_embeddings_tokens_gates_biases_and_norms():
    from drivejepa.config import ModelConfig
    from drivejepa.models.world_model import WorldModel
    from drivejepa.training.optim import param_groups

    model = WorldModel(ModelConfig(size="tiny", image_backbone="test_resnet"), ["CAM_FRONT"])
    decay, spared = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and spared["weight_decay"] == 0.0
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed = {name_of[id(p)] for p in decay["params"]}
    not_decayed = {name_of[id(p)] for p in spared["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    assert not any(n.startswith("target_encoder.") for n in decayed | not_decayed)
    embeddings = ("pos_embed", "age_embed", "missing", "empty", "unseen", "unknown_action", "change_gate")
    for suffix in embeddings:
        found = [n for n in trainable if n.endswith(suffix)]
        assert found and all(n in not_decayed for n in found), suffix
    assert all(p.ndim >= 2 for p in decay["params"])
    assert {"predictor.out.1.weight", "encoder.head.weight", "encoder.lidar.mlp.0.weight"} <= decayed


def test_a_step_the_grad_scaler_skips_is_reported_as_skipped():
    from drivejepa.training.optim import scaler_step

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(p.sum() * float("inf")).backward()
    assert not scaler_step(scaler, opt)                    # inf gradient: no update, scale lowered
    assert torch.equal(p.detach(), torch.ones(3))
    opt.zero_grad()
    scaler.scale(p.sum()).backward()
    assert scaler_step(scaler, opt) and not torch.equal(p.detach(), torch.ones(3))
    off = torch.amp.GradScaler("cpu", enabled=False)
    p.sum().backward()
    assert scaler_step(off, opt)


def test_a_run_whose_last_step_is_a_periodic_save_still_writes_best(shard_dir, tmp_path):
    """The last step falls on a ckpt_every save inside an epoch: the final validation must still reach best.pt."""
    from drivejepa.training.trainer import train

    cfg = _cfg(shard_dir, "data.val_split=val", "optim.max_steps=2", "ckpt_every=2")
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 2 and summary["epochs"] < 1
    best = load_checkpoint(tmp_path / "run/checkpoints/best.pt")
    last = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert best["step"] == 2 and best["val"]["windows"] > 0 and last["val"] == best["val"]


def test_ray_train_launcher_runs_the_same_loop_and_shares_the_train_arguments(shard_dir, tmp_path, ray_session):
    """pipelines/ray_train.py: the arguments of `drivejepa train` plus the cluster's, and a run on Ray Train that
    writes the same run directory (and resumes the same way) as the other launchers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_train_launcher", REPO / "pipelines/ray_train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    config = save_config(_cfg(shard_dir, "optim.max_steps=2", "ckpt_every=0"), tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    code = launcher.main(["--config", str(config), "--out", str(run), "--num-workers", "1", "optim.lr=2e-4"])
    assert code == 0
    summary = (run / "summary.json").read_text()
    assert '"steps": 2' in summary and load_checkpoint(run / "checkpoints/last.pt")["config"]["optim"]["lr"] == 2e-4
    assert launcher.main(["--config", str(tmp_path / "missing.yaml"), "--out", str(run)]) == 2


def test_sibling_sampler_resumes_and_splits_whole_batches_over_ranks():
    """With sibling batches the sampler hands out whole batches: a resumed epoch continues with the batches an
    uninterrupted one would see, and two ranks get disjoint batches that keep each group together."""
    from drivejepa.training.distributed import DistInfo, ResumableSampler

    class Windows:
        def __len__(self):
            return 30

        def sibling_groups(self):
            return [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9]]

    one = ResumableSampler(Windows(), DistInfo(), shuffle=True, seed=3, sibling_batch=4)
    one.set_position(2)
    full = list(one)
    assert len(full) == len(one) and len(full) % 4 == 0 and set(full) == set(range(30))
    one.set_position(2, skip=8)
    assert list(one) == full[8:]
    ranks = [ResumableSampler(Windows(), DistInfo(rank=r, world_size=2), shuffle=True, seed=3, sibling_batch=4)
             for r in range(2)]
    for s in ranks:
        s.set_position(2)
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1])
    batches = [tuple(r[i:i + 4]) for r in per_rank for i in range(0, len(r), 4)]
    for g in Windows().sibling_groups():
        holding = [b for b in batches if set(b) & set(g)]
        assert all(len(set(b) & set(g)) >= 2 for b in holding)
