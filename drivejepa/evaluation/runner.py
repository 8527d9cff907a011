"""``drivejepa evaluate``: plan the windows (evaluation/plan.py), run the scenes (evaluation/workers.py), score
(evaluation/scoring.py), and write the metrics with their provenance (evaluation/report.py).

Scoring (retrieval within each window's scene, probes, scenario breakdown) happens once on the driver; every
prediction, target and baseline is compared in the checkpoint's latent space (drivejepa/latent_space.py).

Counterfactual branch scenes of the synthetic world (tagged ``counterfactual``) are left out of every factual number
(latent error, retrieval, probes, scenarios), so those stay comparable with a world without branches; they make the
``counterfactual`` section instead (evaluation/counterfactual.py), one branch point at a time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa import latent_space
from drivejepa.config import EvalConfig
from drivejepa.errors import UserError
from drivejepa.evaluation.counterfactual import branch_points, plan_branch_points, score_branch_points
from drivejepa.evaluation.plan import plan_jobs
from drivejepa.evaluation.workers import run_jobs
from drivejepa.io import file_sha256

log = logging.getLogger(__name__)


def default_suite() -> Path:
    """``eval/scenarios/default.yaml`` of this checkout."""
    return Path(__file__).resolve().parents[2] / "eval" / "scenarios" / "default.yaml"


def evaluate(checkpoint: str | Path, shards: str | Path, out: str | Path, *, split: str = "val",
             suite: Optional[str | Path] = None, overrides=(), address: Optional[str] = None,
             num_workers: Optional[int] = None, progress: bool = True,
             action_blind_checkpoint: Optional[str | Path] = None, plan_config: Optional[str | Path] = None,
             plan_variants: Optional[dict] = None) -> dict:
    """Evaluate a checkpoint on the scenes of ``split``; writes OUT/metrics.json, report.md, plots, probes.pt and
    returns the metrics. ``num_workers=0`` runs in this process, otherwise in Ray actors (see :func:`run_jobs`).
    ``action_blind_checkpoint``: a run of the same recipe trained with every action masked
    (``model.action_dropout=1.0``), evaluated on the same windows and branch points as a baseline. With
    ``plan_config`` (a planner YAML) the planning section is added (drivejepa/planning/evaluation.py), with
    ``plan_variants`` (``{name: [key=value, ...]}``) planned beside the default on the same windows."""
    import datetime

    from drivejepa import __version__
    from drivejepa.config import config_hash, config_to_dict, load_config, resolve_model_config
    from drivejepa.data.shards import factual_scenes, load_manifest, scenes_in_split
    from drivejepa.evaluation.report import headline_rows, write_outputs
    from drivejepa.evaluation.scenarios import assign_scenes, parse_scenarios
    from drivejepa.evaluation.scoring import score
    from drivejepa.training.checkpoint import config_of, load_checkpoint

    checkpoint = Path(checkpoint).resolve()
    suite = Path(suite) if suite is not None else default_suite()
    cfg = load_config(EvalConfig, suite, overrides)
    scenarios = parse_scenarios(cfg.scenarios, str(suite))
    ckpt = load_checkpoint(checkpoint, mmap=True)
    train_cfg = config_of(ckpt, f"{checkpoint} (config)")
    step = ckpt.get("step")
    del ckpt
    horizon = cfg.horizon or train_cfg.data.horizon
    context = train_cfg.data.context
    if horizon < 1:
        raise UserError(f"{suite}: horizon must be at least 1 key frame, got {horizon}")

    manifest = load_manifest(shards)
    listed = scenes_in_split(shards, split)
    descriptions = {s: manifest["scenes"].get(s, {}).get("description", "") for s in manifest["scenes"]}
    eval_scenes = factual_scenes(manifest, listed)
    points = branch_points({s: descriptions.get(s, "") for s in listed})
    if not eval_scenes:
        raise UserError(f"{shards}: split '{split}' has no scene in this shard directory"
                        + (" other than counterfactual branches" if listed else ""))
    try:
        held = set(listed)
        train_scenes = [s for s in factual_scenes(manifest, scenes_in_split(shards, cfg.train_split)) if s not in held]
    except UserError as exc:
        log.warning("no probes: %s", exc)
        train_scenes = []
    if cfg.max_train_scenes and len(train_scenes) > cfg.max_train_scenes:
        pick = np.linspace(0, len(train_scenes) - 1, cfg.max_train_scenes).round().astype(int)
        train_scenes = [train_scenes[i] for i in pick]
    if not train_scenes:
        log.warning("split '%s' has no scene in %s: probes and occupancy forecasts are left out", cfg.train_split,
                    shards)
    jobs, plan = plan_jobs(shards, eval_scenes, train_scenes, context, horizon, cfg.shuffle_seed,
                           (cfg.departure_dx, cfg.departure_dyaw))
    cf_jobs, cf_skipped = plan_branch_points(shards, points, context, horizon, manifest)
    plan["skipped"] += cf_skipped
    scenario_scenes = assign_scenes(scenarios, plan.pop("descriptions"))
    log.info("evaluating %d windows (%d context + %d future key frames) in %d scenes of split '%s' and %d branch "
             "points; probes on %d scenes of split '%s'", plan["windows"], context, horizon, len(eval_scenes), split,
             len(cf_jobs), len(train_scenes), cfg.train_split)
    settings = {"device": cfg.device, "batch_size": cfg.batch_size, "horizon": horizon, "context": context,
                "grid_size": cfg.grid_size, "grid_range": cfg.grid_range, "count_radius": cfg.count_radius,
                "agent_classes": list(cfg.agent_classes), "space": latent_space.space_of(train_cfg.loss)}
    results = run_jobs(str(checkpoint), jobs + cf_jobs, settings, num_workers=num_workers, address=address,
                       progress=progress)
    for job, r in zip(jobs, results):
        if job.role == "eval":
            r["departing"] = job.departing
    nonfinite = [r for r in results if "nonfinite_frames" in r]
    for r in nonfinite:
        reason = f"{len(r['nonfinite_frames'])} key frames with non-finite latents (frames {r['nonfinite_frames'][:10]})"
        log.warning("skipping %s scene %s: %s", r["role"], r["scene"], reason)
        plan["skipped"].append({"scene": r["scene"], "role": r["role"], "reason": reason})
    results = [r for r in results if "nonfinite_frames" not in r]
    if not any(r["role"] == "eval" for r in results):
        raise UserError(f"{shards}: every evaluated scene has non-finite latents ({len(nonfinite)} scenes)")
    eval_results = [r for r in results if r["role"] == "eval"]
    train_results = [r for r in results if r["role"] == "train"]
    cf_results = [r for r in results if r["role"] == "branch_point"]
    log.info("scoring: retrieval, baselines, %d probes, %d scenarios, %d branch points", 8 if train_results else 0,
             len(scenarios), len(cf_results))
    arch = resolve_model_config(train_cfg.model)
    metrics, fitted = score(eval_results, train_results, cfg, horizon, context, scenario_scenes,
                            (arch.bev_size, arch.bev_range), settings["space"])
    metrics["counterfactual"] = score_branch_points(cf_results, metrics["settings"]["seconds"])
    if action_blind_checkpoint is not None:
        metrics["action_blind_checkpoint"] = _action_blind_baseline(
            Path(action_blind_checkpoint).resolve(), [j for j in jobs if j.role == "eval"] + cf_jobs, settings,
            cfg, horizon, context, metrics["settings"]["seconds"], num_workers, address, progress)
    metrics["settings"]["headline_seconds"] = list(cfg.headline_seconds)
    metrics["settings"]["nonfinite_windows"] = sum(r["windows"] for r in nonfinite if r["role"] == "eval")
    metrics["headline"] = headline_rows(metrics, cfg.headline_seconds)
    metrics["provenance"] = {
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "step": step,
        "config": config_to_dict(train_cfg), "config_hash": config_hash(train_cfg),
        "shards": str(Path(shards).resolve()), "shards_config_hash": manifest.get("config_hash"),
        "dataset_version": manifest.get("version"), "split": split, "train_split": cfg.train_split,
        "eval_scenes": [r["scene"] for r in eval_results], "train_scenes": [r["scene"] for r in train_results],
        "skipped_scenes": plan.pop("skipped"), "suite": str(suite),
        "eval_config": config_to_dict(cfg), "context": context, "metric_space": settings["space"],
        "shuffled_actions": plan, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "drivejepa_version": __version__,
    }
    metrics = {"provenance": metrics.pop("provenance"), **metrics}
    if plan_config is not None:
        from drivejepa.config import PlanConfig
        from drivejepa.planning.evaluation import planning_section

        # Every scene of the split: the factual ones and the counterfactual branches, whose windows at their
        # branch frames are the planning section's branch windows.
        plan_scenes = [s for s in listed if s in manifest["scenes"]]
        metrics["planning"] = planning_section(checkpoint, shards, plan_scenes, load_config(PlanConfig, plan_config),
                                               out, progress=progress, variants=plan_variants)
    write_outputs(out, metrics, fitted)
    if plan_config is not None:
        from drivejepa.planning.evaluation import append_report

        append_report(out, metrics["planning"])
    return metrics


def _action_blind_baseline(checkpoint: Path, jobs: list, settings: dict, cfg: EvalConfig, horizon: int, context: int,
                           seconds: list[float], num_workers, address, progress: bool) -> dict:
    """The same windows and branch points rolled out by a model trained with every action masked, compared in its
    own latent space (a separately trained model's latents are not the evaluated model's): its error against its
    own copy-last, and its counterfactual top-1."""
    from drivejepa.evaluation.scoring import Windows
    from drivejepa.training.checkpoint import config_of, load_checkpoint

    ckpt = load_checkpoint(checkpoint, mmap=True)
    blind_cfg = config_of(ckpt, f"{checkpoint} (config)")
    step = ckpt.get("step")
    del ckpt
    if blind_cfg.model.action_dropout < 1.0:
        raise UserError(f"{checkpoint}: trained with model.action_dropout = {blind_cfg.model.action_dropout}, not "
                        "with every action masked (train the same config with model.action_dropout=1.0)")
    if blind_cfg.data.context != context:
        raise UserError(f"{checkpoint}: data.context = {blind_cfg.data.context}, the evaluated checkpoint's is "
                        f"{context}; the baseline must see the same context")
    space = latent_space.space_of(blind_cfg.loss)
    log.info("action-blind baseline %s: %d scene and branch-point jobs", checkpoint, len(jobs))
    results = run_jobs(str(checkpoint), jobs, {**settings, "space": space}, num_workers=num_workers,
                       address=address, progress=progress)
    for job, r in zip(jobs, results):
        if job.role == "eval":
            r["departing"] = job.departing
    results = [r for r in results if "nonfinite_frames" not in r]
    eval_results = [r for r in results if r["role"] == "eval"]
    if not eval_results:
        raise UserError(f"{checkpoint}: every evaluated scene has non-finite latents under the action-blind model")
    windows = Windows(eval_results, horizon, context, [1])
    mse = {m: windows.mse[m].mean(axis=0) for m in ("model", "copy_last")}
    cf = score_branch_points([r for r in results if r["role"] == "branch_point"], seconds)
    return {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "step": step,
            "metric_space": space, "windows": len(windows),
            "latent_mse": {m: v.tolist() for m, v in mse.items()},
            "ratio_to_copy_last": (mse["model"] / mse["copy_last"]).tolist(),
            "counterfactual": cf["overall"] if cf["futures"] else None}
