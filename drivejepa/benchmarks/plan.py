"""``drivejepa bench plan``: the latency of one planning decision of the world-model planner, beside an encode.

The demo model (``pipelines/train_demo.yaml``; random weights unless ``--checkpoint``), its cost heads (random unless
fitted beside the checkpoint for ``--shards`` and these planner settings: ``heads`` in the JSON says which) and the
planner settings of ``pipelines/plan.yaml`` (candidates, iterations, horizon).
Observations are the demo workload of ``bench latency`` (front camera 128x224, 4096 lidar and 128 radar points),
random, or real key frames with ``--shards``. Timed, batch 1, median of ``--repeats`` calls taken in turn:

- ``encode``: the target encoder on the newest frame (what a closed-loop driver pays per decision);
- ``optimise``: the search alone from encoded context states (every candidate rolled out through the predictor and
  read by the heads);
- ``decision``: encode the newest frame + optimise, the latency of one decision. Target: <= 100 ms on the 2-core CPU.

The bare timm ResNet18 on one 224x400 image is timed in turn with them, so a reading taken on a busy shared machine
can be put beside the ~26 ms that network takes on an idle one (docs: ecosystem facts).

The planner runs in the precision its ``amp`` setting chooses on this hardware (drivejepa/precision.py: bf16
autocast on a CPU with native bf16 or a GPU, else fp32). Where that is not fp32, the same decision is timed in fp32
in turn with it (the baseline beside the choice), and the two plans from the same states are compared: the distance
between their end points at the horizon.
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TARGET_DECISION_MS = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: the demo config, random "
                        "weights)")
    parser.add_argument("--config", default=str(REPO / "pipelines/train_demo.yaml"),
                        help="training YAML whose model is built when no checkpoint is given")
    parser.add_argument("--plan-config", default=str(REPO / "pipelines/plan.yaml"), help="planner YAML")
    parser.add_argument("--shards", default=None, help="plan from real key frames of these shards")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=20, help="timed decisions (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decisions first")
    parser.add_argument("overrides", nargs="*", help="planner overrides key=value, e.g. optimizer.candidates=32")


def _random_obs(cameras, frames: int):
    import numpy as np
    import torch

    from drivejepa.benchmarks.latency import WORKLOADS
    from drivejepa.data.shards import SENSOR_KEYS

    _, (h, w), n_lidar, n_radar = WORKLOADS["demo"]
    g = torch.Generator().manual_seed(0)
    obs = {
        "images": torch.randint(0, 256, (frames, len(cameras), h, w, 3), generator=g, dtype=torch.uint8),
        "image_mask": torch.ones(frames, len(cameras), dtype=torch.bool),
        "lidar": torch.randn(frames, n_lidar, 5, generator=g) * torch.tensor([20.0, 20.0, 1.0, 50.0, 0.0]),
        "lidar_mask": torch.ones(frames, n_lidar, dtype=torch.bool),
        "radar": torch.randn(frames, n_radar, 6, generator=g) * torch.tensor([50.0, 50.0, 1.0, 10.0, 5.0, 5.0]),
        "radar_mask": torch.arange(n_radar).expand(frames, n_radar) < n_radar // 2,
    }
    if "cam_intrinsics" in SENSOR_KEYS:
        from drivejepa.data.synth.camera import camera_to_ego, intrinsics

        obs["cam_intrinsics"] = torch.tensor(np.stack([intrinsics(c, w, h) for c in cameras]), dtype=torch.float32)
        # per camera, without the frame axis, as in a shard
        obs["cam_to_key_ego"] = torch.tensor(np.stack([camera_to_ego(c) for c in cameras])[None],
                                             dtype=torch.float32).expand(frames, -1, -1, -1).contiguous()
    return {k: v.numpy() for k, v in obs.items()}, "random, demo workload"


def _shard_obs(shards: str, model, frames: int):
    import numpy as np

    from drivejepa.data.shards import read_shard, scenes_in_split, shard_path
    from drivejepa.planning.planner import observation_history
    from drivejepa.visualization.decoder_training import camera_index

    scene = scenes_in_split(shards, None)[0]
    shard = read_shard(shard_path(shards, scene))
    obs = observation_history(shard.arrays, np.arange(frames), camera_index(shard, model))
    return obs, f"{scene}, key frames 0..{frames - 1}"


def run(args) -> dict:
    import dataclasses
    import platform

    import numpy as np
    import torch

    from drivejepa.benchmarks.latency import interleaved_medians
    from drivejepa.config import PlanConfig, TrainConfig, load_config
    from drivejepa.data.shards import PER_CAMERA
    from drivejepa.planning.heads import HeadSpec, PlanningHeads, find_heads, heads_settings
    from drivejepa.planning.planner import Planner
    from drivejepa.runtime import select_device

    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    cfg = load_config(PlanConfig, args.plan_config, args.overrides)
    cfg = dataclasses.replace(cfg, device=str(device))
    heads, heads_source = None, "random weights"
    if args.checkpoint:
        from drivejepa.training.checkpoint import load_world_model

        model, train_cfg = load_world_model(args.checkpoint, device)
        found = find_heads(args.checkpoint, heads_settings(args.shards, cfg)) if args.shards else None
        heads = found[0] if found is not None else None
        heads_source = "fitted beside the checkpoint" if found is not None else heads_source
        source = args.checkpoint
    else:
        from drivejepa.models.world_model import build_world_model

        train_cfg = load_config(TrainConfig, args.config)
        torch.manual_seed(0)
        model = build_world_model(train_cfg)
        source = f"{args.config} (random weights)"
    if heads is None:
        torch.manual_seed(0)
        heads = PlanningHeads(HeadSpec.of(model, cfg.heads))
    context = int(train_cfg.data.context)
    planners = {"chosen": Planner(model, heads, cfg, device=device)}
    precision = planners["chosen"].precision
    if precision.dtype is not None:
        planners["fp32"] = Planner(model, heads, dataclasses.replace(cfg, amp=False), device=device)
    obs, obs_source = _shard_obs(args.shards, model, context) if args.shards else \
        _random_obs(list(model.cameras), context)
    newest = {k: v if k in PER_CAMERA else v[-1:] for k, v in obs.items()}
    history = np.tile(np.array([[4.0, 0.05, 0.01, 8.0, 0.02]], np.float32), (max(context - 1, 1), 1))
    with torch.inference_mode():
        states = planners["fp32" if "fp32" in planners else "chosen"].encode(obs)

    def decide(p):
        p.reset()
        return p.plan_states(states, history, "straight")

    def decision(p):
        p.reset()
        newest_state = p.encode(newest)
        return p.plan_states(torch.cat([states[:, 1:], newest_state], dim=1), history, "straight")

    import timm

    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval().to(device)
    image = torch.randn(1, 3, 224, 400, device=device)
    timed = {"resnet18_224x400": lambda: resnet(image)}
    for name, p in planners.items():
        timed.update({f"{name}/encode": lambda p=p: p.encode(newest), f"{name}/optimise": lambda p=p: decide(p),
                      f"{name}/decision": lambda p=p: decision(p)})
    with torch.inference_mode():
        ms = interleaved_medians(timed, args.repeats, args.warmup)
        plans = {name: decide(p) for name, p in planners.items()}
    o = cfg.optimizer
    row = {"resnet18_224x400_ms": round(ms["resnet18_224x400"], 2), "encode_ms": round(ms["chosen/encode"], 2),
           "optimise_ms": round(ms["chosen/optimise"], 2), "decision_ms": round(ms["chosen/decision"], 2),
           "precision": precision.as_dict(), "method": o.method,
           "candidates": o.candidates, "iterations": o.iterations, "horizon_steps": cfg.horizon,
           "rollouts_per_decision": plans["chosen"].evaluations,
           "state": [int(model.bev_size), int(model.bev_size), int(model.latent_dim)], "context_frames": context}
    if "fp32" in planners:
        row["fp32"] = {k: round(ms[f"fp32/{k}"], 2) for k in ("encode", "optimise", "decision")}
        row["decision_speedup_vs_fp32"] = round(ms["fp32/decision"] / ms["chosen/decision"], 3)
        row["plan_end_point_gap_m"] = round(float(np.linalg.norm(
            plans["chosen"].trajectory[-1, :2] - plans["fp32"].trajectory[-1, :2])), 3)
    result = {"benchmark": "plan", "model": source, "heads": heads_source, "observations": obs_source,
              "device": str(device), "threads": args.threads, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(),
              "target_decision_ms": TARGET_DECISION_MS, "meets_target": row["decision_ms"] <= TARGET_DECISION_MS,
              "repeats": args.repeats, **row}
    print(f"precision: {precision.name} ({precision.reason})")
    print(f"{'device':<8}{'precision':<16}{'state':<14}{'search':<22}{'resnet18 ms':>12}{'encode ms':>10}"
          f"{'optimise ms':>13}{'decision ms':>13}")
    for name in planners:
        label = "fp32" if name == "fp32" else precision.name
        print(f"{str(device):<8}{label:<16}{'x'.join(map(str, row['state'])):<14}"
              f"{o.method + f' {o.candidates}x{o.iterations}':<22}{row['resnet18_224x400_ms']:>12.1f}"
              f"{ms[f'{name}/encode']:>10.1f}{ms[f'{name}/optimise']:>13.1f}{ms[f'{name}/decision']:>13.1f}")
    if "fp32" in planners:
        print(f"{precision.name}: decision {row['decision_speedup_vs_fp32']:.2f}x faster than fp32; the two plans' "
              f"end points {row['plan_end_point_gap_m']:.2f} m apart")
    print(f"target: one decision <= {TARGET_DECISION_MS:.0f} ms -> {'met' if result['meets_target'] else 'NOT met'}")
    return result
