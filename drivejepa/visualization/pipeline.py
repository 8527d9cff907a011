"""``drivejepa visualize``: roll a checkpoint out from one key frame of one scene and show what it predicts.

Every 3D view is drawn in the ego frame of the start key frame ``t`` (x forward, y left), so the camera stays put
over the horizon while the ego drives through the scene. At step ``k`` the predicted scene holds the decoded
prediction (placed at the ego pose the actions imply) and the true lidar of ``t + k`` (placed at the true pose), the
annotated boxes of ``t + k``, the ego's true future path and the path the actions imply, and the ego itself; beside
it, the real key frame of the scene whose latent is nearest the prediction. Counterfactuals roll the same start out
under every action sequence. Everything numeric goes to ``visualize.json`` beside the images.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa.errors import UserError
from drivejepa.io import atomic_write_json
from drivejepa.visualization.geometry import pose2d_matrix, relative_poses, transform_boxes, transform_points
from drivejepa.visualization.headless import probe_rendering
from drivejepa.visualization.render import write_ply
from drivejepa.visualization.scene import TRUE_COLOR, SceneLayers

log = logging.getLogger(__name__)


def frame_layers(arrays, j: int, m: np.ndarray, title: str) -> SceneLayers:
    """The real key frame ``j`` (lidar, boxes, ego) moved from its ego frame into the view frame by ``m`` [4, 4]
    (``relative_poses(...)[j]`` puts it where it was)."""
    pts = np.asarray(arrays["lidar"][j])[np.asarray(arrays["lidar_mask"][j], dtype=bool)]
    keep = np.asarray(arrays["box_mask"][j], dtype=bool)
    return SceneLayers(true_points=transform_points(m, pts[:, :3]),
                       boxes=transform_boxes(m, np.asarray(arrays["boxes"][j])[keep]),
                       labels=np.asarray(arrays["box_labels"][j])[keep],
                       ego=(m[0, 3], m[1, 3], float(np.arctan2(m[1, 0], m[0, 0]))), title=title)


def _check_request(shard, scene: str, frame: Optional[int], horizon: int, context: int) -> int:
    n = shard.frames
    first, last = context - 1, n - 1 - horizon
    if horizon < 1:
        raise UserError(f"--horizon must be >= 1, got {horizon}")
    if last < first:
        raise UserError(f"{shard.path}: scene {scene} has {n} key frames, too few for {context} context frames and "
                        f"a horizon of {horizon}")
    t = first if frame is None else int(frame)
    if not first <= t <= last:
        raise UserError(f"--frame {t}: with {context} context frames and a horizon of {horizon}, scene {scene} "
                        f"({n} key frames) allows frames {first}..{last}")
    valid = np.asarray(shard.arrays["action_valid"], dtype=bool)
    if not valid[t:t + horizon].all():
        raise UserError(f"{shard.path}: recorded actions of frames {t}..{t + horizon - 1} are not all valid")
    gaps = np.diff(np.asarray(shard.meta.get("frame_indices", np.arange(n)))[t - context + 1:t + horizon + 1])
    if np.any(gaps != 1):
        log.warning("scene %s skips key frames between %d and %d: the true future is not evenly spaced", scene,
                    t - context + 1, t + horizon)
    return t


def visualize(checkpoint: str | Path, shard_dir: str | Path, scene: str, out: str | Path, *,
              frame: Optional[int] = None, horizon: Optional[int] = None, actions: str = "recorded",
              interactive: bool = False, size: tuple[int, int] = (800, 600), decoder_steps: int = 300,
              retrain_decoder: bool = False, progress: bool = True) -> dict:
    """Write the views of one predicted scene to ``out`` and return the summary written to ``visualize.json``."""
    import torch

    from drivejepa.data.shards import load_manifest, read_shard, shard_path
    from drivejepa.evaluation.latents import encode_frames, rollout_windows
    from drivejepa import latent_space
    from drivejepa.training.checkpoint import load_world_model
    from drivejepa.visualization.actions import action_sequences
    from drivejepa.visualization.decoder import bev_targets, decode, extract_boxes, grid_scores, lift_points
    from drivejepa.visualization.decoder_training import camera_index, ensure_decoder
    from drivejepa.visualization.geometry import integrate_actions

    t0 = time.perf_counter()
    out = Path(out)
    scenes = load_manifest(shard_dir)["scenes"]
    if scene not in scenes:
        known = ", ".join(sorted(scenes)[:8]) + (" ..." if len(scenes) > 8 else "")
        raise UserError(f"{shard_dir}: no scene '{scene}' in the shards (known: {known})")
    shard = read_shard(shard_path(shard_dir, scene))
    model, cfg = load_world_model(checkpoint)
    a = shard.arrays
    context = int(cfg.data.context)
    horizon = int(horizon or cfg.data.horizon)
    t = _check_request(shard, scene, frame, horizon, context)
    stamps = np.asarray(a["timestamps"], dtype=np.float64)
    dt = float(np.median(np.diff(stamps)) / 1e6) if len(stamps) > 1 else 0.5
    act = np.asarray(a["actions"], dtype=np.float32)
    now = act[t - 1] if t >= 1 and bool(a["action_valid"][t - 1]) else act[t]
    seqs = action_sequences(actions, act[t:t + horizon], float(now[3]), float(now[4]), horizon, dt)
    names = list(seqs)

    # Latents: every key frame of the scene, then one rollout per action sequence from the same context.
    device = torch.device("cpu")
    _, target = encode_frames(model, a, shard.frames, 16, device, camera_index(shard, model),
                              with_online=False)
    past = np.repeat(act[None, t - context + 1:t], len(names), axis=0)
    preds = rollout_windows(model, target, np.full(len(names), t), context, np.stack([seqs[n] for n in names]),
                            past, len(names), device)                                    # [S, H, N, C]
    decoder, dmeta, dpath = ensure_decoder(checkpoint, model, cfg, shard_dir, steps=decoder_steps,
                                           retrain=retrain_decoder, progress=progress)
    spec = decoder.spec
    grids = decode(decoder, preds)
    grids = grids.reshape(len(names), horizon, *grids.shape[1:])                             # [S, H, 3, G, G]
    decoded_now = decode(decoder, target[t:t + 1])[0]
    decoded_truth = decode(decoder, target[t + 1:t + horizon + 1])

    # Nearest real frame of the scene to each prediction, in the space the model was trained to predict in.
    space = model.space
    gallery = latent_space.targets(target, space)
    pred_m = latent_space.predictions(preds[0], space)
    dist = latent_space.distance(pred_m[:, None], gallery[None])                           # [H, T]

    rel = relative_poses(a["ego_pose"], t)
    true_path = rel[t:t + horizon + 1, :2, 3]
    paths = {n: integrate_actions(seqs[n]) for n in names}
    steps = []
    for k in range(1, horizon + 1):
        j = int(np.argmin(dist[k - 1]))
        truth_grid = bev_targets(a["lidar"][t + k], a["lidar_mask"][t + k], a["boxes"][t + k], a["box_mask"][t + k],
                                 spec)
        steps.append({
            "k": k, "seconds": round(k * dt, 3), "true_frame": t + k, "nearest_frame": j,
            "nearest_distance": float(dist[k - 1, j]), "true_frame_distance": float(dist[k - 1, t + k]),
            "true_frame_rank": int((dist[k - 1] < dist[k - 1, t + k]).sum()) + 1,
            "decoded_prediction": grid_scores(grids[0, k - 1][None], truth_grid[None]),
            "decoded_start_frame": grid_scores(decoded_now[None], truth_grid[None]),
            "decoded_true_latent": grid_scores(decoded_truth[k - 1][None], truth_grid[None]),
            "true_ego_xy": true_path[k].tolist(), "action_ego_xy": paths[names[0]][k, :2].tolist(),
        })

    # Scene content per step and sequence, all in the view frame.
    def predicted(n: int, k: int, with_truth: bool, title: str) -> SceneLayers:
        pose = paths[names[n]][k]
        m = pose2d_matrix(*pose)
        g = grids[n, k - 1]
        base = frame_layers(a, t + k, rel[t + k], title)
        return SceneLayers(true_points=base.true_points if with_truth else None,
                           pred_points=transform_points(m, lift_points(g, spec, seed=k)),
                           boxes=base.boxes, labels=base.labels,
                           decoded_boxes=transform_boxes(m, extract_boxes(g, spec)),
                           ego=tuple(pose), true_path=true_path, action_path=paths[names[n]][:, :2], title=title)

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {"png": [], "gif": [], "ply": [], "json": []}
    main_layers, near_layers = [], []
    for s in steps:
        k = s["k"]
        main_layers.append(predicted(0, k, True, f"{scene}  t={t} -> t+{k} ({s['seconds']:.1f} s)  "
                                                 f"actions: {names[0]}"))
        # The latent is ego-centric: the nearest frame is drawn in its own ego frame at the predicted ego pose, so
        # a frame from far along the scene lands beside the prediction, not off the shared camera's view.
        near_layers.append(frame_layers(a, s["nearest_frame"], pose2d_matrix(*paths[names[0]][k]),
                                        f"nearest real frame: {s['nearest_frame']} (true t+{k} = {t + k}, "
                                        f"rank {s['true_frame_rank']}), at the predicted ego pose"))
        files["ply"].append(str(write_ply(out / f"true_k{k}.ply", main_layers[-1].true_points, TRUE_COLOR)))
        for n, name in enumerate(names):
            pts = main_layers[-1].pred_points if n == 0 else predicted(n, k, False, "").pred_points
            files["ply"].append(str(write_ply(out / f"pred_{_slug(name)}_k{k}.ply", pts)))
    counter_layers = [predicted(n, horizon, False, f"{name}: ego at ({paths[name][-1][0]:.1f}, "
                                                   f"{paths[name][-1][1]:.1f}) m after {horizon * dt:.1f} s")
                      for n, name in enumerate(names)]
    files["png"] += _camera_views(a, shard.meta.get("cameras", []), camera_index(shard, model), t, steps,
                                  grids[0], paths[names[0]], spec, out)

    support = probe_rendering()
    if support.ok:
        files["png"], files["gif"] = _render_views(main_layers, near_layers, counter_layers, size, out,
                                                   files["png"])
    else:
        log.warning("%s", support.message)

    summary = {
        "checkpoint": str(checkpoint), "shards": str(shard_dir), "scene": scene, "frame": t, "context": context,
        "horizon": horizon, "seconds_per_step": dt, "actions": names[0], "metric_space": space,
        "sequences": {n: seqs[n].tolist() for n in names},
        "action_paths": {n: paths[n].tolist() for n in names}, "true_path": true_path.tolist(),
        "steps": steps,
        "counterfactual_spread_m": float(np.ptp(np.stack([paths[n][-1, :2] for n in names]), axis=0).max()),
        "decoder": {"path": str(dpath), **{k: v for k, v in dmeta.items() if k in ("scores", "train_seconds",
                                                                               "train_pairs")}},
        "rendered": support.ok, "render_message": support.message, "files": files,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    files["json"].append(str(atomic_write_json(out / "visualize.json", summary)))
    if interactive:
        _interactive(main_layers, support)
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _camera_views(a, cameras: list[str], cams: list[int], t: int, steps: list[dict], grids: np.ndarray,
                  action_poses: np.ndarray, spec, out: Path) -> list[str]:
    """camera_k<k>.png: the model's cameras at t+k with annotated boxes and the decoded boxes (moved from the
    predicted ego pose into the true one)."""
    from drivejepa.visualization.camera_view import draw_boxes_on_image
    from drivejepa.visualization.decoder import extract_boxes
    from drivejepa.visualization.render import caption, panels, save_png
    from drivejepa.visualization.scene import PRED_COLOR, category_color

    rel = relative_poses(a["ego_pose"], t)
    written = []
    for s in steps:
        k, f = s["k"], s["true_frame"]
        keep = np.asarray(a["box_mask"][f], dtype=bool)
        boxes, labels = np.asarray(a["boxes"][f])[keep], np.asarray(a["box_labels"][f])[keep]
        # decoded boxes live in the ego frame the actions imply; express them in the true ego frame of t+k
        pred_to_true = np.linalg.inv(rel[f]) @ pose2d_matrix(*action_poses[k])
        decoded = transform_boxes(pred_to_true, extract_boxes(grids[k - 1], spec))
        images = []
        for c in cams:
            if not bool(a["image_mask"][f][c]):
                continue
            img = draw_boxes_on_image(np.asarray(a["images"][f][c]), a["cam_intrinsics"][c], a["cam_to_key_ego"][f][c],
                                      boxes, labels, decoded)
            name = cameras[c] if c < len(cameras) else f"camera {c}"
            legend = [("decoded boxes", PRED_COLOR)] + [(_class_name(int(lb)), category_color(int(lb)))
                                                        for lb in sorted(set(labels.tolist()))]
            images.append(caption(img, f"{name}  frame {f} (t+{k})", legend))
        if images:
            written.append(str(save_png(out / f"camera_k{k}.png", panels(images))))
    return written


def _class_name(label: int) -> str:
    from drivejepa.data.shards import CLASSES

    return CLASSES[label] if 0 <= label < len(CLASSES) else f"class {label}"


def _render_views(main_layers, near_layers, counter_layers, size, out: Path, pngs: list[str]):
    from drivejepa.data.shards import CLASSES
    from drivejepa.visualization.render import (OffscreenView, caption, fit_camera, legend_entries, panels,
                                                save_gif, save_png)

    width, height = size
    # One camera for the whole horizon (fitted to every step's content), so the GIF does not jump.
    union = SceneLayers(ego=None, boxes=np.concatenate([m.boxes for m in main_layers] + [np.zeros((0, 9))]),
                        true_path=main_layers[0].true_path,
                        action_path=np.concatenate([m.action_path for m in main_layers]))
    camera = fit_camera(union, width / height)
    frames = []
    with OffscreenView(width, height) as view:
        for k, (m, nl) in enumerate(zip(main_layers, near_layers), start=1):
            left = caption(view.render(m, camera), m.title, legend_entries(m, CLASSES))
            right = caption(view.render(nl, camera), nl.title, legend_entries(nl, CLASSES))
            frames.append(panels([left, right]))
            pngs.append(str(save_png(out / f"scene_k{k}.png", frames[-1])))
    gif = [str(save_gif(out / "scene.gif", frames))]
    cw, ch = max(320, width // 2), max(240, height // 2)
    cunion = SceneLayers(ego=None, boxes=counter_layers[0].boxes, true_path=counter_layers[0].true_path,
                         action_path=np.concatenate([c.action_path for c in counter_layers]))
    ccam = fit_camera(cunion, cw / ch)
    with OffscreenView(cw, ch) as view:
        tiles = [caption(view.render(c, ccam), c.title, font_size=12) for c in counter_layers]
    columns = min(3, len(tiles))
    legend = caption(np.zeros((1, tiles[0].shape[1] * columns, 3), np.uint8), "counterfactuals: the same start "
                     "rolled out under each action sequence", legend_entries(counter_layers[0], CLASSES))
    pngs.append(str(save_png(out / "counterfactuals.png", panels([panels(tiles, columns=columns), legend],
                                                                 columns=1))))
    return pngs, gif


def _interactive(layers: list[SceneLayers], support) -> None:
    from drivejepa.visualization.headless import display_available
    from drivejepa.visualization.render import show_interactive

    if not display_available():
        print("--interactive: no display here (DISPLAY and WAYLAND_DISPLAY are unset); the PNG and GIF views were "
              "written instead")
        return
    if not support.ok:
        print(f"--interactive: {support.message}")
        return
    show_interactive(layers)
