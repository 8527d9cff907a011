"""Training the visualisation decoder of one checkpoint on detached latents, scoring it, saving it beside the run.

Pairs (latent, bird's-eye grids of the true frame) come from every key frame of the training split's factual scenes
(branches left out): the target encoder's latent of the frame, and the predictor's teacher-forced one-step prediction
of it from the previous frame and its action. Scores on the held-out split are saved with the decoder, next to the
score of the trivial decoder that outputs the mean training grid, so a reader can tell whether the decoder learned
anything.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from drivejepa.errors import UserError
from drivejepa.io import file_sha256
from drivejepa.visualization.decoder import (DecoderSpec, LatentDecoder, bev_targets, decode, decoder_path,
                                             find_decoder, grid_scores, save_decoder, train_decoder)

log = logging.getLogger(__name__)


def camera_index(shard, model) -> list[int]:
    """Positions of the model's cameras in a shard's camera axis."""
    from drivejepa.data.shards import camera_positions

    return camera_positions(shard.meta.get("cameras", []), model.cameras, shard.path)


@torch.no_grad()
def scene_pairs(model, shard, spec: DecoderSpec, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(states [n, N, C], grids [n, 3, G, G], is_prediction [n]) of one scene: a target latent for every key frame
    and a one-step prediction for every frame whose predecessor is the previous key frame with a valid action."""
    from drivejepa.evaluation.latents import encode_frames

    a = shard.arrays
    n = shard.frames
    _, target = encode_frames(model, a, n, batch_size, torch.device("cpu"), camera_index(shard, model),
                              with_online=False)
    grids = np.stack([bev_targets(a["lidar"][i], a["lidar_mask"][i], a["boxes"][i], a["box_mask"][i], spec)
                      for i in range(n)])
    latents, targets, is_pred = [target], [grids], [np.zeros(n, dtype=bool)]
    frames = np.asarray(shard.meta.get("frame_indices", np.arange(n)))
    actions = torch.from_numpy(np.array(a["actions"], dtype=np.float32))
    valid = np.array(a["action_valid"], dtype=bool)
    chunk = max(2, int(model.cfg.max_context))
    for lo in range(0, n - 1, chunk - 1):
        hi = min(n, lo + chunk)
        states = torch.from_numpy(target[lo:hi])[None]
        pred = model.predict(states, actions[lo:hi][None], torch.from_numpy(valid[lo:hi])[None])[0].float().numpy()
        src = np.arange(lo, hi - 1)                                   # output at src predicts src + 1
        keep = valid[src] & (frames[src + 1] - frames[src] == 1)
        latents.append(pred[:len(src)][keep])
        targets.append(grids[src[keep] + 1])
        is_pred.append(np.ones(int(keep.sum()), dtype=bool))
    return np.concatenate(latents), np.concatenate(targets), np.concatenate(is_pred)


def collect_pairs(model, shard_dir: str | Path, scenes: list[str], spec: DecoderSpec, *, max_frames: int = 4000,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of every scene (scenes taken evenly until about ``max_frames`` key frames)."""
    from tqdm import tqdm

    from drivejepa.data.shards import read_shard, shard_path

    lat, grd, prd = [], [], []
    total = 0
    for scene in tqdm(scenes, desc="encoding scenes for the decoder", unit="scene", disable=not progress,
                      leave=False):
        if total >= max_frames:
            break
        shard = read_shard(shard_path(shard_dir, scene))
        la, gr, pr = scene_pairs(model, shard, spec)
        lat.append(la), grd.append(gr), prd.append(pr)
        total += shard.frames
    if not lat:
        raise UserError(f"{shard_dir}: no scenes to train the visualisation decoder on")
    return np.concatenate(lat), np.concatenate(grd), np.concatenate(prd)


def split_scenes(shard_dir: str | Path, cfg) -> tuple[list[str], list[str]]:
    """(train, held-out) readable factual scenes of a run's splits (``cfg``: its TrainConfig; a counterfactual
    branch's frames up to its branch frame are its parent's); every readable scene not held out trains when the train
    split has none. What the decoder and the planner's heads are fitted and scored on."""
    from drivejepa.data.shards import factual_scenes, load_manifest, readable_scenes, scenes_in_split

    every, _ = readable_scenes(shard_dir, factual_scenes(load_manifest(shard_dir), scenes_in_split(shard_dir, None)),
                               "visualisation")
    try:
        train = [s for s in scenes_in_split(shard_dir, cfg.data.train_split) if s in every]
        held = [s for s in scenes_in_split(shard_dir, cfg.data.val_split) if s in every]
    except UserError:
        train, held = [], []
    if not train:
        train = [s for s in every if s not in held] or every
    return train, held


