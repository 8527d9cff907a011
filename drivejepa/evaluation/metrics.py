"""Prediction metrics in latent space beside the squared error (``drivejepa.latent_space.distance``): cosine
distance and retrieval accuracy.

Retrieval is the JEPA "prediction accuracy": a prediction for frame j is correct at top-k when the target latent of
frame j is among the k gallery latents nearest to it, the gallery of a window being the key frames of its own scene
after its context (``retrieval_ranks``). Ties count against the prediction (the rank is the number of gallery frames
at least as close, the true one excluded), so a predictor that outputs the same vector for everything cannot score
above chance by luck of ordering.
"""
from __future__ import annotations

import numpy as np


def cosine_distance(pred: np.ndarray, target: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """1 - cosine similarity over the latent dimension: [..., D] -> [...]."""
    p = pred.astype(np.float64)
    t = target.astype(np.float64)
    num = np.sum(p * t, axis=-1)
    den = np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1) + eps
    return 1.0 - num / den


def retrieval_ranks(pred: np.ndarray, frames: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Ranks [W, H] of the predictions ``pred`` [W, H, ...] of the windows of one scene (window w starts at frame
    ``starts[w]``, step h predicts frame ``starts[w] + h``) among that scene's later key frames ``frames`` [T, ...]:
    the gallery of window w is the frames after its context, ``starts[w] + 1 .. T - 1``. The rank is how many gallery
    frames other than the true one are at least as close (``latent_space.distance``), so rank 0 = the true frame is
    the strict nearest. The last context frame is not in the gallery: a copy-last prediction is a gallery frame at
    distance 0 in a gallery of every frame, never the true one, and its top-1 would be 0 by construction."""
    import torch

    from drivejepa import latent_space

    pred, frames = np.asarray(pred), np.asarray(frames)
    w, h = pred.shape[:2]
    ranks = np.zeros((w, h), dtype=np.int64)
    gallery = torch.from_numpy(np.array(frames, dtype=np.float64))      # a copy: arrays from Ray are read-only
    for i, s in enumerate(np.asarray(starts, dtype=np.int64)):
        later = gallery[s + 1:]                                                   # [G, ...], the true frame at h
        d = latent_space.distance(torch.from_numpy(pred[i]).double().unsqueeze(1), later.unsqueeze(0)).numpy()
        true = d[np.arange(h), np.arange(h)]                                      # [H]
        # Ties count against the prediction; a relative tolerance keeps rounding noise from beating an exact match.
        closer = d <= (true + 1e-9 * (np.abs(true) + np.abs(d).mean(axis=1)))[:, None]
        closer[np.arange(h), np.arange(h)] = False
        ranks[i] = closer.sum(axis=1)
    return ranks


def topk_accuracy(ranks: np.ndarray, k: int) -> np.ndarray:
    """Share of ``ranks`` below ``k`` over the first axis: ``[N, ...] -> [...]`` (NaN where N = 0)."""
    ranks = np.asarray(ranks)
    if ranks.shape[0] == 0:
        return np.full(ranks.shape[1:], np.nan)
    return np.mean(ranks < k, axis=0)


def chance_topk(gallery_sizes, k: int) -> float:
    """Top-k accuracy of a predictor that ranks the gallery at random, averaged over queries whose galleries hold
    ``gallery_sizes`` frames (one number or one per query)."""
    sizes = np.atleast_1d(np.asarray(gallery_sizes, dtype=np.float64))
    if sizes.size == 0 or np.any(sizes <= 0):
        return float("nan")
    return float(np.mean(np.minimum(1.0, k / sizes)))
