"""``drivejepa visualize``: see what the world model predicts, headless (PNG, GIF, PLY) or in an Open3D window."""
from __future__ import annotations

HELP = ("roll a checkpoint out from one key frame of a scene and render the predicted scene per horizon step "
        "(decoded prediction vs true lidar, boxes, ego paths), the nearest real frame, counterfactual actions and "
        "the camera view; writes OUT/*.png, scene.gif, *.ply and visualize.json. With --branch-point, one branch "
        "point of a synthetic world with branches: the K predicted futures beside the K true ones")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file of a training run (RUN/checkpoints/*.pt)")
    parser.add_argument("--shards", required=True, help="shard directory (drivejepa preprocess)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--scene", help="scene name, for example scene-0003")
    what.add_argument("--branch-point", metavar="PARENT:FRAME",
                      help="a branch point of a world written with `drivejepa synth --branches K`, for example "
                           "scene-0005:12: each future's rollout with its own actions beside its true future "
                           "(OUT/branch_point_k*.png, branch_point.json)")
    parser.add_argument("--frame", type=int, default=None,
                        help="start key frame t (default: the first with a full context)")
    parser.add_argument("--horizon", type=int, default=None, help="steps to predict (default: the run's horizon)")
    parser.add_argument("--actions", default="recorded",
                        help="actions of the main view: recorded (default), keep, brake, accelerate, left, right, or "
                             "a .json/.npy file of [dx, dy, dyaw(, speed, yaw_rate)] rows; every other choice is "
                             "shown as a counterfactual")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--interactive", action="store_true",
                        help="also open the scene in an Open3D window when there is a display")
    parser.add_argument("--size", default="800x600", help="pixel size of one rendered view, WIDTHxHEIGHT")
    parser.add_argument("--decoder-steps", type=int, default=300,
                        help="training steps of the visualisation decoder when the run has none yet")
    parser.add_argument("--retrain-decoder", action="store_true", help="train the visualisation decoder again")
    parser.add_argument("--allow-other-shards", action="store_true",
                        help="use shards made with another preprocessing config than the checkpoint was trained on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def format_summary(summary: dict) -> str:
    """The one-screen summary printed after a run."""
    lines = [f"{summary['scene']} from key frame {summary['frame']}, {summary['horizon']} steps of "
             f"{summary['seconds_per_step']:.2f} s, actions '{summary['actions']}' "
             f"({summary['seconds']:.1f} s)",
             "   k  nearest real frame (true frame, its rank)   decoded occupancy IoU vs truth: prediction / "
             "start frame / true latent"]
    for s in summary["steps"]:
        near = f"{s['nearest_frame']} ({s['true_frame']}, {s['true_frame_rank']})"
        ious = " / ".join(f"{s[key]['occupancy_iou']:.3f}" for key in
                          ("decoded_prediction", "decoded_start_frame", "decoded_true_latent"))
        lines.append(f"  {s['k']:>2}  {near:<42} {ious}")
    lines.append(f"counterfactual end points spread over {summary['counterfactual_spread_m']:.1f} m")
    lines.append(f"decoder: {summary['decoder']['path']}")
    if not summary["rendered"]:
        lines.append(f"NOT RENDERED: {summary['render_message']}")
    files = summary["files"]
    for kind in ("png", "gif", "ply", "json"):
        if files[kind]:
            shown = files[kind] if len(files[kind]) <= 3 else files[kind][:2] + [f"... ({len(files[kind])} files)"]
            lines.append(f"{kind}: " + ", ".join(shown))
    return "\n".join(lines)


def format_branch_point_summary(summary: dict) -> str:
    """The one-screen summary of ``--branch-point``."""
    h = summary["horizon"]
    lines = [f"branch point {summary['branch_point']}: {len(summary['futures'])} futures rolled out {h} steps of "
             f"{summary['seconds_per_step']:.2f} s from {summary['context']} shared context frames "
             f"({summary['seconds']:.1f} s)",
             f"  {'future':<22} {'scene':<34} nearest true future at {h * summary['seconds_per_step']:.1f} s"]
    for f in summary["futures"]:
        lines.append(f"  {f['behaviour']:<22} {f['scene']:<34} {f['nearest'][-1]}")
    lines.append("counterfactual top-1 per step: " + " ".join(f"{v:.2f}" for v in summary["top1"])
                 + f" (chance {summary['chance']:.2f})")
    if not summary["rendered"]:
        lines.append(f"NOT RENDERED: {summary['render_message']}")
    for kind in ("png", "json"):
        if summary["files"][kind]:
            lines.append(f"{kind}: " + ", ".join(summary["files"][kind]))
    return "\n".join(lines)


def run(args) -> int:
    from drivejepa.commands import parse_image_size
    from drivejepa.errors import UserError
    from drivejepa.visualization.pipeline import visualize

    if args.decoder_steps < 1:
        raise UserError(f"--decoder-steps must be >= 1, got {args.decoder_steps}")
    from drivejepa.data.shards import check_scene
    from drivejepa.training.checkpoint import refuse_other_shards

    refuse_other_shards(args.checkpoint, args.shards, allow_other=args.allow_other_shards)
    size = parse_image_size(args.size, "--size", minimum=64)
    if args.branch_point:
        from drivejepa.visualization.branch_point import visualize_branch_point

        summary = visualize_branch_point(args.checkpoint, args.shards, args.branch_point, args.out,
                                         horizon=args.horizon, size=size,
                                         decoder_steps=args.decoder_steps, retrain_decoder=args.retrain_decoder,
                                         progress=not (args.no_progress or args.quiet))
        print(format_branch_point_summary(summary))
        return 0
    check_scene(args.shards, args.scene)
    summary = visualize(args.checkpoint, args.shards, args.scene, args.out, frame=args.frame, horizon=args.horizon,
                        actions=args.actions, interactive=args.interactive,
                        size=size,
                        decoder_steps=args.decoder_steps, retrain_decoder=args.retrain_decoder,
                        progress=not (args.no_progress or args.quiet))
    print(format_summary(summary))
    return 0
