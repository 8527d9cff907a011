"""Counterfactual futures: the top-1 score and its baselines, the action-blind rollout, the honest factual metrics
(retrieval within a scene, departing windows), and `drivejepa evaluate` / `visualize --branch-point` on a world with
branches."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from drivejepa import latent_space
from drivejepa.evaluation import counterfactual as CF
from drivejepa.evaluation import metrics as M
from drivejepa.evaluation import report as report_module
from drivejepa.evaluation.plan import departing_windows


def state_shape() -> tuple[int, ...]:
    """A state's shape: [N, C] tokens once ``latent_space.distance`` reduces a state's last two dims (the grid state
    of issue 15), else one [D] vector."""
    return (4, 3) if latent_space.distance(torch.zeros(4, 3), torch.zeros(4, 3)).dim() == 0 else (12,)


def _point_result(truth: np.ndarray, model: np.ndarray, blind: np.ndarray, last: np.ndarray, parent="scene-0005",
                  behaviours=None) -> dict:
    k = truth.shape[0]
    behaviours = behaviours or [CF.KEEP] + [f"b{i}" for i in range(1, k)]
    point = dict(parent=parent, frame=7, scenes=[parent] + [f"{parent}-{b}" for b in behaviours[1:]],
                 behaviours=behaviours)
    warped = np.broadcast_to(last, truth.shape) + 0.01 * np.arange(k).reshape(k, *[1] * (truth.ndim - 1))
    return {"role": "branch_point", "scene": f"{parent}:7", "point": point, "truth": truth, "model": model,
            "warp_last": warped, "action_blind": blind, "copy_last": last}


def test_top1_of_the_true_future_is_one_and_copy_last_and_action_blind_are_at_chance():
    rng = np.random.default_rng(0)
    h, state = 4, state_shape()
    results = []
    for k, parent in ((5, "scene-0005"), (3, "scene-0010")):
        truth = rng.normal(size=(k, h, *state))
        results.append(_point_result(truth, truth.copy(), rng.normal(size=(h, *state)), rng.normal(size=state),
                                     parent=parent))
    cf = CF.score_branch_points(results, [0.5, 1.0, 1.5, 2.0])
    o = cf["overall"]
    assert cf["branch_points"] == 2 and cf["futures"] == 8 and cf["futures_per_point"] == {"3": 1, "5": 1}
    assert o["chance"] == pytest.approx((5 * 0.2 + 3 / 3) / 8)
    assert o["top1"]["model"] == [1.0] * h and o["latent_mse"]["model"] == [0.0] * h
    # One prediction for every future: exactly one future is its nearest at each step, so 1/K a point.
    for m in ("copy_last", "action_blind"):
        assert o["top1"][m] == pytest.approx([o["chance"]] * h)
        for p in cf["points"]:
            assert np.allclose(np.mean(p["top1"][m], axis=0), 1 / len(p["scenes"]))
    assert cf["behaviours"][CF.KEEP]["futures"] == 2 and list(cf["behaviours"])[0] == CF.KEEP
    # A model that swaps the futures' actions predicts each future's neighbour: never its own.
    swapped = [dict(r, model=np.roll(r["truth"], 1, axis=0)) for r in results]
    assert CF.score_branch_points(swapped, [0.5] * h)["overall"]["top1"]["model"] == [0.0] * h


def test_rollout_differences_measure_how_far_and_which_way_the_rollouts_of_a_point_part():
    """Rollouts that differ exactly as the futures do score energy 1 and cosine 1; rollouts shrunk halfway towards
    the futures' mean keep the directions (cosine 1) at a quarter of the energy; differences unrelated to the
    futures' have a cosine near 0; warp-last is scored the same way and one-prediction methods are left out."""
    rng = np.random.default_rng(1)
    h, state = 3, state_shape()
    truth = rng.normal(size=(4, h, *state))
    blind, last = rng.normal(size=(h, *state)), rng.normal(size=state)
    exact = CF.score_branch_points([_point_result(truth, truth.copy(), blind, last)], [0.5, 1.0, 1.5])
    d = exact["differences"]
    assert set(d) == {"model", "warp_last"}
    assert d["model"]["energy"] == pytest.approx([1.0] * h) and d["model"]["cosine"] == pytest.approx([1.0] * h)
    shrunk = 0.5 * truth + 0.5 * truth.mean(axis=0, keepdims=True) + 3.0      # plus an error shared by every rollout
    d = CF.rollout_differences([_point_result(truth, shrunk, blind, last)])["model"]
    assert d["energy"] == pytest.approx([0.25] * h) and d["cosine"] == pytest.approx([1.0] * h)
    big = rng.normal(size=(4, h, 64, 16))                                      # enough dimensions for a cosine
    unrelated = CF.rollout_differences([_point_result(big, rng.normal(size=big.shape), big[0], big[0, 0])])["model"]
    assert max(abs(c) for c in unrelated["cosine"]) < 0.1
    metrics = {"counterfactual": exact, "settings": {"headline_seconds": [1.0]}}
    report = "\n".join(report_module._counterfactual_section(metrics))
    assert "How the rollouts of a point differ" in report


