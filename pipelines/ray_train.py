"""Train on a Ray cluster with Ray Train's TorchTrainer (the same loop as `drivejepa train` and torchrun).

    python pipelines/ray_train.py --config pipelines/train_base.yaml --shards /shared/shards/trainval \
        --out /shared/runs/base --num-workers 8 --gpu --address auto [--resume auto] [key=value ...]

Shards and --out must be on storage every node mounts at the same path (see pipelines/README.md)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from drivejepa.commands import train as command
    from drivejepa.config import ConfigError
    from drivejepa.errors import UserError
    from drivejepa.runtime import setup_logging
    from drivejepa.training.ray_train import train_on_ray
    from drivejepa.training.summary import format_summary

    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    command.add_arguments(parser)       # the arguments of `drivejepa train`, plus the cluster's below
    parser.add_argument("--num-workers", type=int, default=2, help="training processes (one per GPU with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU workers (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="'auto' joins a running Ray cluster")
    args = parser.parse_intermixed_args(argv)
    setup_logging(0)
    try:
        cfg = command.config_from_args(args)
        summary = train_on_ray(cfg, args.out, num_workers=args.num_workers, use_gpu=args.gpu,
                               cpus_per_worker=args.cpus_per_worker, resume=args.resume, address=args.address,
                               allow_other_shards=args.allow_other_shards)
    except (ConfigError, UserError, FileNotFoundError) as exc:
        print(f"ray_train: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary, cfg.data.horizon))
    return 0


if __name__ == "__main__":
    sys.exit(main())
