"""Latents of the evaluated scenes and the rollouts compared on them.

For every key frame of a scene: the online and the target encoder's latents. For every window start ``s`` (context
frames ``s-Tc+1..s``, future frames ``s+1..s+H``) the predictor is rolled out from the target encoder's context
latents (``WorldModel.context_states``) with the true actions ``a_s..a_{s+H-1}`` (``model``) and with the past and
future actions of another window (``shuffled_actions``, see drivejepa/baselines.py). The latent baselines
(copy-last, constant velocity, mean of context) are those of drivejepa/baselines.py, every prediction and target in
the model's latent space (drivejepa/latent_space.py), so their differences are due to the predictor alone.
"""
from __future__ import annotations

import numpy as np

from drivejepa.data.shards import PER_CAMERA, SENSOR_KEYS


def window_starts(num_frames: int, context: int, horizon: int, action_valid: np.ndarray,
                  frame_indices: np.ndarray | None = None) -> np.ndarray:
    """Starts ``s`` whose context and ``horizon`` future frames exist, are consecutive key frames of the original
    scene (no skipped frame inside), and whose actions ``a_s..a_{s+H-1}`` are valid. ``s >= 1`` always, so the
    constant-velocity baseline has a previous frame."""
    first = max(context - 1, 1)
    starts = []
    for s in range(first, num_frames - horizon):
        lo, hi = s - first, s + horizon
        if frame_indices is not None and np.any(np.diff(frame_indices[lo:hi + 1]) != 1):
            continue
        if not np.all(action_valid[s:s + horizon]):
            continue
        starts.append(s)
    return np.asarray(starts, dtype=np.int64)


def future_index(starts: np.ndarray, horizon: int) -> np.ndarray:
    """Frame index of each future step: [W, H] with ``starts[w] + k`` at column ``k - 1``."""
    return starts[:, None] + np.arange(1, horizon + 1)[None, :]


def window_actions(actions: np.ndarray, starts: np.ndarray, context: int, horizon: int) -> tuple:
    """(future ``[W, H, A]``: ``a_s..a_{s+H-1}``, past ``[W, Tc-1, A]``: the earlier context frames' actions) of
    every window start ``s`` (float32; empty arrays of those shapes when there is no start)."""
    actions = np.asarray(actions, dtype=np.float32)
    starts = np.asarray(starts, dtype=np.int64)[:, None]
    return actions[starts + np.arange(horizon)], actions[starts + np.arange(-context + 1, 0)]


def frames_as_obs(arrays, index: np.ndarray, camera_index: list[int] | None = None):
    """Torch observation batch for the key frames ``index`` of one shard (the modalities the shard holds)."""
    import torch

    index = np.asarray(index)
    obs = {}
    for key in SENSOR_KEYS:
        if key not in arrays:
            continue
        if key in PER_CAMERA:                   # one calibration per camera: the same for every frame
            value = np.asarray(arrays[key])
            value = value if camera_index is None else value[camera_index]
            obs[key] = torch.from_numpy(np.array(np.broadcast_to(value, (len(index), *value.shape))))  # writable copy
            continue
        value = arrays[key][index]  # fancy indexing copies out of the read-only memory map
        if camera_index is not None and key in ("images", "image_mask", "cam_to_key_ego"):
            value = value[:, camera_index]
        obs[key] = torch.from_numpy(np.ascontiguousarray(value))
    return obs


def encode_frames(model, arrays, num_frames: int, batch_size: int, device, camera_index=None,
                  with_online: bool = True, index: np.ndarray | None = None):
    """(online [T, N, C] or None, target [T, N, C]) float32 numpy states of every key frame (or of the key frames
    ``index``, in that order). Rollouts need only the target states (``WorldModel.context_states``); the online
    ones feed the collapse diagnostics."""
    import torch

    frames = np.arange(num_frames) if index is None else np.asarray(index, dtype=np.int64)
    online, target = [], []
    with torch.no_grad():
        for lo in range(0, len(frames), batch_size):
            idx = frames[lo:lo + batch_size]
            obs = {k: v.to(device) for k, v in frames_as_obs(arrays, idx, camera_index).items()}
            if with_online:
                online.append(model.encode(obs, target=False).float().cpu().numpy())
            target.append(model.encode(obs, target=True).float().cpu().numpy())
    return (np.concatenate(online) if with_online else None), np.concatenate(target)


def rollout_windows(model, context_latents: np.ndarray, starts: np.ndarray, context: int, actions: np.ndarray,
                    past_actions: np.ndarray, batch_size: int, device) -> np.ndarray:
    """Roll the predictor out for every window: context states [T, N, C] (frames ``s-Tc+1..s``), future actions
    [W, H, A] (``a_s..a_{s+H-1}``) and the earlier context frames' actions [W, Tc-1, A] -> [W, H, N, C]."""
    import torch

    offsets = np.arange(-context + 1, 1)
    out = []
    with torch.no_grad():
        for lo in range(0, len(starts), batch_size):
            s = starts[lo:lo + batch_size]
            # np.array copies: arrays handed over by Ray are read-only views
            ctx = torch.from_numpy(np.array(context_latents[s[:, None] + offsets[None, :]], dtype=np.float32))
            act = torch.from_numpy(np.array(actions[lo:lo + batch_size], dtype=np.float32))
            past = torch.from_numpy(np.array(past_actions[lo:lo + batch_size], dtype=np.float32))
            out.append(model.rollout(ctx.to(device), act.to(device), past.to(device)).float().cpu().numpy())
    if not out:
        return np.zeros((0, actions.shape[1], *context_latents.shape[1:]), dtype=np.float32)
    return np.concatenate(out)