def test_top1_intervals_resample_branch_points_and_pair_the_model_with_warp_last():
    """A model right at every point has the interval [1, 1] and leads warp-last (wrong at every point) by exactly 1;
    a model as good as warp-last at every point leads it by exactly 0 however the points are drawn (paired); one
    right at half the points gets an interval around its 0.5 that is wider with 4 points than with 40."""
    h = 2

    def point(model: float, warp: float, k: int = 4) -> dict:
        return {"scenes": [f"s{i}" for i in range(k)],
                "top1": {"model": np.full((k, h), model).tolist(), "warp_last": np.full((k, h), warp).tolist()}}

    sure = CF.point_bootstrap([point(1.0, 0.0) for _ in range(5)])
    assert sure["model"] == {"low": [1.0] * h, "high": [1.0] * h}
    assert sure["model_minus_warp_last"] == {"low": [1.0] * h, "high": [1.0] * h}
    mixed = [point(1.0, 1.0), point(0.0, 0.0), point(0.5, 0.5, k=2)]
    assert CF.point_bootstrap(mixed)["model_minus_warp_last"] == {"low": [0.0] * h, "high": [0.0] * h}
    few, many = (CF.point_bootstrap([point(float(i % 2), 0.0) for i in range(n)])["model"] for n in (4, 40))
    assert few["low"][0] < many["low"][0] < 0.5 < many["high"][0] < few["high"][0]


def test_a_tie_for_the_nearest_future_counts_as_its_expected_value_not_a_win():
    d = np.array([[[1.0], [1.0], [3.0]],            # prediction 0: its own future ties with future 1
                  [[2.0], [0.5], [0.5]],            # prediction 1: ties with future 2
                  [[0.1], [2.0], [1.0]]])           # prediction 2: future 0 is nearer
    assert CF.nearest_share(d)[:, 0].tolist() == [0.5, 0.5, 0.0]


def test_branch_points_group_a_parent_with_its_branches_per_branch_frame():
    from drivejepa.data.synth.scenarios import branch_tags

    def tags(parent, frame, behaviour):
        return ", ".join(["city", *branch_tags(parent, frame, behaviour)])

    descriptions = {"scene-0005": "city", "scene-0005-b07-brake": tags("scene-0005", 7, "brake"),
                    "scene-0005-b07-accelerate": tags("scene-0005", 7, "accelerate"),
                    "scene-0005-b20-brake": tags("scene-0005", 20, "brake"),
                    "scene-0009-b03-brake": tags("scene-0009", 3, "brake"),     # its parent is not evaluated
                    "scene-0010": "highway"}
    points = CF.branch_points(descriptions)
    assert [(p.name, p.scenes, p.behaviours) for p in points] == [
        ("scene-0005:7", ["scene-0005", "scene-0005-b07-accelerate", "scene-0005-b07-brake"],
         [CF.KEEP, "accelerate", "brake"]),
        ("scene-0005:20", ["scene-0005", "scene-0005-b20-brake"], [CF.KEEP, "brake"])]


def test_departing_windows_are_those_whose_actions_change_step_to_step():
    actions = np.zeros((12, 5), np.float32)
    actions[:, 0] = 2.0                             # 4 m/s, straight on
    actions[6:, 0] = 3.0                            # speeds up between steps 5 and 6 (1 m more a step)
    actions[9, 2] = 0.06                            # a turn starts at step 9
    valid = np.ones(12, bool)
    starts = np.array([1, 2, 3, 5, 7, 8])
    flags = departing_windows(actions, valid, starts, horizon=2, dx=0.5, dyaw=0.05)
    # window s looks at a_{s-1}..a_{s+1}: the change at 5->6 is seen from s = 5..6, the turn from s = 8..10
    assert flags.tolist() == [False, False, False, True, False, True]
    assert not departing_windows(actions, valid, starts, horizon=2, dx=1.5, dyaw=0.1).any()


