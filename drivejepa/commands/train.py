"""`drivejepa train`: train the world model from shards (one CPU, or DDP under torchrun; see drivejepa/train.py)."""
from __future__ import annotations

HELP = "train the world model on shards; --resume auto continues the latest checkpoint in --out"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="training YAML, e.g. pipelines/train_demo.yaml")
    parser.add_argument("--shards", default=None, help="shard directory (sets data.shards)")
    parser.add_argument("--out", required=True, help="run directory: config.yaml, metrics.jsonl, tb/, checkpoints/")
    parser.add_argument("--resume", default=None,
                        help="'auto' = the latest checkpoint in --out (a new run when there is none), or a path")
    parser.add_argument("--allow-other-shards", action="store_true",
                        help="resume on shards made with another preprocessing config than the checkpoint's")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. optim.lr=1e-4 data.batch_size=16")


def config_from_args(args):
    """The TrainConfig these arguments mean (also used by the torchrun and Ray Train launchers)."""
    from drivejepa.config import TrainConfig, load_config

    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    return load_config(TrainConfig, args.config, overrides)


def run(args) -> int:
    import sys

    from drivejepa.training.summary import format_summary
    from drivejepa.training.trainer import EXIT_INTERRUPTED, TrainingInterrupted, TrainingStopped, train

    cfg = config_from_args(args)
    try:
        summary = train(cfg, args.out, resume=args.resume, progress=not getattr(args, "quiet", False),
                        allow_other_shards=getattr(args, "allow_other_shards", False))
    except TrainingStopped as exc:
        print(f"drivejepa train: stopped: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"drivejepa train: interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.get("rank", 0) == 0:
        print(format_summary(summary, cfg.data.horizon))
    return 0
