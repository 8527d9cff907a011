"""Shard loading speed: windows per second from WindowDataset + DataLoader against the training step's consumption.

Both are measured in this process at the demo config (``--train-config``, default ``pipelines/train_demo.yaml`` when
it exists, else the TrainConfig defaults): the loader delivers shuffled batches of windows; the training step is one
forward/backward/AdamW/EMA update of the world model on such a batch (CPU, the config's autocast). The ratio is
windows delivered per second over windows consumed per second (target >= 20x).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    demo = REPO / "pipelines/train_demo.yaml"
    parser.add_argument("--shards", default=None,
                        help="shard directory (default: preprocess a synthetic world under --work)")
    parser.add_argument("--work", default="/tmp/drivejepa-bench/loader")
    parser.add_argument("--train-config", default=str(demo) if demo.is_file() else None,
                        help="training YAML whose data/model sections are benchmarked (default: the demo config)")
    parser.add_argument("--windows", type=int, default=512, help="windows to load for the loader timing")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up step)")


def _shards(args) -> Path:
    if args.shards:
        return Path(args.shards)
    from drivejepa.config import PreprocessConfig, load_config
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.data.synth import SYNTH_VERSION, write_world

    work = Path(args.work)
    world, shards = work / "world", work / "shards"
    if not (world / ".complete").is_file():
        write_world(world, scenes=4, samples_per_scene=24, seed=0, image_size=(1600, 900), progress=False)
        (world / ".complete").write_text("ok\n")
    cfg = load_config(PreprocessConfig, REPO / "pipelines/preprocess.yaml")
    preprocess_dataroot(world, SYNTH_VERSION, shards, cfg, progress=False)
    return shards


def measure_loader(shards: Path, cfg, n_windows: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from drivejepa.data.dataset import WindowDataset, collate_windows

    ds = WindowDataset(shards, context=cfg.data.context, horizon=cfg.data.horizon, stride=cfg.data.stride,
                       cameras=cfg.data.cameras)
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                        collate_fn=collate_windows, generator=torch.Generator().manual_seed(0))
    delivered, start, first = 0, time.perf_counter(), None
    while delivered < n_windows:
        for batch in loader:
            delivered += len(batch["scene"])
            first = first or batch
            if delivered >= n_windows:
                break
    seconds = time.perf_counter() - start
    return {"dataset_windows": len(ds), "windows": delivered, "seconds": seconds,
            "windows_per_second": delivered / seconds, "batch_size": cfg.data.batch_size,
            "num_workers": cfg.data.num_workers}, first


def measure_train_step(cfg, batch: dict, steps: int) -> dict:
    import math

    import torch

    from drivejepa.models.world_model import build_world_model
    from drivejepa.training.optim import build_optimizer
    from drivejepa.precision import choose_precision

    torch.manual_seed(cfg.seed)
    model = build_world_model(cfg).train()
    optimizer = build_optimizer(model, cfg.optim)
    autocast = choose_precision(torch.device("cpu"), cfg.optim.amp, cfg.optim.amp_dtype).autocast
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with autocast():
            loss, _ = model.loss(batch, cfg.loss, cfg.data.context)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(cfg.loss.ema_start)
        if i:  # the first step pays for allocations and lazy initialisation
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {"model_size": cfg.model.size, "steps": steps, "step_seconds_median": step,
            "windows_per_second": cfg.data.batch_size / step, "torch_threads": torch.get_num_threads()}


def run(args) -> dict:
    from drivejepa.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, args.train_config)
    shards = _shards(args)
    load_before = os.getloadavg()
    loader, batch = measure_loader(shards, cfg, args.windows)
    step = measure_train_step(cfg, batch, args.steps)
    result = {"train_config": args.train_config or "TrainConfig defaults", "shards": str(shards),
              "context": cfg.data.context, "horizon": cfg.data.horizon, "cameras": list(cfg.data.cameras),
              "loader": loader, "train_step": step,
              "ratio_delivered_over_consumed": loader["windows_per_second"] / step["windows_per_second"],
              "target_ratio": 20.0, "cpus": os.cpu_count(), "load_average_before": list(load_before)}
    print(f"\nloader benchmark: {shards} ({loader['dataset_windows']} windows of "
          f"{cfg.data.context}+{cfg.data.horizon} frames, cameras {','.join(cfg.data.cameras)}, "
          f"batch {cfg.data.batch_size}, {cfg.data.num_workers} loader workers)")
    print(f"{'':38s} {'windows/s':>10s}")
    print(f"{'WindowDataset + collate (delivered)':38s} {loader['windows_per_second']:10.1f}")
    print(f"{'training step, model ' + cfg.model.size + ' (consumed)':38s} {step['windows_per_second']:10.1f}"
          f"   ({1e3 * step['step_seconds_median']:.0f} ms a step)")
    print(f"ratio {result['ratio_delivered_over_consumed']:.1f}x (target >= 20x); load average "
          f"{load_before[0]:.1f} on {os.cpu_count()} CPUs")
    return result
