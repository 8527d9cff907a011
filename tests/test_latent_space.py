"""One latent space per model: training, validation (best.pt), evaluation (metrics.json) and rendering compare a
prediction with its target in the same space, the one its objective trains (drivejepa/latent_space.py)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from drivejepa.config import TrainConfig, load_config

SPACES = {"layer_norm": ["loss.objective=jepa"], "raw": ["loss.objective=jepa", "loss.normalize_targets=false"],
          "unit": ["loss.objective=infonce"]}


def _batches(b=4, length=5, n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        actions = torch.randn(b, length, 5, generator=g) * torch.tensor([3.0, 0.3, 0.05, 5.0, 0.1])
        out.append({"lidar": torch.randn(b, length, 64, 4, generator=g) * 20 + 5,
                    "lidar_mask": torch.ones(b, length, 64, dtype=torch.bool),
                    "actions": actions, "action_valid": torch.ones(b, length, dtype=torch.bool),
                    "shuffled_actions": actions.roll(1, dims=0)})
    return out


@pytest.mark.parametrize("space", list(SPACES))
def test_an_untrained_predictor_is_warp_last_in_the_space_it_is_compared_in(repo_root, space):
    from drivejepa.models.world_model import build_world_model
    from drivejepa.training.distributed import DistInfo
    from drivejepa.training.validation import validate

    torch.manual_seed(0)
    cfg = load_config(TrainConfig, repo_root / "pipelines/train_smoke.yaml",
                      SPACES[space] + ["data.context=2", "data.horizon=3"])
    model = build_world_model(cfg)
    assert model.space == space
    val = validate(model, _batches(), cfg, DistInfo(), contextlib.nullcontext)
    assert val["copy_last"] > 0
    # One step is one warp. Later steps warp the warped state again, where the baseline resamples once by the
    # composed motion (tests/test_bev.py checks the chained warps).
    assert val["warp_ratio_h1"] == pytest.approx(1.0, abs=0.02), (space, val["warp_ratio_h1"])


def test_a_model_refuses_an_objective_of_another_space(repo_root):
    from drivejepa.models.world_model import build_world_model

    cfg = load_config(TrainConfig, repo_root / "pipelines/train_smoke.yaml", SPACES["unit"])
    model = build_world_model(cfg)
    batch = {k: v[:, :3] for k, v in _batches(n=1)[0].items()}
    with pytest.raises(ValueError, match="space 'layer_norm'.*built for 'unit'"):
        model.loss(batch, load_config(TrainConfig, repo_root / "pipelines/train_smoke.yaml").loss, context=2)


@pytest.mark.parametrize("space", ["layer_norm", "unit"])
def test_a_run_is_selected_and_reported_in_one_space(repo_root, shard_dir, tmp_path, space):
    """best.pt's validation numbers (metrics.jsonl) are the evaluation's (metrics.json) on the same windows: the
    model error, copy-last and the shuffled-action baseline, for a JEPA and an InfoNCE run."""
    from drivejepa.evaluation.runner import evaluate
    from drivejepa.training.checkpoint import load_checkpoint
    from drivejepa.training.metrics_log import read_metrics
    from drivejepa.training.trainer import train

    cfg = load_config(TrainConfig, repo_root / "pipelines/train_smoke.yaml",
                      SPACES[space] + [f"data.shards={shard_dir}", "optim.max_steps=2", "optim.amp=false",
                                       "data.horizon=3", "ckpt_every=0"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    best = run / "checkpoints" / "best.pt"
    step = load_checkpoint(best)["step"]
    val = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val" and r["step"] == step][-1]
    metrics = evaluate(best, shard_dir, tmp_path / "eval", split="val", num_workers=0, progress=False,
                       overrides=["probe_epochs=1", "max_train_scenes=1"])
    assert metrics["provenance"]["metric_space"] == space
    assert metrics["settings"]["windows"] == val["windows"]
    mse = metrics["overall"]["latent_mse"]
    for k in (1, 2, 3):
        assert mse["model"][k - 1] == pytest.approx(val[f"err_h{k}"], rel=1e-4), k
        assert mse["copy_last"][k - 1] == pytest.approx(val[f"copy_last_h{k}"], rel=1e-4), k
        assert mse["shuffled_actions"][k - 1] == pytest.approx(val[f"shuffled_h{k}"], rel=1e-4), k
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["provenance"]["metric_space"] == space
