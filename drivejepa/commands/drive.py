"""``drivejepa drive``: closed-loop driving in the synthetic world, drivers compared on the same scenarios."""
from __future__ import annotations

HELP = ("drive held-out synthetic scenes closed loop: each driver (the IDM expert, constant velocity, planners) "
        "steers the ego from the sensors rendered where it is while the traffic reacts; collisions, progress "
        "against the expert, time off the drivable area, time to collision, jerk; writes OUT/metrics.json and a plot")


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="drive YAML (default: eval/drive.yaml)")
    parser.add_argument("--out", required=True, help="output directory (a rerun of the same config resumes)")
    parser.add_argument("--render", action="store_true",
                        help="also write a PNG per key frame and a GIF per run with Open3D (OUT/render/)")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto' joins a running cluster)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="runs at once in Ray tasks (default: one per CPU); 0 = drive in this process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (for example steps=6)")


def run(args) -> int:
    from pathlib import Path

    from drivejepa.config import DriveConfig, load_config
    from drivejepa.driving.runner import drive, format_summary
    from drivejepa.errors import UserError

    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num-workers must be 0 (this process) or more, got {args.num_workers}")
    config = Path(args.config) if args.config else Path(__file__).resolve().parents[2] / "eval" / "drive.yaml"
    cfg = load_config(DriveConfig, config, args.overrides)
    metrics = drive(cfg, args.out, render=args.render, num_workers=args.num_workers, address=args.address,
                    progress=not args.no_progress)
    print(format_summary(metrics, Path(args.out)))
    rendered = metrics.get("rendered")
    if rendered is not None and not rendered["ok"]:
        print(f"--render: nothing drawn: {rendered['message']}")
    return 0
