"""The planning section of the evaluation on the synthetic shards, the cost heads, the ego-status MLP, and the
open-loop metrics' protocols, with a stand-in world model whose state is a lidar bird's-eye grid ([..., N, C])."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from drivejepa.config import PlanConfig
from test_planning import grid_distance  # noqa: F401  (until the grid model lands)


class LidarGridModel(torch.nn.Module):
    """A stand-in world model: the state of a key frame is its lidar on an 8 x 8 grid over [-16, 16] m (token
    i * 8 + j for x bin i, y bin j), channels the point counts per material (the synthetic world's intensity bands)
    and per height; the rollout moves nothing (copy-last). Enough to check that labels and tokens line up."""
    space = "raw"
    bev_size, bev_range, latent_dim = 8, 16.0, 6
    cameras = ["CAM_FRONT"]
    BANDS = ((3, 10), (12, 20), (24, 34), (210, 250))          # road, grass, sidewalk, marking

    def __init__(self):
        super().__init__()
        self.register_buffer("dummy", torch.zeros(1))

    def encode(self, obs, target=False):
        pts, mask = obs["lidar"].float(), obs["lidar_mask"].bool()
        g, r = self.bev_size, self.bev_range
        ij = torch.floor((pts[..., :2] + r) / (2 * r / g)).long()
        inside = mask & (ij >= 0).all(-1) & (ij < g).all(-1)
        cell = (ij[..., 0] * g + ij[..., 1]).clamp(0, g * g - 1)
        inten, z = pts[..., 3], pts[..., 2]
        feats = [((inten >= lo) & (inten <= hi)).float() for lo, hi in self.BANDS]
        feats += [(z > 0.5).float(), torch.ones_like(z)]
        out = torch.zeros(pts.shape[0], g * g, len(feats))
        for c, f in enumerate(feats):
            out[..., c].scatter_add_(1, cell, f * inside)
        return torch.log1p(out)

    def rollout(self, context, actions, past_actions=None):
        return context[:, -1:].expand(context.shape[0], actions.shape[1], *context.shape[2:])


def test_both_l2_protocols_match_hand_computed_values():
    from drivejepa.planning.openloop import by_protocol, l2_errors

    truth = np.zeros((2, 6, 2))
    truth[:, :, 0] = np.arange(1, 7) * 5.0
    pred = truth.copy()
    pred[0, :, 1] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]                 # window 0 drifts left 0.1 m a step
    pred[1, :, 0] += [0.0, 0.0, 0.0, 0.0, 1.0, 3.0]                # window 1 overshoots at the end
    per_step = l2_errors(pred, truth).mean(axis=0)
    np.testing.assert_allclose(per_step, [0.05, 0.1, 0.15, 0.2, 0.75, 1.8])
    out = by_protocol(per_step, [1.0, 2.0, 3.0], 0.5)
    np.testing.assert_allclose(out["uniad"], [0.1, 0.2, 1.8])                               # at t
    np.testing.assert_allclose(out["stp3"], [0.075, 0.125, (0.05 + 0.1 + 0.15 + 0.2 + 0.75 + 1.8) / 6])
    assert by_protocol(per_step, [4.0], 0.5) == {"uniad": [None], "stp3": [None]}


def test_collision_rate_counts_planned_ego_boxes_overlapping_annotated_boxes():
    from drivejepa.planning.openloop import by_protocol, collisions

    cfg = PlanConfig()
    poses = np.zeros((2, 3, 3))
    poses[:, :, 0] = [0.0, 5.0, 10.0]                              # 10 m/s straight ahead
    boxes = np.zeros((2, 2, 1, 5))
    boxes[0, :, 0] = [10.0 + cfg.ego_length / 2 + 2.25, 0.0, 0.0, 4.5, 2.0]      # touches the ego at step 2
    boxes[1, :, 0] = [10.0, 3.0, 0.0, 4.5, 2.0]                                 # a lane to the left: clear
    hit = collisions(poses, boxes, np.ones((2, 2, 1), bool), cfg)
    np.testing.assert_array_equal(hit, [[False, True], [False, False]])
    assert not collisions(poses, boxes, np.zeros((2, 2, 1), bool), cfg).any()   # padding never collides
    assert by_protocol(hit.mean(axis=0), [0.5, 1.0], 0.5) == {"uniad": [0.0, 0.5], "stp3": [0.0, 0.25]}


def test_route_command_follows_the_lateral_offset_at_3_s():
    from drivejepa.planning.route import command_from_offset, command_index

    np.testing.assert_array_equal(command_from_offset([2.5, 2.0, 0.0, -2.0, -2.5], 2.0), [0, 1, 1, 1, 2])
    assert command_index("Left") == 0 and command_index(2) == 2
    with pytest.raises(ValueError, match="unknown route command"):
        command_index("u-turn")


def test_planning_section_on_the_synthetic_shards(shard_dir, tmp_path, grid_distance):
    from drivejepa.config import TrainConfig
    from drivejepa.planning.evaluation import format_planning, planning_metrics
    from drivejepa.planning.heads import heads_path, heads_settings

    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a stand-in checkpoint")
    cfg = PlanConfig(device="cpu", eval_windows=0)                        # every window of the scene
    cfg.optimizer.candidates, cfg.optimizer.iterations = 16, 2
    cfg.recovery.candidates, cfg.recovery.iterations, cfg.recovery.max_windows = 8, 1, 3
    cfg.recovery.gradient_steps = 2
    cfg.heads.steps, cfg.heads.rollout_steps, cfg.ego_mlp.steps = 150, 150, 150
    cfg.recovery.landscape_size = 3
    train_cfg = TrainConfig()
    train_cfg.data.shards = str(shard_dir)
    section = planning_metrics(LidarGridModel(), train_cfg, ckpt, shard_dir, ["scene-0003"], cfg, tmp_path / "eval",
                               progress=False)
    assert section["windows"] == 5
    factual = section["open_loop"]["factual"]
    assert factual["windows"] == 5 and section["open_loop"]["branch"]["windows"] == 0
    expert = factual["methods"]["expert"]
    assert expert["l2_m"]["uniad"] == [0.0, 0.0, 0.0] and expert["l2_m"]["stp3"] == [0.0, 0.0, 0.0]
    for name in ("world_model", "constant_velocity", "ego_mlp"):
        l2 = factual["methods"][name]["l2_m"]
        assert all(v >= 0 for v in l2["uniad"] + l2["stp3"]), name
    heads = section["cost_heads"]
    assert heads["states"]["drivable"]["iou"] > heads["states"]["drivable"]["prior_iou"]   # the lidar knows the road
    # the model's rollouts (copy-last) are read better by the set fitted on them than by the state set
    for task in ("occupancy", "drivable"):
        assert heads["rollouts"][task]["log_loss"] < heads["state_heads_on_rollouts"][task]["log_loss"], task
    saved = heads_path(ckpt, heads_settings(shard_dir, cfg))
    assert saved.is_file() and saved.with_suffix(".json").is_file()
    rec = section["action_recovery"]
    assert rec["factual"]["windows"] == 3 and len(rec["factual"]["endpoint_error_m"]) == 3
    assert (tmp_path / "eval" / section["landscape"]["png"]).is_file()
    report = format_planning(section)
    assert "(UniAD)" in report and "ST-P3" in report and "world model" in report
    cfg.eval_windows = 2                      # the knob that keeps the section cheap: a seeded choice of windows
    few = planning_metrics(LidarGridModel(), train_cfg, ckpt, shard_dir, ["scene-0003"], cfg, tmp_path / "few",
                           progress=False)
    assert few["windows"] == 2 and few["windows_available"] == 5 and section["windows_available"] == 5
    assert few["action_recovery"]["factual"]["windows"] == 2


def test_plan_command_replays_a_logged_scene(shard_dir, tmp_path, monkeypatch, grid_distance, capsys):
    """``drivejepa plan``: decisions at consecutive key frames, each scored against the log and drawn; the cost
    heads are fitted once beside the run and found again."""
    import json

    from drivejepa import cli
    from drivejepa.config import TrainConfig
    from drivejepa.training import checkpoint

    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a stand-in checkpoint")
    monkeypatch.setattr(checkpoint, "load_world_model", lambda path, device="cpu": (LidarGridModel(), TrainConfig()))
    monkeypatch.setattr(checkpoint, "refuse_other_shards", lambda *a, **k: None)
    args = ["plan", "--checkpoint", str(ckpt), "--shards", str(shard_dir), "--scene", "scene-0001", "--steps", "2",
            "--out", str(tmp_path / "plan"), "--no-progress", "heads.steps=50", "heads.rollout_steps=50",
            "optimizer.candidates=16", "device=cpu"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert [d["frame"] for d in summary["decisions"]] == [1, 2]
    for d in summary["decisions"]:
        assert len(d["trajectory"]) == 7 and len(d["l2_m"]) == 6 and d["command"] in ("left", "straight", "right")
        assert (tmp_path / "plan" / d["figure"]).stat().st_size > 0
    heads = Path(summary["heads"]["path"])                  # RUN/planning_heads/<stem>-<settings digest>.pt
    assert "2 decisions" in printed and heads.is_file() and heads.parent == tmp_path / "run" / "planning_heads"
    assert heads.name.startswith("best-")
    assert cli.main(args[:-4] + ["--command", "u-turn", "device=cpu"]) == 2            # one clear line
    assert "--command u-turn" in capsys.readouterr().err