def ensure_decoder(checkpoint: str | Path, model, cfg, shard_dir: str | Path, *, steps: int = 300,
                   retrain: bool = False, progress: bool = True) -> tuple[LatentDecoder, dict, Path]:
    """The decoder saved for this checkpoint (unless ``retrain``), or a new one trained, scored and saved atomically
    beside the run (replacing the old one only once the new one is complete). Returns (decoder, meta, path)."""
    path = decoder_path(checkpoint)
    found = None if retrain else find_decoder(checkpoint)
    if found is not None:
        return found[0], found[1], path
    t0 = time.perf_counter()
    train_scenes, held_scenes = split_scenes(shard_dir, cfg)
    spec = DecoderSpec(latent_dim=int(model.latent_dim), bev_size=model.bev_size, grid=decoder_cells(model.bev_size),
                       range=float(model.bev_range))
    lat, grids, is_pred = collect_pairs(model, shard_dir, train_scenes, spec, progress=progress)
    spec = _with_box_stats(spec, shard_dir, train_scenes)
    decoder = train_decoder(lat, grids, spec, steps=steps, progress=progress)
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
            "shards": str(shard_dir), "train_scenes": train_scenes, "held_out_scenes": held_scenes,
            "train_pairs": int(len(lat)), "train_predicted_pairs": int(is_pred.sum()), "steps": steps}
    meta["scores"] = score_decoder(decoder, model, shard_dir, held_scenes, grids.mean(axis=0), spec) \
        if held_scenes else {}
    meta["train_seconds"] = round(time.perf_counter() - t0, 2)
    save_decoder(path, decoder, meta)
    log.info("visualisation decoder saved to %s (%.1f s)", path, meta["train_seconds"])
    return decoder, meta, path


def decoder_cells(bev_size: int, finest: int = 64) -> int:
    """Decoded cells per side: the state's grid refined by the largest power of two that stays within ``finest``."""
    cells = bev_size
    while cells * 2 <= finest:
        cells *= 2
    return cells


def _with_box_stats(spec: DecoderSpec, shard_dir, scenes: list[str]) -> DecoderSpec:
    import dataclasses

    from drivejepa.data.shards import read_shard, shard_path

    zs, hs = [], []
    for scene in scenes:
        a = read_shard(shard_path(shard_dir, scene)).arrays
        boxes = np.asarray(a["boxes"])[np.asarray(a["box_mask"], dtype=bool)]
        zs.append(boxes[:, 2]), hs.append(boxes[:, 5])
    z, h = np.concatenate(zs), np.concatenate(hs)
    if not len(z):
        return spec
    return dataclasses.replace(spec, box_z=float(np.median(z)), box_h=float(np.median(h)))


def score_decoder(decoder: LatentDecoder, model, shard_dir, scenes: list[str], mean_grid: np.ndarray,
                  spec: DecoderSpec) -> dict:
    """Held-out IoUs of decoded target latents and decoded one-step predictions, and of the mean training grid."""
    lat, grids, is_pred = collect_pairs(model, shard_dir, scenes, spec, progress=False)
    out = decode(decoder, lat)
    baseline = np.repeat(mean_grid[None], len(grids), axis=0)
    scores = {"frames": int((~is_pred).sum()), "predictions": int(is_pred.sum()),
              "target_latents": grid_scores(out[~is_pred], grids[~is_pred]),
              "mean_grid_baseline": grid_scores(baseline, grids)}
    if is_pred.any():
        scores["predicted_latents"] = grid_scores(out[is_pred], grids[is_pred])
    return scores

