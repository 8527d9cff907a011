"""Prediction metrics in latent space beside the squared error (``drivejepa.latent_space.distance``): cosine
distance and retrieval accuracy.

Retrieval is the JEPA "prediction accuracy": a prediction for frame j is correct at top-k when the target latent of
frame j is among the k gallery latents nearest (L2) to it, the gallery being every evaluated key frame. Ties count
against the prediction (the rank is the number of gallery frames at least as close, the true one excluded), so a
predictor that outputs the same vector for everything cannot score above chance by luck of ordering.
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


def retrieval_ranks(queries: np.ndarray, gallery: np.ndarray, true_index: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each query [M, D], how many gallery items [G, D] other than ``true_index`` are at least as close (L2).

    Rank 0 = the true frame is the strict nearest neighbour; top-k accuracy is ``mean(rank < k)``."""
    queries = np.asarray(queries, dtype=np.float64)
    gallery = np.asarray(gallery, dtype=np.float64)
    true_index = np.asarray(true_index, dtype=np.int64)
    if queries.shape[0] != true_index.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but {true_index.shape[0]} true indices")
    g2 = np.sum(gallery * gallery, axis=1)
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for lo in range(0, queries.shape[0], chunk):
        q = queries[lo:lo + chunk]
        d = g2[None, :] - 2.0 * q @ gallery.T  # |q|^2 is common to a row and does not change the order
        idx = true_index[lo:lo + chunk]
        rows = np.arange(q.shape[0])
        true_d = d[rows, idx]
        # Distances by expansion carry rounding error; compare against a relative tolerance so an exact match
        # (distance 0) is not beaten by rounding noise.
        tol = 1e-9 * (np.abs(true_d) + g2[idx] + np.sum(q * q, axis=1))
        closer = d <= (true_d + tol)[:, None]
        closer[rows, idx] = False
        ranks[lo:lo + chunk] = closer.sum(axis=1)
    return ranks


def topk_accuracy(ranks: np.ndarray, k: int) -> np.ndarray:
    """Share of ``ranks`` below ``k`` over the first axis: ``[N, ...] -> [...]`` (NaN where N = 0)."""
    ranks = np.asarray(ranks)
    if ranks.shape[0] == 0:
        return np.full(ranks.shape[1:], np.nan)
    return np.mean(ranks < k, axis=0)


def chance_topk(gallery_size: int, k: int) -> float:
    """Top-k accuracy of a predictor that ranks the gallery at random."""
    return min(1.0, k / gallery_size) if gallery_size else float("nan")
