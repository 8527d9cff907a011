"""``drivejepa visualize --branch-point PARENT:FRAME``: one branch point of the synthetic world, the K predicted
futures beside the K true ones.

The rollouts are the evaluation's counterfactual ones (drivejepa/evaluation/counterfactual.py): from the shared
context (the parent's key frames b-Tc+1..b) the checkpoint is rolled out once per future with that future's recorded
actions a_b..a_{b+H-1}. At a horizon step h, row k shows on the left the decoded prediction of future k (orange,
placed at the ego pose its actions imply, with the decoded boxes) and on the right future k's true lidar and boxes at
key frame b+h (grey), both in the ego frame of b, which the futures share; each panel draws that future's true path
(green) and the path its actions imply (red). ``branch_point.json`` holds the numbers behind the picture: per step,
which true future each rollout is nearest to, the distances, and the counterfactual top-1.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa.errors import UserError
from drivejepa.io import atomic_write_json

log = logging.getLogger(__name__)


def parse_branch_point(text: str) -> tuple[str, int]:
    """``"scene-0005:12"`` -> ("scene-0005", 12); a one-line UserError otherwise."""
    scene, sep, frame = str(text).rpartition(":")
    if not sep or not scene or not frame.isdigit():
        raise UserError(f"--branch-point: expected PARENT_SCENE:BRANCH_FRAME (for example scene-0005:12), got {text!r}")
    return scene, int(frame)


def find_branch_point(shard_dir: str | Path, text: str):
    """The :class:`BranchPoint` named ``text`` among the shards, or a UserError listing the ones there are."""
    from drivejepa.data.shards import load_manifest
    from drivejepa.evaluation.counterfactual import branch_points

    parent, frame = parse_branch_point(text)
    scenes = load_manifest(shard_dir)["scenes"]
    points = branch_points({s: v.get("description", "") for s, v in scenes.items()})
    for p in points:
        if (p.parent, p.frame) == (parent, frame):
            return p
    known = ", ".join(p.name for p in points[:8]) + (" ..." if len(points) > 8 else "")
    raise UserError(f"{shard_dir}: no branch point {parent}:{frame} in the shards (branch points there: "
                    f"{known or 'none; write the world with drivejepa synth --branches K'})")


def visualize_branch_point(checkpoint: str | Path, shard_dir: str | Path, branch_point: str, out: str | Path, *,
                           horizon: Optional[int] = None, size: tuple[int, int] = (480, 360),
                           decoder_steps: int = 300, retrain_decoder: bool = False, progress: bool = True) -> dict:
    """Write ``branch_point_k<h>.png`` (K rows: predicted | true) at the middle and last horizon steps, their
    ``.ply`` clouds and ``branch_point.json`` to ``out``; return the summary written to the JSON."""
    import torch

    from drivejepa.data.shards import read_shard
    from drivejepa.evaluation.counterfactual import encode_branch_point, plan_branch_points, point_scores
    from drivejepa.training.checkpoint import load_world_model
    from drivejepa.visualization.decoder import decode, extract_boxes, lift_points
    from drivejepa.visualization.decoder_training import ensure_decoder
    from drivejepa.visualization.geometry import integrate_actions, pose2d_matrix, relative_poses, \
        transform_boxes, transform_points
    from drivejepa.visualization.headless import probe_rendering
    from drivejepa.visualization.pipeline import frame_layers
    from drivejepa.visualization.render import write_ply
    from drivejepa.visualization.scene import TRUE_COLOR, SceneLayers

    t0 = time.perf_counter()
    out = Path(out)
    point = find_branch_point(shard_dir, branch_point)
    model, cfg = load_world_model(checkpoint)
    context = int(cfg.data.context)
    horizon = int(horizon or cfg.data.horizon)
    if horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {horizon}")
    jobs, skipped = plan_branch_points(shard_dir, [point], context, horizon)
    if not jobs:
        raise UserError(f"{shard_dir}: branch point {point.name} cannot be rolled out {horizon} steps from "
                        f"{context} context frames: " + "; ".join(f"{s['scene']}: {s['reason']}" for s in skipped))
    job = jobs[0]
    point = job.point
    result = encode_branch_point(model, job, 16, torch.device("cpu"))
    if "nonfinite_frames" in result:
        raise UserError(f"{shard_dir}: branch point {point.name} has non-finite latents")
    scores = point_scores(result)["model"]
    decoder, dmeta, dpath = ensure_decoder(checkpoint, model, cfg, shard_dir, steps=decoder_steps,
                                           retrain=retrain_decoder, progress=progress)
    spec = decoder.spec
    k = len(point.scenes)
    preds = np.asarray(result["model"])                                                 # [K, H, ...]
    grids = decode(decoder, preds.reshape(-1, *preds.shape[2:]))
    grids = grids.reshape(k, horizon, *grids.shape[1:])                                  # [K, H, 3, G, G]

    shards = [read_shard(p) for p in job.paths]
    b = context - 1                                      # position of the branch frame within job.positions
    futures = []
    for j, (shard, pos) in enumerate(zip(shards, job.positions)):
        a = shard.arrays
        rel = relative_poses(a["ego_pose"], int(pos[b]))
        actions = np.asarray(a["actions"], dtype=np.float32)[pos[b:b + horizon]]
        futures.append({"scene": point.scenes[j], "behaviour": point.behaviours[j], "arrays": a, "rel": rel,
                        "positions": pos, "actions": actions, "action_path": integrate_actions(actions),
                        "true_path": rel[pos[b:b + horizon + 1], :2, 3]})
    steps = sorted({max(1, math.ceil(horizon / 2)), horizon})
    dt = 0.5
    stamps = np.asarray(shards[0].arrays["timestamps"], dtype=np.float64)
    if len(stamps) > 1:
        dt = float(np.median(np.diff(stamps)) / 1e6)

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {"png": [], "ply": [], "json": []}
    rows: dict[int, list[tuple[SceneLayers, SceneLayers]]] = {}
    for h in steps:
        rows[h] = []
        for j, f in enumerate(futures):
            pose = f["action_path"][h]
            m = pose2d_matrix(*pose)
            g = grids[j, h - 1]
            near = int(scores["nearest"][j, h - 1])
            verdict = "its own" if near == j else f"'{point.behaviours[near]}'"
            pred = SceneLayers(pred_points=transform_points(m, lift_points(g, spec, seed=h)),
                               decoded_boxes=transform_boxes(m, extract_boxes(g, spec)), ego=tuple(pose),
                               true_path=f["true_path"], action_path=f["action_path"][:, :2],
                               title=f"{f['behaviour']}: predicted b+{h} ({h * dt:.1f} s), nearest true future: "
                                     f"{verdict}")
            frame = int(f["positions"][b + h])
            true = frame_layers(f["arrays"], frame, f["rel"][frame], f"{f['behaviour']}: true b+{h} ({f['scene']})")
            true.true_path = f["true_path"]
            rows[h].append((pred, true))
            files["ply"].append(str(write_ply(out / f"branch_pred_{j}_k{h}.ply", pred.pred_points)))
            files["ply"].append(str(write_ply(out / f"branch_true_{j}_k{h}.ply", true.true_points, TRUE_COLOR)))

    support = probe_rendering()
    if support.ok:
        files["png"] += _render_rows(rows, point, size, out)
    else:
        log.warning("%s", support.message)

    summary = {
        "checkpoint": str(checkpoint), "shards": str(shard_dir), "branch_point": point.name, "parent": point.parent,
        "frame": point.frame, "context": context, "horizon": horizon, "seconds_per_step": dt,
        "metric_space": model.space, "steps_rendered": steps,
        "futures": [{"scene": f["scene"], "behaviour": f["behaviour"], "actions": f["actions"].tolist(),
                     "action_path": f["action_path"].tolist(), "true_path": f["true_path"].tolist(),
                     "top1": scores["top1"][j].tolist(), "nearest": [point.behaviours[i]
                                                                     for i in scores["nearest"][j]],
                     "distance_to_each_future": scores["distance"][j].T.tolist()}
                    for j, f in enumerate(futures)],
        "top1": scores["top1"].mean(axis=0).tolist(), "chance": 1.0 / k,
        "decoder": {"path": str(dpath), **{key: v for key, v in dmeta.items() if key in ("scores", "train_seconds",
                                                                                       "train_pairs")}},
        "rendered": support.ok, "render_message": support.message, "files": files,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    files["json"].append(str(atomic_write_json(out / "branch_point.json", summary)))
    return summary


def _render_rows(rows: dict, point, size: tuple[int, int], out: Path) -> list[str]:
    from drivejepa.data.shards import CLASSES
    from drivejepa.visualization.render import OffscreenView, caption, fit_camera, legend_entries, panels, save_png
    from drivejepa.visualization.scene import SceneLayers

    width, height = size
    pngs = []
    every = [layer for pairs in rows.values() for pair in pairs for layer in pair]
    union = SceneLayers(ego=None, boxes=np.zeros((0, 9)),
                        true_path=np.concatenate([layer.true_path for layer in every]),
                        action_path=np.concatenate([layer.action_path for layer in every if layer.action_path
                                                    is not None]))
    camera = fit_camera(union, width / height)       # one camera for every panel: the futures side by side
    with OffscreenView(width, height) as view:
        for h, pairs in rows.items():
            tiles = []
            for pred, true in pairs:
                tiles.append(caption(view.render(pred, camera), pred.title, font_size=12))
                tiles.append(caption(view.render(true, camera), true.title, font_size=12))
            entries = {}
            for pred, true in pairs:
                entries.update(legend_entries(pred, CLASSES) + legend_entries(true, CLASSES))
            legend = caption(np.zeros((1, tiles[0].shape[1] * 2, 3), np.uint8),
                             f"branch point {point.name}: left, each future's rollout with its own actions "
                             "(decoded); right, its true future", list(entries.items()), font_size=12)
            pngs.append(str(save_png(out / f"branch_point_k{h}.png", panels([panels(tiles, columns=2), legend],
                                                                             columns=1))))
    return pngs
