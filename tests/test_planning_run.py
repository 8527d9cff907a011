"""The planner on a real (smoke-trained) checkpoint: cost heads fitted beside the run, the library API a driver
calls, the ``plan`` verb, the evaluation's planning section and ``bench plan``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drivejepa.config import PlanConfig


@pytest.fixture(scope="module")
def small_plan_cfg():
    cfg = PlanConfig(device="cpu")
    cfg.optimizer.candidates, cfg.optimizer.iterations = 8, 2
    cfg.heads.steps, cfg.heads.rollout_steps, cfg.ego_mlp.steps = 60, 60, 60
    cfg.recovery.candidates, cfg.recovery.iterations, cfg.recovery.gradient_steps = 8, 1, 2
    cfg.recovery.max_windows, cfg.recovery.landscape_size = 2, 3
    return cfg


def test_planner_api_on_a_trained_checkpoint(smoke_run, shard_dir, small_plan_cfg):
    from drivejepa.data.shards import read_shard, shard_path
    from drivejepa.planning.heads import ensure_heads, heads_path, heads_settings
    from drivejepa.planning.motion import controls_to_actions, integrate
    from drivejepa.planning.planner import Planner, observation_history
    from drivejepa.training.checkpoint import load_world_model
    from drivejepa.visualization.decoder_training import camera_index

    ckpt = smoke_run / "checkpoints" / "last.pt"
    model, train_cfg = load_world_model(ckpt)
    heads, meta, path = ensure_heads(ckpt, model, train_cfg, shard_dir, small_plan_cfg, progress=False)
    assert path == heads_path(ckpt, heads_settings(shard_dir, small_plan_cfg)) and path.is_file()
    assert min(meta["train_frames"].values()) > 0
    assert set(meta["train_frames"]) == {"states", "rollouts"}             # a set fitted on the model's own rollouts
    assert heads.spec.bev_size == model.bev_size
    again, _, _ = ensure_heads(ckpt, model, train_cfg, shard_dir, small_plan_cfg, progress=False)
    assert all((a == b).all() for a, b in zip(again.state_dict().values(), heads.state_dict().values()))

    shard = read_shard(shard_path(shard_dir, "scene-0003"))
    context = train_cfg.data.context
    planner = Planner(model, heads, small_plan_cfg)
    plans = []
    for t in (context, context + 1):                                     # receding horizon, warm started
        obs = observation_history(shard.arrays, np.arange(t - context + 1, t + 1), camera_index(shard, model))
        plans.append(planner.plan(obs, np.asarray(shard.arrays["actions"][:t]), "straight"))
    for plan in plans:
        h = small_plan_cfg.horizon
        assert plan.actions.shape == (h, 5) and plan.trajectory.shape == (h + 1, 3)
        np.testing.assert_allclose(plan.actions, controls_to_actions(plan.controls, 0.5), atol=1e-5)
        np.testing.assert_allclose(plan.trajectory, integrate(plan.actions), atol=1e-4)
        assert plan.candidates.shape == (small_plan_cfg.optimizer.candidates, h + 1, 3)
        assert np.isfinite(plan.cost) and set(plan.terms) == {"collision", "drivable", "headway", "progress",
                                                              "command", "comfort", "jerk"}
        assert plan.latency_ms["encode"] > 0 and plan.latency_ms["optimise"] > 0


def test_cost_heads_and_ego_mlp_are_refitted_when_their_settings_change(smoke_run, shard_dir, small_plan_cfg, tmp_path,
                                                                         caplog):
    """The heads and the ego-status MLP kept beside a run are reused only with the settings they were fitted with:
    another ``heads.steps`` or ``ego_mlp.hidden`` fits its own (kept beside the first, so two drivers with different
    settings do not refit one file in turn), the same settings reuse theirs, and a file whose content does not match
    its settings is refitted, saying why."""
    import dataclasses
    import logging
    import shutil

    from drivejepa.planning.ego_mlp import ensure_ego_mlp
    from drivejepa.planning.heads import ensure_heads
    from drivejepa.training.checkpoint import load_world_model

    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(smoke_run / "checkpoints" / "last.pt", ckpt)
    model, train_cfg = load_world_model(ckpt)
    cfg = dataclasses.replace(small_plan_cfg, heads=dataclasses.replace(small_plan_cfg.heads, rollouts=False))
    _, first, _ = ensure_heads(ckpt, model, train_cfg, shard_dir, cfg, progress=False)
    _, same, _ = ensure_heads(ckpt, model, train_cfg, shard_dir, cfg, progress=False)
    assert same["fit_seconds"] == first["fit_seconds"]
    other = dataclasses.replace(cfg, heads=dataclasses.replace(cfg.heads, steps=cfg.heads.steps + 1))
    _, refit, other_path = ensure_heads(ckpt, model, train_cfg, shard_dir, other, progress=False)
    assert refit["config"]["steps"] == cfg.heads.steps + 1
    _, again, path = ensure_heads(ckpt, model, train_cfg, shard_dir, cfg, progress=False)   # the first is kept
    assert again["fit_seconds"] == first["fit_seconds"] and path != other_path and other_path.is_file()
    shutil.copy(other_path, path)              # a file that does not hold what its settings ask for is refitted
    with caplog.at_level(logging.INFO, logger="drivejepa.planning.heads"):
        _, fixed, _ = ensure_heads(ckpt, model, train_cfg, shard_dir, cfg, progress=False)
    assert fixed["config"]["steps"] == cfg.heads.steps
    assert any(f"config.steps: {cfg.heads.steps + 1} -> {cfg.heads.steps}" in r.getMessage() for r in caplog.records)

    _, mlp, _ = ensure_ego_mlp(ckpt, train_cfg, shard_dir, cfg, progress=False)
    assert ensure_ego_mlp(ckpt, train_cfg, shard_dir, cfg, progress=False)[1]["fit_seconds"] == mlp["fit_seconds"]
    wider = dataclasses.replace(cfg, ego_mlp=dataclasses.replace(cfg.ego_mlp, hidden=cfg.ego_mlp.hidden // 2))
    model_mlp, refit_mlp, _ = ensure_ego_mlp(ckpt, train_cfg, shard_dir, wider, progress=False)
    assert refit_mlp["config"]["hidden"] == cfg.ego_mlp.hidden // 2 and model_mlp.spec.hidden == cfg.ego_mlp.hidden // 2
    assert ensure_ego_mlp(ckpt, train_cfg, shard_dir, cfg, progress=False)[1]["fit_seconds"] == mlp["fit_seconds"]


def test_planning_section_and_plan_verb_on_a_trained_checkpoint(smoke_run, shard_dir, branch_shards, small_plan_cfg,
                                                                 tmp_path, capsys):
    """The planning section of ``evaluate`` on the branch world's val split plans factual windows and the branch
    windows (a branch's window at its branch frame), and recovers actions on both; planner variants plan the same
    windows beside the default (one with no change plans exactly what the default does)."""
    import copy

    import yaml

    from drivejepa import cli
    from drivejepa.config import config_to_dict

    ckpt = smoke_run / "checkpoints" / "last.pt"
    plan_yaml = tmp_path / "plan.yaml"
    cfg = copy.deepcopy(small_plan_cfg)
    cfg.horizon = 4                                  # the branch world's branches run 5 key frames past their branch
    plan_yaml.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--shards", str(branch_shards), "--split", "val",
                     "--out", str(tmp_path / "eval"), "--num-workers", "0", "--no-progress", "--plan-config",
                     str(plan_yaml), "--plan-variant", "same:", "--plan-variant",
                     "smooth: accel_decay=0.7 weights.jerk=2.0", "--allow-other-shards", "probe_epochs=20",
                     "horizon=3"]) == 0
    section = json.loads((tmp_path / "eval" / "metrics.json").read_text())["planning"]
    methods = section["open_loop"]["factual"]["methods"]
    assert set(methods) == {"world_model", "world_model[same]", "world_model[smooth]", "constant_velocity", "ego_mlp",
                            "expert"}
    assert methods["world_model[same]"] == methods["world_model"]
    assert section["planner"]["variants"] == {"same": [], "smooth": ["accel_decay=0.7", "weights.jerk=2.0"]}
    l2 = methods["world_model"]["l2_m"]["stp3"]                 # at 1, 2 and 3 s; a 2 s plan has none at 3 s
    assert all(v is not None and v >= 0 for v in l2[:2]) and l2[2] is None
    assert 1 <= section["open_loop"]["factual"]["windows"] <= cfg.eval_windows
    assert section["open_loop"]["branch"]["windows"] >= 1
    assert section["action_recovery"]["factual"]["windows"] == 2
    assert section["action_recovery"]["branch"]["windows"] >= 1
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Planning (open loop)" in report and "## Action recovery" in report
    assert "`world_model[smooth]`: the same planner with accel_decay=0.7 weights.jerk=2.0" in report
    args = ["plan", "--checkpoint", str(ckpt), "--shards", str(shard_dir), "--scene", "scene-0003", "--out",
            str(tmp_path / "plan"), "--no-progress", "optimizer.candidates=8", "optimizer.iterations=1", "device=cpu"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert len(summary["decisions"]) == 1 and "1 decisions" in capsys.readouterr().out
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "plan", "--checkpoint", str(ckpt), "--shards", str(shard_dir), "--repeats", "1",
                     "--warmup", "0", "--threads", "1", "--out", str(out), "optimizer.candidates=8",
                     "optimizer.iterations=1"]) == 0
    bench = json.loads(out.read_text())
    assert bench["heads"] == "fitted beside the checkpoint"          # the ones `plan` fitted for these settings
    assert bench["decision_ms"] > 0 and bench["encode_ms"] > 0 and bench["rollouts_per_decision"] == 9
    assert ("fp32" in bench) == (bench["precision"]["dtype"] != "float32")    # fp32 timed beside any other choice


def test_planners_drive_the_closed_loop(smoke_run, shard_dir, tmp_path):
    """The world-model planner and the ego-status MLP drive ``drivejepa drive`` through the factory mechanism: each
    decides every key frame from what the simulator rendered (and the route command), and the run is scored."""
    from drivejepa.config import DriveConfig, DriverSpec, load_config
    from drivejepa.driving.runner import drive

    from test_driving import REPO, TINY

    ckpt = str(smoke_run / "checkpoints" / "last.pt")
    small = ["device=cpu", "optimizer.candidates=8", "optimizer.iterations=2", "heads.steps=60",
             "heads.rollout_steps=60", "ego_mlp.steps=60"]
    cfg = load_config(DriveConfig, REPO / "eval/drive.yaml", [*TINY, "steps=2"])
    cfg.drivers = [DriverSpec(name, "factory", f"drivejepa.planning.drivers:{name}",
                              {"checkpoint": ckpt, "shards": str(shard_dir), "overrides": small})
                   for name in ("world_model", "ego_mlp")]
    metrics = drive(cfg, tmp_path / "d", num_workers=0, progress=False)
    runs = {r["driver"]: r for r in metrics["runs"]}
    assert set(runs) == {"world_model", "ego_mlp"}
    for run in runs.values():
        assert run["decisions"] == 2 and run["distance_m"] > 0
    assert metrics["drivers"]["world_model"]["driver_ms"] > 0
