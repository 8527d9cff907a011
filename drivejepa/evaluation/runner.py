"""Running the evaluation: plan the windows, encode and roll out scenes (in Ray actors or in this process), score.

The driver reads only small arrays (actions, validity, frame indices) to plan every window and the shuffled-action
baseline's partners (drivejepa/baselines.py: a seeded derangement of every evaluated window, whatever the grouping). Each
worker (a Ray actor, or this process with ``num_workers=0``) loads the checkpoint once and turns whole scenes into
latents, rollouts and labels; scoring (retrieval against the gallery of every evaluated frame, probes, scenario
breakdown) happens once on the driver. Results are put back in scene-name order, so the grouping of scenes over
workers cannot change a number.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa import latent_space
from drivejepa.config import EvalConfig
from drivejepa.errors import UserError
from drivejepa.io import file_sha256
from drivejepa.baselines import shuffled_sources
from drivejepa.evaluation.latents import window_starts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SceneJob:
    scene: str
    path: str
    role: str                                   # "eval": latents, rollouts and labels; "train": latents and labels
    starts: Optional[np.ndarray] = None         # window starts (eval scenes)
    shuffled_actions: Optional[np.ndarray] = None  # [W, Tc-1+H, 5] past and future actions of other windows


def plan_jobs(shard_dir: str | Path, eval_scenes: list[str], train_scenes: list[str], context: int, horizon: int,
              shuffle_seed: int) -> tuple[list[SceneJob], dict]:
    """Jobs for every readable scene, with the windows of the eval scenes and the shuffled-action assignment.

    A shard that cannot be read is skipped and listed in ``plan["skipped"]`` with the reason."""
    from drivejepa.data.shards import read_shard, read_shard_meta, shard_path

    jobs, window_ids, window_actions, skipped, descriptions = [], [], [], [], {}
    for scene in eval_scenes:
        path = shard_path(shard_dir, scene)
        try:
            shard = read_shard(path)
        except UserError as exc:
            log.warning("skipping scene %s: %s", scene, exc)
            skipped.append({"scene": scene, "role": "eval", "reason": str(exc)})
            continue
        meta_idx = shard.meta.get("frame_indices")
        starts = window_starts(shard.frames, context, horizon, np.asarray(shard.arrays["action_valid"]),
                               None if meta_idx is None else np.asarray(meta_idx))
        actions = np.asarray(shard.arrays["actions"], dtype=np.float32)
        for s in starts:
            window_ids.append((scene, int(s)))
            window_actions.append(actions[s - context + 1:s + horizon])
        descriptions[scene] = shard.meta.get("description", "")
        jobs.append(SceneJob(scene, str(path), "eval", starts))
    if not window_ids:
        raise UserError(f"{shard_dir}: no evaluation window of {context} context + {horizon} future consecutive key "
                        f"frames in scenes {eval_scenes[:5]}{'...' if len(eval_scenes) > 5 else ''}")
    perm = shuffled_sources(len(window_ids), shuffle_seed)
    shuffled = np.stack(window_actions)[perm]
    pos = 0
    for job in jobs:
        n = len(job.starts)
        job.shuffled_actions = shuffled[pos:pos + n]
        pos += n
    for scene in train_scenes:
        path = shard_path(shard_dir, scene)
        try:
            read_shard_meta(path)
        except (UserError, OSError) as exc:
            log.warning("skipping train scene %s: %s", scene, exc)
            skipped.append({"scene": scene, "role": "train", "reason": str(exc)})
            continue
        jobs.append(SceneJob(scene, str(path), "train"))
    plan = {"windows": len(window_ids), "permutation_seed": shuffle_seed,
            "shuffled_source": [list(window_ids[j]) for j in perm], "descriptions": descriptions, "skipped": skipped}
    return jobs, plan


class SceneWorker:
    """Loads the checkpoint once; turns scene jobs into latents, rollouts and labels (plain numpy)."""

    def __init__(self, checkpoint: str, settings: dict, threads: int = 0):
        import torch

        from drivejepa.data.shards import CLASSES
        from drivejepa.runtime import select_device
        from drivejepa.training.checkpoint import load_world_model

        if threads:
            torch.set_num_threads(threads)
        self.settings = settings
        self.device = select_device(settings["device"])
        self.model, self.cfg = load_world_model(checkpoint, self.device)
        unknown = [c for c in settings["agent_classes"] if c not in CLASSES]
        if unknown:
            raise UserError(f"agent_classes {unknown} are not shard classes {CLASSES}")
        self.agent_ids = np.array([CLASSES.index(c) for c in settings["agent_classes"]])

    def run(self, job: SceneJob) -> dict:
        from drivejepa.data.shards import camera_positions, read_shard
        from drivejepa.evaluation.latents import encode_frames, rollout_windows
        from drivejepa.evaluation.probes import box_baseline_grids, frame_labels

        s = self.settings
        shard = read_shard(job.path)
        arrays = shard.arrays
        camera_index = camera_positions(shard.meta.get("cameras", []), self.model.cameras, job.path)
        online, raw = encode_frames(self.model, arrays, shard.frames, s["batch_size"], self.device, camera_index)
        target = latent_space.targets(raw, self.model.space)
        labels = frame_labels(arrays, self.agent_ids, s["grid_size"], s["grid_range"], s["count_radius"])
        out = {"scene": job.scene, "role": job.role, "description": shard.meta.get("description", ""),
               "target": target, "online": online, "labels": labels}
        if job.role != "eval":
            return out
        horizon, context = s["horizon"], s["context"]
        starts = job.starts
        actions = np.asarray(arrays["actions"], dtype=np.float32)
        true_future = np.stack([actions[t:t + horizon] for t in starts]) if len(starts) else \
            np.zeros((0, horizon, actions.shape[1]), np.float32)
        past = np.stack([actions[t - context + 1:t] for t in starts]) if len(starts) else \
            np.zeros((0, context - 1, actions.shape[1]), np.float32)
        model_pred = rollout_windows(self.model, raw, starts, context, true_future, past, s["batch_size"],
                                     self.device)
        other = job.shuffled_actions
        shuffled_pred = rollout_windows(self.model, raw, starts, context, other[:, context - 1:],
                                        other[:, :context - 1], s["batch_size"], self.device)
        out.update(
            starts=starts,
            model=latent_space.predictions(model_pred, self.model.space),
            shuffled_actions=latent_space.predictions(shuffled_pred, self.model.space),
            cv_box_grids=box_baseline_grids(arrays, starts, horizon, np.asarray(arrays["timestamps"]),
                                            self.agent_ids, s["grid_size"], s["grid_range"]),
        )
        return out


def _groups(items: list[int], k: int) -> list[list[int]]:
    """Round-robin over the jobs (eval scenes first, then train scenes): each worker gets a share of both."""
    groups: list[list[int]] = [[] for _ in range(k)]
    for i, item in enumerate(items):
        groups[i % k].append(item)
    return [g for g in groups if g]


def run_jobs(checkpoint: str, jobs: list[SceneJob], settings: dict, *, num_workers: Optional[int] = None,
             address: Optional[str] = None, progress: bool = True) -> list[dict]:
    """Results of every job, in job order. ``num_workers=0``: this process; otherwise Ray actors (one per group of
    scenes, each loading the checkpoint once); None = one actor per CPU of the cluster."""
    from tqdm import tqdm

    if num_workers == 0:
        worker = SceneWorker(checkpoint, settings)
        return [worker.run(job) for job in tqdm(jobs, desc="evaluate scenes", unit="scene", disable=not progress)]

    import ray

    from drivejepa.runtime import init_ray

    init_ray(address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    k = max(1, min(num_workers or cpus, len(jobs)))
    cuda = settings["device"].startswith("cuda") or (settings["device"] == "auto"
                                                      and ray.cluster_resources().get("GPU", 0) > 0)
    options = {"num_cpus": max(cpus // k, 1) if cpus >= k else cpus / k}
    if cuda:
        options["num_gpus"] = min(1.0, ray.cluster_resources().get("GPU", 0) / k)
    threads = max(1, int(options["num_cpus"]))
    Actor = ray.remote(SceneWorker)
    groups = _groups(list(range(len(jobs))), k)
    actors = [Actor.options(**options).remote(checkpoint, settings, threads) for _ in groups]
    refs = {}
    for actor, group in zip(actors, groups):
        for i in group:
            refs[actor.run.remote(jobs[i])] = i
    results: list[Optional[dict]] = [None] * len(jobs)
    pending = list(refs)
    try:
        with tqdm(total=len(jobs), desc="evaluate scenes", unit="scene", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        results[refs[ref]] = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        if isinstance(exc.cause, UserError):
                            raise exc.cause from None
                        raise
                    bar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results


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
    from drivejepa.config import config_hash, config_to_dict, load_config
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
    eval_results = [r for r in results if r["role"] == "eval"]
    train_results = [r for r in results if r["role"] == "train"]
    log.info("scoring: retrieval, baselines, %d probes, %d scenarios", 8 if train_results else 0, len(scenarios))
    metrics, fitted = score(eval_results, train_results, cfg, horizon, context, scenario_scenes)
    metrics["settings"]["headline_seconds"] = list(cfg.headline_seconds)
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
