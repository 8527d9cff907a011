"""Frozen probes: what the latents know about the physical scene, and what the rollout forecasts.

Labels come from the shards (no action is ever a probe input; speed and yaw rate are read from the action columns as
labels only): ego speed, ego yaw rate, number of agents within ``count_radius`` metres, and a bird's-eye occupancy
grid of agent footprints around the ego (``grid_size`` x ``grid_size`` cells over ``[-grid_range, grid_range]``
metres, x forward, y left). Linear and MLP probes are fitted on the train split's target latents and tested on the
evaluated split. Applied to predicted latents, the occupancy probe turns a rollout into an occupancy forecast, scored
by IoU against the true future grid (summed intersection over summed union, as OccWorld reports it) beside two
box-level baselines: copy-last (the grid at the last context frame) and constant velocity (every box moved along its
annotated velocity, then seen from the true future ego pose).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

REGRESSION_TASKS = ("speed", "yaw_rate", "agent_count")
# Probe inputs up to this many numbers are fitted on one thread: for such small steps, thread synchronisation costs
# more than it saves (20x slower on a busy 2-core machine).
SMALL_PROBE_INPUT = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------
def grid_centers(grid_size: int, grid_range: float) -> np.ndarray:
    """[G*G, 2] (x, y) cell centres, x-major."""
    cell = 2.0 * grid_range / grid_size
    c = -grid_range + (np.arange(grid_size) + 0.5) * cell
    gx, gy = np.meshgrid(c, c, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def occupancy_grid(xy: np.ndarray, yaw: np.ndarray, wl: np.ndarray, grid_size: int, grid_range: float) -> np.ndarray:
    """Bool [G*G] occupancy of box footprints (centre xy [B, 2], yaw [B], width/length [B, 2]); a box smaller than a
    cell still marks the cell holding its centre."""
    occ = np.zeros(grid_size * grid_size, dtype=bool)
    if len(xy) == 0:
        return occ
    centers = grid_centers(grid_size, grid_range)
    d = centers[None, :, :] - xy[:, None, :]                                   # [B, G*G, 2]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    along = d[..., 0] * c + d[..., 1] * s
    across = -d[..., 0] * s + d[..., 1] * c
    inside = (np.abs(along) <= wl[:, 1:2] / 2) & (np.abs(across) <= wl[:, 0:1] / 2)
    occ |= inside.any(axis=0)
    cell = 2.0 * grid_range / grid_size
    ij = np.floor((xy + grid_range) / cell).astype(np.int64)
    ok = np.all((ij >= 0) & (ij < grid_size), axis=1)
    occ[ij[ok, 0] * grid_size + ij[ok, 1]] = True
    return occ


def agent_mask(box_labels: np.ndarray, box_mask: np.ndarray, agent_ids: np.ndarray) -> np.ndarray:
    return box_mask & np.isin(box_labels, agent_ids)


def frame_labels(arrays, agent_ids: np.ndarray, grid_size: int, grid_range: float, count_radius: float) -> dict:
    """Per key frame labels of one shard: speed, yaw_rate, motion_valid, agent_count [T], occupancy bool [T, G*G]."""
    actions = np.asarray(arrays["actions"], dtype=np.float64)
    boxes = np.asarray(arrays["boxes"], dtype=np.float64)
    keep = agent_mask(np.asarray(arrays["box_labels"]), np.asarray(arrays["box_mask"]), agent_ids)
    dist = np.linalg.norm(boxes[..., :2], axis=-1)
    occ = np.stack([occupancy_grid(b[k, :2], b[k, 6], b[k, 3:5], grid_size, grid_range)
                    for b, k in zip(boxes, keep)]) if len(boxes) else np.zeros((0, grid_size ** 2), bool)
    return {
        "speed": actions[:, 3],
        "yaw_rate": actions[:, 4],
        "motion_valid": np.asarray(arrays["action_valid"], dtype=bool),
        "agent_count": np.sum(keep & (dist <= count_radius), axis=1).astype(np.float64),
        "occupancy": occ,
    }


def constant_velocity_boxes(boxes: np.ndarray, pose_from: np.ndarray, pose_to: np.ndarray, dt: float,
                            velocity_valid: Optional[np.ndarray] = None):
    """Move boxes [B, 9] of one frame (its ego coords, velocity vx, vy in those coords) for ``dt`` seconds at
    constant velocity, and express them in the ego frame ``pose_to`` (ego-to-global). Returns xy [B, 2], yaw [B].
    A box whose velocity is unknown (``velocity_valid`` False: the devkit's NaN) stays where it was seen."""
    velocity = boxes[:, 7:9] if velocity_valid is None else np.where(velocity_valid[:, None], boxes[:, 7:9], 0.0)
    xy = boxes[:, :2] + dt * velocity
    rel = np.linalg.inv(pose_to) @ pose_from                                   # ego_from -> ego_to
    xy_to = xy @ rel[:2, :2].T + rel[:2, 3]
    yaw_to = boxes[:, 6] + np.arctan2(rel[1, 0], rel[0, 0])
    return xy_to, yaw_to


def box_baseline_grids(arrays, starts: np.ndarray, horizon: int, timestamps: np.ndarray, agent_ids: np.ndarray,
                       grid_size: int, grid_range: float) -> np.ndarray:
    """Constant-velocity occupancy forecasts: bool [W, H, G*G] for every window start and future step."""
    boxes = np.asarray(arrays["boxes"], dtype=np.float64)
    keep = agent_mask(np.asarray(arrays["box_labels"]), np.asarray(arrays["box_mask"]), agent_ids)
    poses = np.asarray(arrays["ego_pose"], dtype=np.float64)
    known = np.asarray(arrays["box_velocity_valid"], dtype=bool) if "box_velocity_valid" in arrays \
        else np.ones(keep.shape, dtype=bool)
    out = np.zeros((len(starts), horizon, grid_size * grid_size), dtype=bool)
    for w, s in enumerate(starts):
        b = boxes[s][keep[s]]
        for k in range(1, horizon + 1):
            dt = (timestamps[s + k] - timestamps[s]) * 1e-6
            xy, yaw = constant_velocity_boxes(b, poses[s], poses[s + k], dt, known[s][keep[s]])
            out[w, k - 1] = occupancy_grid(xy, yaw, b[:, 3:5], grid_size, grid_range)
    return out


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Summed intersection over summed union of bool grids (nan when both are empty everywhere)."""
    inter = np.logical_and(pred, truth).sum()
    union = np.logical_or(pred, truth).sum()
    return float(inter / union) if union else float("nan")


# ----------------------------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FittedProbe:
    task: str
    kind: str
    module: "object"           # torch.nn.Module mapping standardised latents to outputs
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: float = 0.0        # regression label standardisation
    y_std: float = 1.0
    threshold: float = 0.5     # occupancy: probability above which a cell is occupied (chosen on the train split)

    def predict(self, latents: np.ndarray) -> np.ndarray:
        """Regression value [N], or occupancy probability [N, G*G]."""
        import torch

        x = (np.asarray(latents, dtype=np.float32) - self.x_mean) / self.x_std
        with torch.no_grad():
            out = self.module(torch.from_numpy(x)).numpy().astype(np.float64)
        if self.task == "occupancy":
            return 1.0 / (1.0 + np.exp(-out))
        return out[:, 0] * self.y_std + self.y_mean

    def predict_occupancy(self, latents: np.ndarray) -> np.ndarray:
        return self.predict(latents) >= self.threshold

    def state(self) -> dict:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        import torch

        return {"task": self.task, "kind": self.kind, "state_dict": self.module.state_dict(),
                "x_mean": torch.from_numpy(self.x_mean), "x_std": torch.from_numpy(self.x_std),
                "y_mean": self.y_mean, "y_std": self.y_std, "threshold": self.threshold}


def _module(kind: str, dim: int, out: int, hidden: int):
    from torch import nn

    if kind == "linear":
        return nn.Linear(dim, out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))
    raise ValueError(f"unknown probe kind {kind!r}")


def fit_probe(task: str, kind: str, latents: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float,
              weight_decay: float, hidden: int, seed: int) -> FittedProbe:
    """Fit one probe full-batch with AdamW. Occupancy uses BCE with a positive-class weight (occupied cells are
    rare) and picks its threshold to maximise IoU on the training latents."""
    import torch

    x = np.asarray(latents, dtype=np.float32)
    x_mean = x.mean(axis=0)
    x_std = x.std(axis=0) + 1e-6
    xt = torch.from_numpy((x - x_mean) / x_std)
    gen_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    if x.size <= SMALL_PROBE_INPUT:
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        occupancy = task == "occupancy"
        y = np.asarray(labels, dtype=np.float64)
        if occupancy:
            yt = torch.from_numpy(y.astype(np.float32))
            pos = float(y.mean())
            pos_weight = torch.tensor((1 - pos) / pos if 0 < pos < 1 else 1.0).clamp(max=50.0)
            y_mean, y_std = 0.0, 1.0
            out_dim = y.shape[1]
        else:
            y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
            yt = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32))[:, None]
            out_dim = 1
        module = _module(kind, x.shape[1], out_dim, hidden)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad()
            out = module(xt)
            if occupancy:
                loss = torch.nn.functional.binary_cross_entropy_with_logits(out, yt, pos_weight=pos_weight)
            else:
                loss = torch.nn.functional.mse_loss(out, yt)
            loss.backward()
            opt.step()
        module.eval()
    finally:
        torch.random.set_rng_state(gen_state)
        torch.set_num_threads(threads)
    probe = FittedProbe(task, kind, module, x_mean, x_std, y_mean, y_std)
    if occupancy:
        prob = probe.predict(x)
        probe.threshold = best_threshold(prob, y.astype(bool))
    return probe


def best_threshold(prob: np.ndarray, truth: np.ndarray) -> float:
    """Probability threshold maximising IoU on (training) data."""
    candidates = np.linspace(0.05, 0.95, 19)
    scores = [np.nan_to_num(iou(prob >= t, truth), nan=0.0) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


def regression_scores(pred: np.ndarray, truth: np.ndarray, train_mean: float) -> dict:
    """MAE and R^2 of a probe beside the train-mean predictor's MAE (the baseline any probe must beat)."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if truth.size == 0:
        return {"mae": float("nan"), "r2": float("nan"), "mae_train_mean": float("nan"), "n": 0}
    sst = float(np.sum((truth - truth.mean()) ** 2))
    sse = float(np.sum((truth - pred) ** 2))
    return {"mae": float(np.mean(np.abs(pred - truth))), "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
            "mae_train_mean": float(np.mean(np.abs(train_mean - truth))), "n": int(truth.size)}


def prior_grid(train_occupancy: np.ndarray) -> np.ndarray:
    """The constant grid that maximises IoU on the training frames (a probe that ignores the latent)."""
    freq = train_occupancy.mean(axis=0)
    return freq >= best_threshold(freq[None, :].repeat(len(train_occupancy), 0), train_occupancy)
