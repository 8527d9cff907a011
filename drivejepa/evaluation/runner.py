"""``drivejepa evaluate``: plan the windows (evaluation/plan.py), run the scenes (evaluation/workers.py), score
(evaluation/scoring.py), and write the metrics with their provenance (evaluation/report.py).

Scoring (retrieval against the gallery of every evaluated frame, probes, scenario breakdown) happens once on the
driver; every prediction, target and baseline is compared in the checkpoint's latent space
(drivejepa/latent_space.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa import latent_space
from drivejepa.config import EvalConfig
from drivejepa.errors import UserError
from drivejepa.evaluation.plan import plan_jobs
from drivejepa.evaluation.workers import run_jobs
from drivejepa.io import file_sha256

log = logging.getLogger(__name__)


def default_suite() -> Path:
    """``eval/scenarios/default.yaml`` of this checkout."""
    return Path(__file__).resolve().parents[2] / "eval" / "scenarios" / "default.yaml"


def evaluate(checkpoint: str | Path, shards: str | Path, out: str | Path, *, split: str = "val",
             suite: Optional[str | Path] = None, overrides=(), address: Optional[str] = None,
             num_workers: Optional[int] = None, progress: bool = True) -> dict:
    """Evaluate a checkpoint on the scenes of ``split``; writes OUT/metrics.json, report.md, plots, probes.pt and
    returns the metrics. ``num_workers=0`` runs in this process, otherwise in Ray actors (see :func:`run_jobs`)."""
    import datetime

    from drivejepa import __version__
    from drivejepa.config import config_hash, config_to_dict, load_config, resolve_model_config
    from drivejepa.data.shards import load_manifest, scenes_in_split
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
    eval_scenes = scenes_in_split(shards, split)
    if not eval_scenes:
        raise UserError(f"{shards}: split '{split}' has no scene in this shard directory")
    try:
        train_scenes = [s for s in scenes_in_split(shards, cfg.train_split) if s not in set(eval_scenes)]
    except UserError as exc:
        log.warning("no probes: %s", exc)
        train_scenes = []
    if cfg.max_train_scenes and len(train_scenes) > cfg.max_train_scenes:
        pick = np.linspace(0, len(train_scenes) - 1, cfg.max_train_scenes).round().astype(int)
        train_scenes = [train_scenes[i] for i in pick]
    if not train_scenes:
        log.warning("split '%s' has no scene in %s: probes and occupancy forecasts are left out", cfg.train_split,
                    shards)
    jobs, plan = plan_jobs(shards, eval_scenes, train_scenes, context, horizon, cfg.shuffle_seed)
    scenario_scenes = assign_scenes(scenarios, plan.pop("descriptions"))
    log.info("evaluating %d windows (%d context + %d future key frames) in %d scenes of split '%s'; probes on %d "
             "scenes of split '%s'", plan["windows"], context, horizon, len(eval_scenes), split, len(train_scenes),
             cfg.train_split)
    settings = {"device": cfg.device, "batch_size": cfg.batch_size, "horizon": horizon, "context": context,
                "grid_size": cfg.grid_size, "grid_range": cfg.grid_range, "count_radius": cfg.count_radius,
                "agent_classes": list(cfg.agent_classes), "space": latent_space.space_of(train_cfg.loss)}
    results = run_jobs(str(checkpoint), jobs, settings, num_workers=num_workers, address=address, progress=progress)
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
    log.info("scoring: retrieval, baselines, %d probes, %d scenarios", 8 if train_results else 0, len(scenarios))
    arch = resolve_model_config(train_cfg.model)
    metrics, fitted = score(eval_results, train_results, cfg, horizon, context, scenario_scenes,
                            (arch.bev_size, arch.bev_range), settings["space"])
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
    write_outputs(out, metrics, fitted)
    return metrics
