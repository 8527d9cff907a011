"""``drivejepa demo``: the whole mission on the embedded synthetic world (what ``make demo`` runs)."""
from __future__ import annotations

HELP = ("run every stage on the synthetic world: synth, preprocess (Ray), train, evaluate (Ray), visualize; "
        "a rerun resumes")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="out/demo", help="output directory for every stage (default: out/demo)")
    parser.add_argument("--scenes", type=int, default=35,
                        help="scenes in the synthetic world (default 35: 21 train, 7 val, 7 test)")
    parser.add_argument("--samples-per-scene", type=int, default=40, help="key frames per scene")
    parser.add_argument("--branches", type=int, default=5,
                        help="futures per branch point, the scene's own included (default 5; 0 = no branches)")
    parser.add_argument("--branch-frames", type=int, default=6,
                        help="key frames each branch runs past its branch point (default 6: the 3 s horizon)")
    parser.add_argument("--image-size", default="800x450", help="camera images of the world, WxH")
    parser.add_argument("--preprocess-config", default=None, help="default: pipelines/preprocess.yaml")
    parser.add_argument("--train-config", default=None, help="default: pipelines/train_demo.yaml")
    parser.add_argument("--suite", default=None, help="default: eval/scenarios/default.yaml")
    parser.add_argument("--summary-json", default=None, help="default: OUT/demo_summary.json")
    parser.add_argument("overrides", nargs="*", help="training config overrides key=value")


def run(args) -> int:
    from pathlib import Path

    from drivejepa.demo import DemoPlan, format_demo_summary, run_demo
    from drivejepa.io import atomic_write_json

    plan = DemoPlan(out=Path(args.out), scenes=args.scenes, samples_per_scene=args.samples_per_scene,
                    image_size=args.image_size, branches=args.branches, branch_frames=args.branch_frames,
                    train_overrides=tuple(args.overrides), progress=not args.quiet)
    for field, value in (("preprocess_config", args.preprocess_config), ("train_config", args.train_config),
                         ("suite", args.suite)):
        if value:
            setattr(plan, field, Path(value))
    result = run_demo(plan)
    atomic_write_json(args.summary_json or plan.out / "demo_summary.json",
                      dict(times=result["times"], outputs=result["notes"], headline=result["headline"]))
    print(format_demo_summary(plan, result))
    return 0
