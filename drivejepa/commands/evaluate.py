"""``drivejepa evaluate``: does the world model predict the future, and where does it fail?"""
from __future__ import annotations

HELP = ("evaluate a checkpoint on the scenes of a split: latent prediction error and retrieval per horizon against "
        "copy-last, constant-velocity and shuffled-action baselines, frozen probes and occupancy forecasts, per "
        "scenario, and counterfactual top-1 on the split's branch points; writes OUT/metrics.json, report.md and "
        "plots")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint file of a training run (RUN/checkpoints/*.pt)")
    parser.add_argument("--shards", required=True, help="shard directory (drivejepa preprocess)")
    parser.add_argument("--split", default="val", help="split of the shard manifest to evaluate (default: val)")
    parser.add_argument("--suite", default=None,
                        help="suite YAML: settings and scenarios (default: eval/scenarios/default.yaml)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--action-blind-checkpoint", default=None, metavar="CKPT",
                        help="a run of the same recipe trained with every action masked (model.action_dropout=1.0), "
                             "reported as a baseline on the same windows and branch points")
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto' joins a running cluster)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="Ray actors, one per group of scenes (default: one per CPU); 0 = run in this process")
    parser.add_argument("--allow-other-shards", action="store_true",
                        help="use shards made with another preprocessing config than the checkpoint was trained on")
    parser.add_argument("--plan-config", default=None,
                        help="planner YAML (e.g. pipelines/plan.yaml): adds open-loop planning metrics and action "
                             "recovery (metrics.json 'planning', report.md)")
    parser.add_argument("--plan-variant", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                        help="with --plan-config: also plan the same windows with these planner overrides (the "
                             "search and the costs), reported as world_model[NAME]; repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="suite overrides key=value (for example horizon=4)")


def run(args) -> int:
    from drivejepa.evaluation.report import format_headline
    from drivejepa.evaluation.runner import evaluate

    if args.num_workers is not None and args.num_workers < 0:
        from drivejepa.errors import UserError

        raise UserError(f"--num-workers must be 0 (this process) or more, got {args.num_workers}")
    from drivejepa.training.checkpoint import refuse_other_shards

    refuse_other_shards(args.checkpoint, args.shards, allow_other=args.allow_other_shards)
    if args.action_blind_checkpoint:
        refuse_other_shards(args.action_blind_checkpoint, args.shards, allow_other=args.allow_other_shards)
    variants = plan_variants(args.plan_variant, args.plan_config)
    if variants:                                   # refused now rather than after the factual evaluation
        from drivejepa.config import PlanConfig, load_config
        from drivejepa.planning.evaluation import variant_configs

        variant_configs(load_config(PlanConfig, args.plan_config), variants)
    metrics = evaluate(args.checkpoint, args.shards, args.out, split=args.split, suite=args.suite,
                       overrides=args.overrides, address=args.address, num_workers=args.num_workers,
                       progress=not args.no_progress, action_blind_checkpoint=args.action_blind_checkpoint,
                       plan_config=args.plan_config, plan_variants=variants)
    print(format_headline(metrics))
    best = {name: b["action_sensitivity"]["mse_ratio"][-1] for name, b in metrics["scenarios"].items()
            if b["windows"]}
    print(f"\n{len(metrics['provenance']['eval_scenes'])} scenes, {metrics['settings']['windows']} windows, "
          f"{len(metrics['scenarios'])} scenarios; action ratio at the last horizon per scenario: "
          + ", ".join(f"{n} {v:.3f}" if v is not None else f"{n} n/a" for n, v in best.items()))
    print(f"wrote {args.out}/metrics.json, report.md and plots")
    return 0


def plan_variants(specs: list[str], plan_config) -> dict:
    """``--plan-variant`` values ``'NAME: KEY=VALUE ...'`` -> ``{NAME: [KEY=VALUE, ...]}``."""
    from drivejepa.errors import UserError

    if specs and plan_config is None:
        raise UserError("--plan-variant needs --plan-config: a variant is the planner of that YAML with overrides")
    out: dict = {}
    for spec in specs:
        name, sep, rest = spec.partition(":")
        name, overrides = name.strip(), rest.split()
        if not sep or not name or name in out or any("=" not in o for o in overrides):
            raise UserError(f"--plan-variant {spec!r}: expected 'NAME: KEY=VALUE ...' with a new name (e.g. "
                            "'smooth: accel_decay=0.7 weights.jerk=2.0')")
        out[name] = overrides
    return out
