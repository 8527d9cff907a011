"""Counterfactual futures: does a rollout follow the action it is given?

A branch point of the synthetic world (drivejepa/data/synth/branches.py) is a parent scene and its counterfactual
branch scenes: they share the key frames 0..b and then each drives its own ego behaviour (the parent's own future is
the one that keeps its intent). For every branch point of the evaluated split the predictor is rolled out from the
shared context, the target encoder's latents of the parent's frames b-Tc+1..b with the past actions
a_{b-Tc+1}..a_{b-1}, once per future k with that future's actions a_b..a_{b+H-1}. At horizon h, future k scores 1
when its own true latent (the target encoder's latent of its frame b+h) is the nearest (``latent_space.distance``)
of the K futures' true latents to rollout k: the counterfactual top-1.

Beside it:

- chance, 1/K for a point of K futures;
- copy-last (the latent of frame b at every step) and the action-blind rollout (the same predictor given its learned
  'unknown action' token for every action, ``WorldModel.rollout(..., future_known=False)``). Each makes one
  prediction for all K futures, so exactly one future is its nearest and both score 1/K by construction. A tie for
  the nearest among n futures counts 1/n (the expected score of a random tie-break), never a win;
- warp-last (drivejepa/baselines.py): frame b carried along future k's ego motion, the predictor's geometric path
  alone. It does follow the action, so it is the baseline a learned rollout must beat at telling futures apart;
- the latent error of each on the branch futures, where the action-blind rollout is not at chance by construction;
- how the rollouts of a point differ (``differences``): over every pair of futures i, j of every point, the energy
  of the rollouts' differences against the futures' (``sum ||p_i - p_j||^2 / sum ||f_i - f_j||^2``) and their
  cosine (``sum <p_i - p_j, f_i - f_j> / sqrt(...)``), per horizon. Top-1 on a few dozen futures moves in steps of
  a few hundredths; these two are sums over every pair, and they say whether rollouts that fail to pick their
  future differ too little (energy near 0: the action barely moves them) or in the wrong directions (cosine near
  0). A prediction given the true futures scores 1 and 1; one prediction for all futures (copy-last, the
  action-blind rollout) has energy 0 and no cosine, left out;
- how sure top-1 is (``interval95``): a split holds a few branch points (the demo's test split 7), so top-1 moves
  in steps of a few hundredths and by chance; 95% intervals from resampling the points, for the model, warp-last
  and the model's lead over warp-last.

Only the synthetic world has branch points; on real nuScenes the section says there are none.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from drivejepa import latent_space
from drivejepa.errors import UserError

log = logging.getLogger(__name__)

KEEP = "keep intent"            # the behaviour of the parent scene's own future
METHODS = ("model", "warp_last", "action_blind", "copy_last")
DIFFERING = ("model", "warp_last")     # the methods whose predictions differ between the futures of a point
BOOTSTRAP_DRAWS = 2000                 # resamplings of the branch points behind top-1's interval (point_bootstrap)


@dataclasses.dataclass
class BranchPoint:
    parent: str
    frame: int                  # b: the last key frame the futures share
    scenes: list[str]           # one scene per future, the parent first
    behaviours: list[str]

    @property
    def name(self) -> str:
        return f"{self.parent}:{self.frame}"


@dataclasses.dataclass
class BranchPointJob:
    point: BranchPoint
    paths: list[str]            # shard of each future
    positions: list[np.ndarray]  # per future: shard positions of key frames b-Tc+1 .. b+H
    context: int
    horizon: int
    role: str = "branch_point"

    @property
    def scene(self) -> str:
        return self.point.name


def branch_points(descriptions: Mapping[str, str]) -> list[BranchPoint]:
    """The branch points among ``descriptions`` (scene -> description): every parent scene listed there with at least
    one of its branch scenes listed too, one point per branch frame, futures in name order after the parent."""
    from drivejepa.data.synth.scenarios import branch_of

    groups: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for scene in sorted(descriptions):
        info = branch_of(descriptions[scene])
        if info is not None and info["parent"] in descriptions:
            groups.setdefault((info["parent"], info["frame"]), []).append((scene, info["behaviour"]))
    return [BranchPoint(parent, frame, [parent] + [s for s, _ in futures], [KEEP] + [b for _, b in futures])
            for (parent, frame), futures in sorted(groups.items())]


def plan_branch_points(shard_dir: str | Path, points: list[BranchPoint], context: int, horizon: int,
                       manifest: Optional[dict] = None) -> tuple[list[BranchPointJob], list[dict]]:
    """(jobs, skipped): a job for each branch point whose parent holds the context frames b-Tc+1..b and at least two
    of whose futures hold the key frames b+1..b+H with valid actions a_b..a_{b+H-1}; a future or point that cannot
    be used is listed in ``skipped`` with the reason."""
    from drivejepa.data.shards import check_scene, load_manifest, shard_path

    manifest = load_manifest(shard_dir) if manifest is None else manifest
    jobs, skipped = [], []
    for p in points:
        kept: list[tuple[str, str, str, np.ndarray]] = []
        for scene, behaviour in zip(p.scenes, p.behaviours):
            try:
                shard = check_scene(shard_dir, scene, manifest)
            except (UserError, OSError) as exc:
                skipped.append({"scene": scene, "role": "branch_point", "reason": str(exc)})
                continue
            n = shard.frames
            original = np.asarray(shard.meta.get("frame_indices", np.arange(n)), dtype=np.int64)
            where = {int(f): i for i, f in enumerate(original)}
            wanted = range(p.frame - context + 1, p.frame + horizon + 1)
            if any(f not in where for f in wanted):
                reason = (f"lacks some of the key frames {wanted.start}..{wanted.stop - 1} that {context} context and "
                          f"{horizon} future frames from branch frame {p.frame} need")
            else:
                positions = np.array([where[f] for f in wanted])
                valid = np.asarray(shard.arrays["action_valid"], dtype=bool)[positions[context - 1:-1]]
                reason = None if valid.all() else f"actions after branch frame {p.frame} are not all valid"
            if reason is not None:
                skipped.append({"scene": scene, "role": "branch_point", "reason": reason})
                if scene == p.parent:
                    break
                continue
            kept.append((scene, behaviour, str(shard_path(shard_dir, scene)), positions))
        if not kept or kept[0][0] != p.parent or len(kept) < 2:
            skipped.append({"scene": p.name, "role": "branch_point",
                            "reason": "fewer than two usable futures (or no usable parent): branch point left out"})
            continue
        point = BranchPoint(p.parent, p.frame, [k[0] for k in kept], [k[1] for k in kept])
        jobs.append(BranchPointJob(point, [k[2] for k in kept], [k[3] for k in kept], context, horizon))
    return jobs, skipped


def encode_branch_point(model, job: BranchPointJob, batch_size: int, device) -> dict:
    """Latents of one branch point (plain numpy, in the model's space): ``truth`` [K, H, ...] (the target encoder's
    latents of each future's frames b+1..b+H), ``model`` [K, H, ...] (rollout k with future k's actions),
    ``warp_last`` [K, H, ...] (frame b warped along future k's motion), ``action_blind`` [H, ...] (every action
    unknown) and ``copy_last`` [...] (frame b)."""
    import torch

    from drivejepa.baselines import warp_last
    from drivejepa.data.shards import camera_positions, read_shard
    from drivejepa.evaluation.latents import encode_frames

    tc, h = job.context, job.horizon
    truths, futures = [], []
    for k, (path, pos) in enumerate(zip(job.paths, job.positions)):
        shard = read_shard(path)
        cams = camera_positions(shard.meta.get("cameras", []), model.cameras, path)
        index = pos if k == 0 else pos[tc:]          # the context is the parent's frames
        _, target = encode_frames(model, shard.arrays, 0, batch_size, device, cams, with_online=False, index=index)
        actions = np.asarray(shard.arrays["actions"], dtype=np.float32)
        if k == 0:
            context, target = target[:tc], target[tc:]
            past = actions[pos[:tc - 1]]
        truths.append(target)
        futures.append(actions[pos[tc - 1:tc - 1 + h]])
    truth = np.stack(truths)
    out = {"scene": job.scene, "role": job.role, "point": dataclasses.asdict(job.point), "windows": 0}
    if not (np.isfinite(truth).all() and np.isfinite(context).all()):
        return {**out, "nonfinite_frames": [int(f) for f in job.positions[0][tc:]]}
    k = len(job.paths)
    with torch.no_grad():
        ctx = torch.from_numpy(context).unsqueeze(0).to(device)
        acts = torch.from_numpy(np.stack(futures)).to(device)
        rolled = model.rollout(ctx.expand(k, *ctx.shape[1:]), acts,
                               torch.from_numpy(past).unsqueeze(0).expand(k, *past.shape).to(device))
        blind = model.rollout(ctx, acts[:1], None, future_known=False)
    space = model.space
    last = latent_space.targets(context[-1], space)
    warped = warp_last(torch.from_numpy(last).double().expand(k, 1, *last.shape), acts.cpu().double(), model.grid)
    return {**out, "truth": latent_space.targets(truth, space),
            "model": latent_space.predictions(rolled.float().cpu().numpy(), space),
            "warp_last": warped.float().numpy(),
            "action_blind": latent_space.predictions(blind[0].float().cpu().numpy(), space),
            "copy_last": last}


def nearest_share(d: np.ndarray) -> np.ndarray:
    """Distances ``d`` [K, K, H] of prediction k to true future j at step h -> the score [K, H] of each prediction:
    1 when its own future is the strictly nearest, 1/n when it ties with n - 1 others for the nearest, else 0."""
    k = d.shape[0]
    own = d[np.arange(k), np.arange(k)]                                   # [K, H]
    tol = 1e-9 * (np.abs(own) + np.abs(d).mean(axis=1))                   # rounding noise is not a difference
    best = own <= d.min(axis=1) + tol
    tied = (d <= (own + tol)[:, None, :]).sum(axis=1)
    return np.where(best, 1.0 / np.maximum(tied, 1), 0.0)


def point_scores(result: dict) -> dict:
    """Per method: counterfactual top-1 [K, H], latent error on the own future [K, H], the nearest true future
    [K, H] (an index into the point's futures) and every distance [K (prediction), K (true future), H]."""
    import torch

    def tensor(x):                      # a float64 copy: arrays handed over by Ray are read-only
        return torch.from_numpy(np.array(x, dtype=np.float64))

    truth = tensor(result["truth"])
    k, h = truth.shape[:2]
    preds = {"model": tensor(result["model"]), "warp_last": tensor(result["warp_last"]),
             "action_blind": tensor(result["action_blind"]).unsqueeze(0).expand(k, *truth.shape[1:]),
             "copy_last": tensor(result["copy_last"]).unsqueeze(0).unsqueeze(0).expand(k, h, *truth.shape[2:])}
    out = {}
    for m, p in preds.items():
        d = latent_space.distance(p.unsqueeze(1), truth.unsqueeze(0)).numpy()    # [K (pred), K (truth), H]
        out[m] = {"top1": nearest_share(d), "latent_mse": d[np.arange(k), np.arange(k)], "nearest": d.argmin(axis=1),
                  "distance": d}
    return out


def rollout_differences(results: list[dict]) -> dict:
    """``{method: {"energy": [H], "cosine": [H]}}`` over every pair of futures of every branch point (module
    docstring); None where the futures' differences have no energy."""
    if not results:
        return {}
    ff = 0.0                                       # [H] the futures' difference energy, shared by every method
    sums = {m: 0.0 for m in DIFFERING}             # [2, H] the rollouts' energy and their product with the futures'
    for r in results:
        truth = np.asarray(r["truth"], dtype=np.float64)
        i, j = np.triu_indices(len(truth), k=1)
        df = (truth[i] - truth[j]).reshape(len(i), truth.shape[1], -1)                      # [pairs, H, D]
        ff = ff + (df * df).sum(axis=(0, 2))
        for m in DIFFERING:
            pred = np.asarray(r[m], dtype=np.float64)
            dp = (pred[i] - pred[j]).reshape(df.shape)
            sums[m] = sums[m] + np.stack([(dp * dp).sum(axis=(0, 2)), (dp * df).sum(axis=(0, 2))])
    ok = ff > 0
    out = {}
    for m, (pp, pf) in sums.items():
        out[m] = {"energy": [float(a / b) if k else None for a, b, k in zip(pp, ff, ok)],
                  "cosine": [float(c / np.sqrt(a * b)) if k and a > 0 else None
                             for a, b, c, k in zip(pp, ff, pf, ok)]}
    return out


def point_bootstrap(points: list[dict], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """95% percentile intervals of the overall top-1 per horizon, from ``draws`` resamplings of the branch points
    with replacement (``points``: ``score_branch_points``'s per-point scores). The point is the unit: its futures
    share one context and one scene, so they are not independent draws, and an interval over futures would be too
    narrow. Per method, and for the model minus warp-last on the same resampled points (paired): an interval of
    that difference that holds 0 says the model is not told apart from the warp alone."""
    if not points:
        return {}
    rng = np.random.default_rng(seed)
    sums = {m: np.stack([np.asarray(p["top1"][m], dtype=np.float64).sum(axis=0) for p in points])
            for m in DIFFERING}                                                              # [P, H]
    counts = np.array([len(p["scenes"]) for p in points], dtype=np.float64)
    idx = rng.integers(0, len(points), size=(draws, len(points)))
    n = counts[idx].sum(axis=1)[:, None]                                                      # [draws, 1]
    means = {m: v[idx].sum(axis=1) / n for m, v in sums.items()}                               # [draws, H]
    means["model_minus_warp_last"] = means["model"] - means["warp_last"]

    def interval(x):
        return {"low": np.percentile(x, 2.5, axis=0).tolist(), "high": np.percentile(x, 97.5, axis=0).tolist()}

    return {"draws": draws, "unit": "branch point", **{m: interval(v) for m, v in means.items()}}


def score_branch_points(results: list[dict], seconds: list[float]) -> dict:
    """The ``counterfactual`` section of metrics.json: top-1 and latent error per horizon over every future of every
    branch point, and per behaviour, beside chance; the per-point scores under ``points``."""
    rows = []                   # (behaviour, K, {method: {"top1": [H], "latent_mse": [H]}})
    points = []
    for r in results:
        scores = point_scores(r)
        p = r["point"]
        k = len(p["scenes"])
        for j, behaviour in enumerate(p["behaviours"]):
            rows.append((behaviour, k, {m: {key: s[key][j] for key in ("top1", "latent_mse")}
                                        for m, s in scores.items()}))
        points.append({"parent": p["parent"], "frame": p["frame"], "scenes": p["scenes"],
                       "behaviours": p["behaviours"],
                       "top1": {m: s["top1"].tolist() for m, s in scores.items()}})

    def block(selected: list) -> dict:
        if not selected:
            return {"futures": 0}
        return {"futures": len(selected), "chance": float(np.mean([1.0 / k for _, k, _ in selected])),
                **{key: {m: np.mean([s[m][key] for _, _, s in selected], axis=0).tolist() for m in METHODS}
                   for key in ("top1", "latent_mse")}}

    behaviours = sorted({b for b, _, _ in rows}, key=lambda b: (b != KEEP, b))
    sizes = [len(p["scenes"]) for p in points]
    return {"branch_points": len(points), "futures": len(rows), "seconds": list(seconds), "methods": list(METHODS),
            "futures_per_point": {str(k): sizes.count(k) for k in sorted(set(sizes))},
            "ties": "a tie for the nearest true future among n futures counts 1/n",
            "overall": block(rows), "behaviours": {b: block([r for r in rows if r[0] == b]) for b in behaviours},
            "differences": rollout_differences(results),
            "interval95": point_bootstrap(points),
            "points": points}
