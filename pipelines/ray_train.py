"""Train on a Ray cluster with Ray Train's TorchTrainer (the same loop as `drivejepa train` and torchrun).

    python pipelines/ray_train.py --config pipelines/train_base.yaml --shards /shared/shards/trainval \
        --out /shared/runs/base --num-workers 8 --gpu --address auto [--resume auto] [key=value ...]

Shards and --out must be on storage every node mounts at the same path (see pipelines/README.md)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--shards", default=None, help="shard directory (sets data.shards)")
    parser.add_argument("--out", required=True, help="run directory on shared storage")
    parser.add_argument("--num-workers", type=int, default=2, help="training processes (one per GPU with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU workers (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="'auto' joins a running Ray cluster")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)

    from drivejepa.config import TrainConfig, load_config
    from drivejepa.runtime import setup_logging
    from drivejepa.training.ray_train import train_on_ray
    from drivejepa.training.trainer import format_summary

    setup_logging(0)
    overrides = list(args.overrides) + ([f"data.shards={args.shards}"] if args.shards else [])
    cfg = load_config(TrainConfig, args.config, overrides)
    summary = train_on_ray(cfg, args.out, num_workers=args.num_workers, use_gpu=args.gpu,
                           cpus_per_worker=args.cpus_per_worker, resume=args.resume, address=args.address)
    print(format_summary(summary, cfg.data.horizon))
    return 0


if __name__ == "__main__":
    sys.exit(main())
