"""``drivejepa plan``: the world-model planner on a logged scene (see drivejepa/planning/replay.py)."""
from __future__ import annotations

HELP = ("plan with the world model from key frames of a logged scene (CEM or MPPI over 3 s of actions, costs read "
        "from the predicted states by cost heads fitted beside the run); writes OUT/plan.json and a figure per "
        "decision")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file of a training run (RUN/checkpoints/*.pt)")
    parser.add_argument("--shards", required=True, help="shard directory (drivejepa preprocess, schema 3)")
    parser.add_argument("--scene", required=True, help="scene name, for example scene-0003")
    parser.add_argument("--frame", type=int, default=None, help="first key frame to plan at (default: the first "
                        "with a full context and a logged future)")
    parser.add_argument("--steps", type=int, default=1, help="decisions at consecutive key frames (default 1)")
    parser.add_argument("--command", default="logged",
                        help="route command: left, straight, right, or logged (default: derived from the logged "
                             "position 3 s ahead, as the nuScenes planning protocol does)")
    parser.add_argument("--config", default=None, help="planner YAML (default: pipelines/plan.yaml)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--retrain-heads", action="store_true", help="fit the cost heads again")
    parser.add_argument("--allow-other-shards", action="store_true",
                        help="use shards made with another preprocessing config than the checkpoint was trained on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="planner overrides key=value (for example optimizer.method=mppi)")


def default_config():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "pipelines" / "plan.yaml"


def format_summary(summary: dict) -> str:
    lines = [f"{summary['scene']}: {len(summary['decisions'])} decisions on {summary['device']} "
             f"({summary['seconds']:.1f} s in all)",
             "  frame  command   L2 1 s / 2 s / 3 s (m)   const. vel. 3 s   collides   cost     latency ms"]
    for d in summary["decisions"]:
        l2 = d["l2_m"]
        at = [l2[min(k, len(l2)) - 1] for k in (2, 4, 6)]
        lines.append(f"  {d['frame']:>5}  {d['command']:<8}  {at[0]:5.2f} / {at[1]:5.2f} / {at[2]:5.2f}       "
                     f"{d['constant_velocity_l2_m'][-1]:6.2f}        {'yes' if any(d['collides']) else 'no ':<9}"
                     f"{d['cost']:7.3f}  {d['latency_ms']['total']:8.1f}")
    scores = summary["heads"]["scores"] or {}
    for source, what in (("states", "encoder states"), ("rollouts", "rollouts")):
        if source in scores:
            heads = scores[source]
            lines.append(f"cost heads on {what} (held out): " + ", ".join(
                f"{t} IoU {heads[t]['iou']:.3f} (prior {heads[t]['prior_iou']:.3f}, "
                f"log loss {heads[t]['log_loss']:.3f})" for t in ("occupancy", "drivable")))
    lines.append(f"figures and plan.json in {summary['out']}")
    return "\n".join(lines)


def run(args) -> int:
    from drivejepa.config import PlanConfig, load_config
    from drivejepa.errors import UserError
    from drivejepa.planning.replay import plan_scene
    from drivejepa.training.checkpoint import refuse_other_shards

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    cfg = load_config(PlanConfig, args.config or default_config(), args.overrides)
    refuse_other_shards(args.checkpoint, args.shards, allow_other=args.allow_other_shards)
    summary = plan_scene(args.checkpoint, args.shards, args.scene, args.out, cfg, frame=args.frame, steps=args.steps,
                         command=args.command, retrain_heads=args.retrain_heads,
                         progress=not (args.no_progress or args.quiet))
    summary["out"] = args.out
    print(format_summary(summary))
    return 0
