"""`drivejepa preprocess`: a nuScenes dataroot -> training shards (one per scene) with Ray."""
from __future__ import annotations

HELP = "turn a nuScenes dataroot (synthetic, mini, trainval) into training shards, in parallel with Ray"


def add_arguments(parser) -> None:
    parser.add_argument("--dataroot", required=True, help="nuScenes dataroot (holds samples/, sweeps/, VERSION/)")
    parser.add_argument("--version", required=True, help="database version, e.g. v1.0-mini, v1.0-trainval, v1.0-synth")
    parser.add_argument("--out", required=True, help="shard directory (created; a rerun resumes)")
    parser.add_argument("--split", default=None,
                        help="scene split: mini_train, mini_val, train, val (real) or train, val (synthetic); "
                             "default all scenes")
    parser.add_argument("--config", default=None, help="preprocessing YAML (default: built-in defaults)")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto' joins a running cluster)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="scenes processed at once (default: every CPU Ray has; 0 = in this process, no Ray)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite shards that are already complete")
    parser.add_argument("--summary-json", default=None, help="also write the run summary to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. image_size=[224,128]")


def run(args) -> int:
    from drivejepa.config import PreprocessConfig, load_config
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.io import atomic_write_json

    cfg = load_config(PreprocessConfig, args.config, args.overrides)
    summary = preprocess_dataroot(args.dataroot, args.version, args.out, cfg, split=args.split,
                                  num_workers=args.num_workers, address=args.address, overwrite=args.overwrite,
                                  progress=not args.quiet)
    print(summary.format())
    if args.summary_json:
        atomic_write_json(args.summary_json, summary.to_dict())
    return 0 if summary.frames or not summary.scenes else 1