def test_retrieval_gallery_is_the_scene_after_the_context_so_copy_last_can_score():
    state = state_shape()
    t = np.arange(20, dtype=np.float64)
    base = np.random.default_rng(1).normal(size=state)
    frames = np.stack([base * 0 + 0.3 * i for i in t]) + base        # a smooth drift through latent space
    starts = np.array([1, 5, 9, 14])
    h = 3
    truth = np.stack([frames[s + 1:s + 1 + h] for s in starts])
    assert (M.retrieval_ranks(truth, frames, starts) == 0).all()
    copy = np.stack([np.repeat(frames[s][None], h, axis=0) for s in starts])
    ranks = M.retrieval_ranks(copy, frames, starts)
    assert (ranks[:, 0] == 0).all() and (ranks[:, 1:] > 0).all()      # frame s + 1 is the nearest later frame
    same = np.zeros((len(starts), h, *state))                          # every frame alike: nothing is retrieved
    assert (M.retrieval_ranks(same, np.zeros((20, *state)), starts) > 0).all()
    assert M.chance_topk([19, 15], 1) == pytest.approx((1 / 19 + 1 / 15) / 2)


def test_an_action_blind_rollout_ignores_the_actions_and_a_model_trained_blind_always_is():
    from drivejepa.config import ConfigError, ModelConfig, TrainConfig, check_config
    from drivejepa.models.world_model import WorldModel

    torch.manual_seed(0)
    model = WorldModel(ModelConfig(size="tiny"), ["CAM_FRONT"]).eval()
    ctx = torch.randn(1, 2, model.bev_size ** 2, model.latent_dim).expand(3, -1, -1, -1)
    actions = torch.randn(3, 4, 5) * torch.tensor([3.0, 0.3, 0.05, 5.0, 0.1])
    past = torch.randn(3, 1, 5)
    with torch.no_grad():
        told = model.rollout(ctx, actions, past)
        blind = model.rollout(ctx, actions, None, future_known=False)
    assert not torch.allclose(told[0], told[1])
    assert torch.allclose(blind[0], blind[1]) and torch.allclose(blind[0], blind[2])
    masked = WorldModel(ModelConfig(size="tiny", action_dropout=1.0), ["CAM_FRONT"]).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(masked.rollout(ctx, actions, past), blind)
    check_config(TrainConfig(model=ModelConfig(size="tiny", action_dropout=1.0)))
    with pytest.raises(ConfigError, match="model.action_dropout"):
        check_config(TrainConfig(model=ModelConfig(size="tiny", action_dropout=1.5)))


# ------------------------------------------------------------------------------------------- on a branch world
@pytest.fixture(scope="module")
def branch_eval(smoke_run, branch_shards, tmp_path_factory):
    """The smoke run evaluated on the val split of the branch world: scene-0003 and its branches."""
    from drivejepa.evaluation.runner import evaluate

    out = tmp_path_factory.mktemp("cf_eval")
    metrics = evaluate(smoke_run / "checkpoints" / "last.pt", branch_shards, out, split="val",
                       overrides=["probe_epochs=20", "probe_hidden=32"], num_workers=0, progress=False)
    return metrics, out


def test_factual_metrics_leave_branches_out_and_the_counterfactual_section_uses_them(branch_eval, branch_shards):
    from drivejepa.data.shards import scenes_in_split

    metrics, out = branch_eval
    val = scenes_in_split(branch_shards, "val")
    assert len(val) > 2 and metrics["provenance"]["eval_scenes"] == ["scene-0003"]
    assert set(metrics["windows"]["scene"]) == {"scene-0003"} and list(metrics["scenes"]) == ["scene-0003"]
    assert not any("-b" in s for s in metrics["provenance"]["train_scenes"])          # probes: factual scenes
    cf = metrics["counterfactual"]
    (point,) = cf["points"]
    assert point["parent"] == "scene-0003" and point["scenes"] == ["scene-0003"] + sorted(val[1:])
    k, h = len(point["scenes"]), metrics["settings"]["horizon"]
    assert cf["futures"] == k and cf["overall"]["chance"] == pytest.approx(1 / k)
    for m in ("model", "action_blind", "copy_last"):
        assert len(cf["overall"]["top1"][m]) == h and all(0 <= v <= 1 for v in cf["overall"]["top1"][m])
    for m in ("action_blind", "copy_last"):
        assert cf["overall"]["top1"][m] == pytest.approx([1 / k] * h)
    report = (out / "report.md").read_text()
    assert "## Counterfactual futures" in report and f"{1 / k:.3f}" in report
    plotted = json.loads((out / "counterfactual_top1_vs_horizon.json").read_text())
    assert (out / "counterfactual_top1_vs_horizon.png").stat().st_size > 1000
    assert plotted["series"][f"all ({k})"]["model"] == pytest.approx(cf["overall"]["top1"]["model"])
    dep = metrics["overall"]["action_sensitivity_departing"]
    assert dep["windows"] == metrics["settings"]["departing"]["windows"] <= metrics["settings"]["windows"]
    assert metrics["settings"]["retrieval_chance"]["top1"] > 1 / 12


