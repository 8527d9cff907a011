"""Scenario evaluation: metrics, baselines, probes, suite parsing, and the whole command on the synthetic world."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from drivejepa.config import ConfigError, EvalConfig, load_config
from drivejepa.evaluation import metrics as M
from drivejepa.evaluation import probes as P
from drivejepa import baselines as B
from drivejepa import latent_space
from drivejepa.evaluation.latents import window_starts
from drivejepa.evaluation.scenarios import assign_scenes, parse_scenarios


# ------------------------------------------------------------------------------------------------- retrieval
def test_retrieval_of_a_perfect_predictor_is_one_and_of_a_random_one_near_chance():
    from test_counterfactual import state_shape

    rng = np.random.default_rng(0)
    frames = rng.normal(size=(200, *state_shape()))
    starts = rng.integers(1, 150, size=500)
    perfect = M.retrieval_ranks(np.stack([frames[s + 1:s + 4] for s in starts]), frames, starts)
    assert M.topk_accuracy(perfect, 1).tolist() == [1.0] * 3
    random_ranks = M.retrieval_ranks(rng.normal(size=(500, 3, *state_shape())), frames, starts)
    sizes = 200 - 1 - starts
    for k in (1, 5):
        chance = M.chance_topk(sizes, k)
        sigma = math.sqrt(chance * (1 - chance) / random_ranks.size)
        assert abs(M.topk_accuracy(random_ranks.reshape(-1), k) - chance) < 4 * sigma


# ------------------------------------------------------------------------------------------------- baselines
def test_constant_velocity_is_exact_on_a_linear_trajectory_and_copy_last_is_not():
    import torch

    t = torch.arange(12, dtype=torch.float64)[:, None]
    latents = torch.cat([2.0 * t, -t + 3.0], dim=1).view(12, 1, 2)                  # states of one token
    starts = torch.tensor([1, 4, 5])
    context = latents[starts[:, None] + torch.arange(-1, 1)[None]]              # frames s-1, s
    target = latents[starts[:, None] + torch.arange(1, 5)[None]]
    torch.testing.assert_close(B.constant_velocity(context, 4), target)
    err = latent_space.distance(B.copy_last(context, 4), target)
    torch.testing.assert_close(err, (torch.arange(1, 5, dtype=torch.float64) ** 2 * 2.5)[None].expand(3, 4))
    # mean of the context frames s-1, s: half a step behind the last one
    torch.testing.assert_close(B.mean_of_context(context, 4)[:, 0], latents[starts] - 0.5 * (latents[1] - latents[0]))


def test_windows_skip_gaps_and_unknown_actions():
    valid = np.ones(12, bool)
    valid[-1] = False
    frames = np.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12])  # original frame 6 was skipped
    starts = window_starts(12, context=2, horizon=3, action_valid=valid, frame_indices=frames)
    assert starts.tolist() == [1, 2, 7, 8]
    for s in starts:  # context s-1..s, future s+1..s+3: consecutive, actions s..s+2 valid
        assert np.all(np.diff(frames[s - 1:s + 4]) == 1) and valid[s:s + 3].all()


def test_shuffle_permutation_is_seeded_and_moves_every_window():
    for n in (2, 3, 17, 100):
        perm = B.shuffled_sources(n, seed=5)
        assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
        assert np.array_equal(perm, B.shuffled_sources(n, seed=5))


# ------------------------------------------------------------------------------------------------- probes
def test_occupancy_grid_marks_box_footprints_in_the_ego_frame():
    # 8x8 cells of 2 m over +-8 m; a 4.5 m long, 2 m wide car at x = 5 m heading along x covers x in [2.75, 7.25]
    occ = P.occupancy_grid(np.array([[5.0, 1.0]]), np.array([0.0]), np.array([[2.0, 4.5]]), 8, 8.0).reshape(8, 8)
    assert occ[5:8, 4].all() and occ.sum() == 3  # cells x in [2,4],[4,6],[6,8] at y in [0, 2]
    rotated = P.occupancy_grid(np.array([[5.0, 1.0]]), np.array([np.pi / 2]), np.array([[2.0, 4.5]]), 8, 8.0)
    assert rotated.reshape(8, 8)[6, 3:6].all()  # now long along y


def test_constant_velocity_boxes_follow_a_moving_box_seen_from_a_moving_ego():
    pose0 = np.eye(4)
    pose1 = np.eye(4)
    yaw = 0.3
    pose1[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    pose1[:2, 3] = [4.0, 1.0]
    box = np.array([[10.0, 2.0, 0, 2, 4.5, 1.5, 0.1, 3.0, -1.0]])  # global = ego0 frame, velocity (3, -1) m/s
    xy, heading = P.constant_velocity_boxes(box, pose0, pose1, dt=1.0)
    moved = np.array([13.0, 1.0, 0.0, 1.0])
    expected = np.linalg.inv(pose1) @ moved
    assert np.allclose(xy[0], expected[:2]) and np.isclose(heading[0], 0.1 - yaw)
    # A velocity the devkit could not compute (NaN in nuScenes, stored as 0 with the flag off) is not extrapolated.
    unknown = box.copy()
    unknown[0, 7:9] = [50.0, 50.0]
    held, _ = P.constant_velocity_boxes(unknown, pose0, pose1, dt=1.0, velocity_valid=np.array([False]))
    assert np.allclose(held[0], (np.linalg.inv(pose1) @ np.array([10.0, 2.0, 0.0, 1.0]))[:2])


def test_probes_read_a_signal_off_the_token_grid_and_beat_the_train_mean():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 4))                                   # every cell of a 4 x 4 grid weighs differently
    x_train, x_test = rng.normal(size=(300, 16, 4)), rng.normal(size=(100, 16, 4))
    label = lambda x: np.einsum("nkc,kc->n", x, w) + 5
    groups = np.repeat(np.arange(10), 30)                          # ten scenes of 30 frames
    for kind in ("linear", "mlp"):
        probe = P.fit_regression_probe("speed", kind, x_train, label(x_train), groups, epochs=300, lr=2e-2,
                                       weight_decay=0.0, hidden=64, seed=0)
        scores = P.regression_scores(probe.predict(x_test), label(x_test), probe.y_mean)
        assert scores["r2"] > 0.9 and scores["mae"] < 0.3 * scores["mae_train_mean"], (kind, scores)
    occ = P.fit_occupancy_probe("linear", x_train, x_train[..., 0] > 0, epochs=150, lr=2e-2, weight_decay=0.0,
                                hidden=32, seed=0)                 # a cell is occupied where its own token says so
    assert P.iou(occ.predict_occupancy(x_test), x_test[..., 0] > 0) > 0.8


def test_tokens_are_resampled_onto_the_evaluation_grid_by_position():
    coarse = P.grid_centers(8, 32.0)                               # a token holding its own cell's (x, y)
    tokens = coarse[None].astype(np.float32)
    assert P.tokens_on_grid(tokens, 8, 32.0, 8, 32.0) is tokens
    fine = P.tokens_on_grid(tokens, 8, 32.0, 16, 16.0)             # 16 cells over the central +-16 m
    assert np.allclose(fine[0], P.grid_centers(16, 16.0), atol=1e-4)


# ------------------------------------------------------------------------------------------------- suite
def test_default_suite_loads_and_matches_synthetic_tags_and_nuscenes_descriptions(repo_root):
    cfg = load_config(EvalConfig, repo_root / "eval/scenarios/default.yaml", ["horizon=4"])
    scenarios = parse_scenarios(cfg.scenarios)
    names = [s.name for s in scenarios]
    for expected in ("all", "night", "rain", "intersection", "turn left", "turn right", "pedestrians", "parking lot",
                     "high speed", "congestion"):
        assert expected in names
    descriptions = {
        "scene-0001": "night, rain, turn left, city",                                      # synthetic tags
        "scene-0002": "parking lot, pedestrians",
        "scene-0061": "Parked truck, construction, intersection, turn left, following a van",  # nuScenes
        "scene-1077": "Night, big street, bus stop, high speed",
        "scene-0655": "Parking lot, parked cars, jaywalker, be careful",
    }
    got = assign_scenes(scenarios, descriptions)
    assert got["all"] == list(descriptions)
    assert got["night"] == ["scene-0001", "scene-1077"]
    assert got["turn left"] == ["scene-0001", "scene-0061"]
    assert got["turn right"] == []
    assert got["pedestrians"] == ["scene-0002", "scene-0655"]
    assert got["parking lot"] == ["scene-0002", "scene-0655"]
    assert got["high speed"] == ["scene-1077"]


def test_bad_scenarios_are_reported_by_name():
    with pytest.raises(ConfigError, match="scenario 'x'.*unknown key"):
        parse_scenarios({"x": {"tags": ["night"]}}, "suite.yaml")
    with pytest.raises(ConfigError, match="not in the evaluated split"):
        assign_scenes(parse_scenarios({"mine": {"scenes": ["scene-9999"]}}), {"scene-0001": "night"})


# ------------------------------------------------------------------------------------------------- whole command
@pytest.fixture(scope="module")
def evaluated(smoke_run, shard_dir, tmp_path_factory):
    """The smoke run evaluated twice on the synthetic world: in this process (library call) and with two Ray actors
    (the command line). The smoke run was trained for 4 steps ahead; the evaluation rolls out 6 (3 s)."""
    from drivejepa.cli import main
    from drivejepa.evaluation.runner import evaluate

    ckpt = smoke_run / "checkpoints" / "last.pt"
    out_local = tmp_path_factory.mktemp("eval_local")
    out_ray = tmp_path_factory.mktemp("eval_ray")
    overrides = ["probe_epochs=60", "probe_hidden=64", "horizon=6"]
    local = evaluate(ckpt, shard_dir, out_local, split="val", overrides=overrides, num_workers=0, progress=False)
    code = main(["evaluate", "--checkpoint", str(ckpt), "--shards", str(shard_dir), "--split", "val", "--out",
                 str(out_ray), "--num-workers", "2", "--no-progress", *overrides])
    assert code == 0
    return {"local": local, "out_local": out_local, "out_ray": out_ray}


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k != "provenance":
                yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_ray_parallel_run_gives_the_numbers_of_a_single_process_run(evaluated):
    a = json.loads((evaluated["out_local"] / "metrics.json").read_text())
    b = json.loads((evaluated["out_ray"] / "metrics.json").read_text())
    pa, pb = dict(_numbers(a)), dict(_numbers(b))
    assert pa.keys() == pb.keys()
    for key, value in pa.items():
        if isinstance(value, float):
            assert pb[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        else:
            assert pb[key] == value, key


def test_report_has_every_section_and_plots_beside_their_numbers(evaluated):
    out = evaluated["out_local"]
    report = (out / "report.md").read_text()
    for section in ("## Provenance", "## Headline", "## Latent prediction per horizon", "## Action sensitivity",
                    "## Occupancy forecasts", "## Scenarios", "## Probes", "## Collapse diagnostics", "## Scenes",
                    "## Plots"):
        assert section in report
    bodies = {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in report.split("\n## ")[1:]}
    for title, body in bodies.items():            # every section holds numbers (or, Plots, its figures)
        assert any(ch.isdigit() for ch in body) or ".png" in body, title
    metrics = json.loads((out / "metrics.json").read_text())
    prov = metrics["provenance"]
    assert prov["checkpoint_sha256"] and prov["config"]["data"]["horizon"] and prov["shards_config_hash"]
    assert metrics["settings"]["seconds"] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert [r["seconds"] for r in metrics["headline"]] == [0.5, 1.5, 3.0]
    for name in ("latent_mse_vs_horizon", "retrieval_top1_vs_horizon", "occupancy_iou_vs_horizon"):
        assert (out / f"{name}.png").stat().st_size > 1000
        plotted = json.loads((out / f"{name}.json").read_text())
        assert "all" in plotted["series"]
    overall = metrics["overall"]
    for method in ("model", "shuffled_actions", "copy_last", "warp_last", "const_velocity", "mean_of_context"):
        values = overall["latent_mse"][method]
        assert len(values) == 6 and all(math.isfinite(v) and v > 0 for v in values), (method, values)
    # the scene moves away from the last context frame: copy-last gets worse with the horizon
    copy = overall["latent_mse"]["copy_last"]
    assert copy[-1] > copy[0], copy
    # the report's per-horizon table shows the metrics.json numbers
    assert f"{overall['latent_mse']['copy_last'][0]:.4f}" in report
    assert set(overall["occupancy_iou"]) == {"model", "probe_on_true_future", "const_velocity_boxes",
                                             "copy_last_boxes"}
    assert metrics["probes"]["mlp"]["speed"]["n"] > 0
    # the state holds the scene: per-cell occupancy probes on the held-out target states beat the best constant grid
    for kind in ("linear", "mlp"):
        occ = metrics["probes"][kind]["occupancy"]
        assert occ["iou"] > occ["iou_prior_grid"], (kind, occ)
    assert metrics["collapse"]["target_latents"]["effective_rank"] > 0
    assert 0 < metrics["collapse"]["target_summaries"]["effective_rank"] <= metrics["collapse"]["target_summaries"]["dim"]
    # every scene of the world is in the per-scene table and its windows add up to the total
    assert sum(b["windows"] for b in metrics["scenes"].values()) == metrics["settings"]["windows"]
    assert metrics["scenarios"]["all"]["windows"] == metrics["settings"]["windows"]


def test_shuffled_actions_baseline_uses_the_same_frames(evaluated, shard_dir):
    from drivejepa.data.shards import read_shard, shard_path
    from drivejepa.evaluation.plan import plan_jobs

    metrics = evaluated["local"]
    windows = list(zip(metrics["windows"]["scene"], metrics["windows"]["start"]))
    sources = [tuple(w) for w in metrics["provenance"]["shuffled_actions"]["shuffled_source"]]
    assert sorted(sources) == sorted(windows) and all(s != w for s, w in zip(sources, windows))
    # The plan gives each window another window's past and future actions, and rolls it out from its own frames.
    scenes = sorted(set(metrics["windows"]["scene"]))
    context = metrics["provenance"]["context"]
    jobs, plan = plan_jobs(shard_dir, scenes, [], context=context, horizon=6, shuffle_seed=0)
    assert plan["shuffled_source"] == [list(s) for s in sources]
    i = 0
    for job in jobs:
        assert job.shuffled_actions.shape == (len(job.starts), context - 1 + 6, 5)
        for w, start in enumerate(job.starts):
            assert (job.scene, int(start)) == windows[i]
            src_scene, src_start = sources[i]
            src_actions = read_shard(shard_path(shard_dir, src_scene)).arrays["actions"]
            assert np.array_equal(job.shuffled_actions[w], src_actions[src_start - context + 1:src_start + 6])
            i += 1


def test_headline_table_prints_model_baselines_and_action_sensitivity(evaluated):
    from drivejepa.evaluation.report import format_headline

    text = format_headline(evaluated["local"])
    lines = text.splitlines()
    assert "copy-last" in lines[1] and "const-vel" in lines[1] and "shuffled" in lines[1] and "act.ratio" in lines[1]
    assert [ln.split("|")[0].strip() for ln in lines[3:6]] == ["0.5s", "1.5s", "3.0s"]
    assert "no branch point" in lines[7]
    row = evaluated["local"]["headline"][0]
    assert row["action_sensitivity_gap"] == pytest.approx(row["mse_shuffled_actions"] - row["mse_model"])


def test_evaluate_command_reports_a_missing_split_in_one_line(smoke_run, shard_dir, tmp_path, capsys):
    from drivejepa.cli import main

    code = main(["evaluate", "--checkpoint", str(smoke_run / "checkpoints" / "last.pt"), "--shards", str(shard_dir),
                 "--split", "nope", "--out", str(tmp_path / "o"), "--num-workers", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown split 'nope'" in err and "manifest.json" in err
    assert not (tmp_path / "o" / "metrics.json").exists()
