"""Turning scene jobs into latents, rollouts and labels: in this process or in Ray actors.

Each worker (a Ray actor, or this process with ``num_workers=0``) loads the checkpoint once and turns whole scenes
into latents in the model's latent space (drivejepa/latent_space.py), rollouts with the true and the shuffled
actions, and labels. Results come back in job order, so the grouping of scenes over workers cannot change a number.
A worker that dies (its node lost, its process killed) hands its unfinished scenes to the workers still alive.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from drivejepa import latent_space
from drivejepa.errors import UserError
from drivejepa.evaluation.plan import SceneJob

log = logging.getLogger(__name__)


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
        import torch

        from drivejepa.baselines import warp_last
        from drivejepa.evaluation.counterfactual import BranchPointJob, encode_branch_point

        if isinstance(job, BranchPointJob):     # counterfactual futures: evaluation/counterfactual.py
            return encode_branch_point(self.model, job, self.settings["batch_size"], self.device)
        from drivejepa.data.shards import camera_positions, read_shard
        from drivejepa.evaluation.latents import encode_frames, rollout_windows, window_actions
        from drivejepa.evaluation.probes import box_baseline_grids, frame_labels

        s = self.settings
        shard = read_shard(job.path)
        arrays = shard.arrays
        camera_index = camera_positions(shard.meta.get("cameras", []), self.model.cameras, job.path)
        online, raw = encode_frames(self.model, arrays, shard.frames, s["batch_size"], self.device, camera_index)
        bad = np.flatnonzero(~(np.isfinite(online.reshape(len(online), -1)).all(axis=1)
                               & np.isfinite(raw.reshape(len(raw), -1)).all(axis=1)))
        if len(bad):  # a NaN in the shard: skipped and reported, never a crash in scoring after all the compute
            return {"scene": job.scene, "role": job.role, "nonfinite_frames": bad.tolist(),
                    "windows": 0 if job.starts is None else len(job.starts)}
        target = latent_space.targets(raw, self.model.space)
        labels = frame_labels(arrays, self.agent_ids, s["grid_size"], s["grid_range"], s["count_radius"])
        out = {"scene": job.scene, "role": job.role, "description": shard.meta.get("description", ""),
               "target": target, "online": online, "labels": labels}
        if job.role != "eval":
            return out
        horizon, context = s["horizon"], s["context"]
        starts = job.starts
        true_future, past = window_actions(arrays["actions"], starts, context, horizon)
        model_pred = rollout_windows(self.model, raw, starts, context, true_future, past, s["batch_size"],
                                     self.device)
        other = job.shuffled_actions
        shuffled_pred = rollout_windows(self.model, raw, starts, context, other[:, context - 1:],
                                        other[:, :context - 1], s["batch_size"], self.device)
        warped = warp_last(torch.from_numpy(np.ascontiguousarray(target[starts][:, None])),
                           torch.from_numpy(true_future), self.model.grid).numpy() if len(starts) else \
            np.zeros_like(model_pred)
        out.update(
            starts=starts,
            model=latent_space.predictions(model_pred, self.model.space),
            shuffled_actions=latent_space.predictions(shuffled_pred, self.model.space),
            warp_last=latent_space.predictions(warped, self.model.space),
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
    refs = {}       # ref -> (job index, actor index)
    for a, group in enumerate(groups):
        for i in group:
            refs[actors[a].run.remote(jobs[i])] = (i, a)
    results: list[Optional[dict]] = [None] * len(jobs)
    dead: set[int] = set()
    pending = list(refs)
    try:
        with tqdm(total=len(jobs), desc="evaluate scenes", unit="scene", disable=not progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i, a = refs.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        if isinstance(exc.cause, UserError):
                            raise exc.cause from None
                        raise
                    except ray.exceptions.RayActorError as exc:
                        # Its process or its node is gone (a lost cluster node, an OOM kill): the scene goes to a
                        # worker that is still alive, so a lost node costs time, not the evaluation.
                        dead.add(a)
                        alive = [b for b in range(len(actors)) if b not in dead]
                        if not alive:
                            raise UserError(f"every evaluation worker died (last: {exc.__class__.__name__}); "
                                            "nothing was written") from None
                        b = alive[i % len(alive)]
                        log.warning("evaluation worker %d died (%s); scene %s moves to worker %d", a,
                                    exc.__class__.__name__, jobs[i].scene, b)
                        retry = actors[b].run.remote(jobs[i])
                        refs[retry] = (i, b)
                        pending.append(retry)
                        continue
                    bar.update(1)
    finally:
        for actor in actors:
            ray.kill(actor)
    return results
