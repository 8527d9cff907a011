"""``drivejepa bench latency``: batch-1 CPU latency of encode and of one predictor step, next to the bare ResNet18.

All timings come from the same process on the same images, so the ratios are what matter: the demo-size encode
(front camera 128x224 stored, seen at the demo config's ``model.image_size``, 4096 lidar points, 128 radar points)
against the bare ResNet18 (the whole network, classifier off) on the image the backbone sees; one predictor step (the
bird's-eye state moved one key frame) against an encode. Each size's model is the one its training config builds
(pipelines/train_demo.yaml, pipelines/train_base.yaml).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]

WORKLOADS = {
    # size: cameras, (H, W), lidar points, radar points
    "demo": (["CAM_FRONT"], (128, 224), 4096, 128),
    "base": (["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT"],
             (224, 400), 16384, 256),
}
CONFIGS = {"demo": REPO / "pipelines/train_demo.yaml", "base": REPO / "pipelines/train_base.yaml"}
TARGET_ENCODE_VS_RESNET = 1.3
TARGET_STEP_VS_ENCODE = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", default=["demo", "base"], choices=sorted(WORKLOADS),
                        help="model sizes to time (default: demo base)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=30,
                        help="timed calls per demo measurement (median reported); base uses a sixth, at least 3")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before each measurement")
    parser.add_argument("--context", type=int, default=2, help="context frames seen by the predictor step")


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each function, calling them in turn so that load from other processes on a shared
    machine hits all of them alike and the ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def measure(size: str, args) -> dict:
    import timm
    import torch

    import numpy as np

    from drivejepa.config import TrainConfig, load_config
    from drivejepa.data.synth.camera import camera_to_ego, intrinsics
    from drivejepa.models.world_model import WorldModel

    cameras, (h, w), n_lidar, n_radar = WORKLOADS[size]
    g = torch.Generator().manual_seed(0)
    obs = {
        "images": torch.randint(0, 256, (1, len(cameras), h, w, 3), generator=g, dtype=torch.uint8),
        "image_mask": torch.ones(1, len(cameras), dtype=torch.bool),
        "cam_intrinsics": torch.tensor(np.stack([intrinsics(c, w, h) for c in cameras])[None], dtype=torch.float32),
        "cam_to_key_ego": torch.tensor(np.stack([camera_to_ego(c) for c in cameras])[None], dtype=torch.float32),
        "lidar": torch.randn(1, n_lidar, 4, generator=g) * torch.tensor([20.0, 20.0, 1.0, 50.0]),
        "lidar_mask": torch.ones(1, n_lidar, dtype=torch.bool),
        "radar": torch.randn(1, n_radar, 6, generator=g) * torch.tensor([50.0, 50.0, 1.0, 10.0, 5.0, 5.0]),
        "radar_mask": torch.arange(n_radar).unsqueeze(0) < n_radar // 2,      # half padding, as in real sweeps
    }
    repeats = args.repeats if size == "demo" else max(3, args.repeats // 6)
    warmup = args.warmup if size == "demo" else min(args.warmup, 1)
    model_cfg = load_config(TrainConfig, CONFIGS[size]).model
    model = WorldModel(model_cfg, cameras).eval()
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with torch.inference_mode():
        pixels = model.encoder.image.normalise(obs["images"].reshape(-1, h, w, 3))
        state = model.encode(obs)
        context = state.unsqueeze(1).expand(1, args.context, *state.shape[1:]).contiguous()
        action = torch.tensor([[[4.0, 0.1, 0.02, 8.0, 0.04]]])
        past = action.expand(1, args.context - 1, 5).contiguous()
        ms = interleaved_medians({
            "resnet18": lambda: resnet(pixels),
            "encode": lambda: model.encode(obs),
            "step": lambda: model.rollout(context, action, past),
        }, repeats, warmup)
    resnet_ms, encode_ms, step_ms = ms["resnet18"], ms["encode"], ms["step"]
    return {
        "size": size, "cameras": len(cameras), "image_hw": [h, w], "lidar_points": n_lidar, "radar_points": n_radar,
        "backbone_sees_hw": list(pixels.shape[-2:]), "state": [model.bev_size, model.bev_size, model.latent_dim],
        "params_m": round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 2),
        "resnet18_ms": round(resnet_ms, 3), "encode_ms": round(encode_ms, 3), "predictor_step_ms": round(step_ms, 3),
        "encode_vs_resnet18": round(encode_ms / resnet_ms, 3), "step_vs_encode": round(step_ms / encode_ms, 4),
        "repeats": repeats,
    }


def run(args) -> dict:
    import torch


    torch.set_num_threads(args.threads)
    rows = [measure(size, args) for size in args.sizes]
    result = {
        "benchmark": "latency", "batch": 1, "device": "cpu", "threads": args.threads, "torch": torch.__version__,
        "targets": {"demo_encode_vs_resnet18_max": TARGET_ENCODE_VS_RESNET,
                    "step_vs_encode_max": TARGET_STEP_VS_ENCODE},
        "results": rows,
    }
    verdict = ""
    for row in rows:
        if row["size"] == "demo":
            result["demo_meets_targets"] = (row["encode_vs_resnet18"] <= TARGET_ENCODE_VS_RESNET
                                            and row["step_vs_encode"] <= TARGET_STEP_VS_ENCODE)
            verdict = f" -> {'met' if result['demo_meets_targets'] else 'NOT met'}"
    header = (f"{'size':<6}{'inputs':<36}{'resnet18 ms':>12}{'encode ms':>11}{'step ms':>9}"
              f"{'enc/res':>9}{'step/enc':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        inputs = (f"{r['cameras']}x{r['image_hw'][0]}x{r['image_hw'][1]}, "
                  f"{r['lidar_points']} lidar, {r['radar_points']} radar")
        print(f"{r['size']:<6}{inputs:<36}{r['resnet18_ms']:>12.2f}{r['encode_ms']:>11.2f}"
              f"{r['predictor_step_ms']:>9.3f}{r['encode_vs_resnet18']:>9.2f}{r['step_vs_encode']:>10.3f}")
    print(f"targets: demo encode <= {TARGET_ENCODE_VS_RESNET}x resnet18, predictor step <= "
          f"{TARGET_STEP_VS_ENCODE:.0%} of an encode{verdict}")
    return result