def test_headline_prints_the_counterfactual_numbers_beside_the_factual_ones(branch_eval):
    from drivejepa.evaluation.report import format_headline

    metrics, _ = branch_eval
    text = format_headline(metrics)
    assert "Counterfactual top-1 over 1 branch points" in text and "act.blind" in text and "departing" in text
    row = metrics["headline"][0]
    assert row["counterfactual_top1_model"] == metrics["counterfactual"]["overall"]["top1"]["model"][0]
    assert f"{row['counterfactual_chance']:.3f}" in text
    low, high = row["counterfactual_top1_model_95"]
    assert low <= row["counterfactual_top1_model"] <= high and f"{low:.2f} .. {high:.2f}" in text


def test_action_blind_checkpoint_is_a_baseline_only_when_trained_with_every_action_masked(
        smoke_run, branch_shards, tmp_path, capsys):
    from drivejepa.cli import main
    from drivejepa.training.checkpoint import load_checkpoint

    ckpt = smoke_run / "checkpoints" / "last.pt"
    base = ["evaluate", "--checkpoint", str(ckpt), "--shards", str(branch_shards), "--split", "val",
            "--num-workers", "0", "--no-progress", "probe_epochs=5", "probe_hidden=16"]
    assert main(base + ["--out", str(tmp_path / "a"), "--action-blind-checkpoint", str(ckpt)]) == 2
    assert "action_dropout" in capsys.readouterr().err
    state = load_checkpoint(ckpt)
    state["config"]["model"]["action_dropout"] = 1.0          # the same weights, now rolled out blind
    blind = tmp_path / "blind.pt"
    torch.save(state, blind)
    assert main(base + ["--out", str(tmp_path / "b"), "--action-blind-checkpoint", str(blind)]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    ab = metrics["action_blind_checkpoint"]
    k = len(metrics["counterfactual"]["points"][0]["scenes"])
    assert ab["windows"] == metrics["settings"]["windows"]
    assert ab["counterfactual"]["top1"]["model"] == pytest.approx([1 / k] * metrics["settings"]["horizon"])
    assert ab["latent_mse"]["copy_last"] == pytest.approx(metrics["overall"]["latent_mse"]["copy_last"])
    assert "## Baseline: the same recipe trained with every action masked" in \
        (tmp_path / "b" / "report.md").read_text()


def test_visualize_branch_point_rolls_each_future_out_with_its_own_actions(smoke_run, branch_shards, tmp_path,
                                                                           capsys):
    from drivejepa.cli import main
    from drivejepa.data.shards import load_manifest, read_shard, shard_path
    from drivejepa.visualization.headless import probe_rendering

    run = tmp_path / "run"                                    # a copy: the decoder is saved beside the checkpoint
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(smoke_run / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    argv = ["visualize", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--shards", str(branch_shards),
            "--out", str(tmp_path / "out"), "--size", "160x120", "--decoder-steps", "20", "--no-progress"]
    assert main(argv + ["--branch-point", "scene-0003:99"]) == 2
    assert "no branch point scene-0003:99" in capsys.readouterr().err
    scenes = load_manifest(branch_shards)["scenes"]
    point = next(p for p in CF.branch_points({s: v["description"] for s, v in scenes.items()})
                 if p.parent == "scene-0003")
    frame = point.frame
    assert main(argv + ["--branch-point", f"scene-0003:{frame}"]) == 0
    assert "counterfactual top-1 per step" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "branch_point.json").read_text())
    futures = summary["futures"]
    assert [f["behaviour"] for f in futures][0] == CF.KEEP and len(futures) >= 2
    for f in futures:                                          # each rollout got its own future's recorded actions
        a = read_shard(shard_path(branch_shards, f["scene"])).arrays["actions"]
        assert np.allclose(f["actions"], a[frame:frame + summary["horizon"]])
    assert any(not np.allclose(futures[0]["actions"], f["actions"]) for f in futures[1:])
    assert len(summary["top1"]) == summary["horizon"] and summary["chance"] == pytest.approx(1 / len(futures))
    if probe_rendering().ok:
        for h in summary["steps_rendered"]:
            assert (tmp_path / "out" / f"branch_point_k{h}.png").stat().st_size > 1000
