"""Frozen probes: what the state's tokens know about the physical scene, and what the rollout forecasts.

Labels come from the shards (no action is ever a probe input; speed and yaw rate are read from the action columns as
labels only): ego speed, ego yaw rate, number of agents within ``count_radius`` metres, and a bird's-eye occupancy
grid of agent footprints around the ego (``grid_size`` x ``grid_size`` cells over ``[-grid_range, grid_range]``
metres, x forward, y left). Probes are fitted on the train split's target states ``[n, N, C]`` and tested on the
evaluated split:

- occupancy: a per-cell head, the same for every cell plus a bias of its own, on the token of the cell (tokens
  resampled onto the evaluation grid when the model's grid differs: :func:`tokens_on_grid`); ``linear`` is one
  linear map of the token, ``mlp`` a two-layer MLP;
- speed, yaw rate, agent count: ``linear`` is ridge regression on every token (a linear read-out that may weigh each
  cell differently), its strength chosen by cross-validation over train scenes (frames of one scene are never split
  between fit and check); ``mlp`` is a two-layer MLP on the tokens average-pooled to 4 x 4 cells.

Applied to predicted states, the occupancy probe turns a rollout into an occupancy forecast, scored by IoU against the
true future grid (summed intersection over summed union, as OccWorld reports it) beside two box-level baselines:
copy-last (the grid at the last context frame) and constant velocity (every box moved along its annotated velocity,
then seen from the true future ego pose).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

REGRESSION_TASKS = ("speed", "yaw_rate", "agent_count")
# Probe inputs up to this many numbers are fitted on one thread: for such small steps, thread synchronisation costs
# more than it saves (20x slower on a busy 2-core machine).
SMALL_PROBE_INPUT = 1 << 20
# Occupancy heads are shared by every cell, so each optimiser step sees this many frames' cells (every cell of a
# seeded random draw of frames) rather than all of them: the MLP head on 720 frames of 256 tokens took 164 s full
# batch on 2 cores (20 s so), and the minibatch is 22 times as many (token, label) rows as the head has weights.
OCCUPANCY_BATCH_FRAMES = 96


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
POOLED_CELLS = 4                     # the MLP regression probe sees the tokens averaged to 4 x 4 cells
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-1, 6))
CV_FOLDS = 4


def tokens_on_grid(tokens: np.ndarray, model_size: int, model_range: float, grid_size: int,
                   grid_range: float) -> np.ndarray:
    """States ``[..., N, C]`` of the model's grid -> ``[..., grid_size**2, C]`` on the evaluation grid (bilinear at
    the evaluation cells' centres, zeros outside the model's grid); the same array when the grids coincide."""
    if model_size == grid_size and model_range == grid_range:
        return tokens
    import torch
    import torch.nn.functional as F

    lead, (n, c) = tokens.shape[:-2], tokens.shape[-2:]
    x = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)).reshape(-1, n, c)
    image = x.transpose(1, 2).reshape(-1, c, model_size, model_size)
    centres = torch.from_numpy(grid_centers(grid_size, grid_range).astype(np.float32)) / model_range
    sample = centres.flip(-1).view(1, grid_size, grid_size, 2).expand(image.shape[0], -1, -1, -1)
    out = F.grid_sample(image, sample, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.flatten(2).transpose(1, 2).reshape(*lead, grid_size * grid_size, c).numpy()


def pooled_tokens(tokens: np.ndarray, cells: int = POOLED_CELLS) -> np.ndarray:
    """``[n, G*G, C]`` -> ``[n, cells*cells*C]``: the grid average-pooled to ``cells x cells``, flattened."""
    import torch
    import torch.nn.functional as F

    n, t, c = tokens.shape
    g = int(round(t ** 0.5))
    image = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32)).transpose(1, 2).reshape(n, c, g, g)
    return F.adaptive_avg_pool2d(image, min(cells, g)).reshape(n, -1).numpy()


def token_head(kind: str, channels: int, outputs: int, hidden: int):
    """The map every token goes through (``[..., C] -> [..., outputs]``): ``linear`` or a two-layer ``mlp``. The
    occupancy probe's cell head and the planner's cost heads (planning/heads.py) are built from it."""
    from torch import nn

    if kind == "linear":
        return nn.Linear(channels, outputs)
    if kind == "mlp":
        return _mlp(channels, outputs, hidden)
    raise ValueError(f"unknown head kind {kind!r} (linear or mlp)")


def _cell_module(kind: str, channels: int, cells: int, hidden: int):
    """A torch module ``[n, cells, C] -> [n, cells]`` logits: a head shared by every cell plus a bias per cell."""
    import torch
    from torch import nn

    class CellHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = token_head(kind, channels, 1, hidden)
            self.bias = nn.Parameter(torch.zeros(cells))

        def forward(self, x):
            return self.head(x)[..., 0] + self.bias

    return CellHead()


@dataclasses.dataclass
class FittedProbe:
    task: str
    kind: str
    module: "object"           # torch module: standardised inputs -> outputs
    x_mean: np.ndarray         # standardisation of the inputs (per channel for occupancy, per feature otherwise)
    x_std: np.ndarray
    y_mean: float = 0.0        # regression label standardisation
    y_std: float = 1.0
    threshold: float = 0.5     # occupancy: probability above which a cell is occupied (chosen on the train split)
    extra: dict = dataclasses.field(default_factory=dict)    # e.g. the ridge strength chosen

    def inputs(self, tokens: np.ndarray) -> np.ndarray:
        """What this probe reads from states ``[n, N, C]`` (occupancy: tokens on the evaluation grid)."""
        tokens = np.asarray(tokens, dtype=np.float32)
        if self.task == "occupancy":
            return tokens
        return tokens.reshape(len(tokens), -1) if self.kind == "linear" else pooled_tokens(tokens)

    def predict(self, tokens: np.ndarray) -> np.ndarray:
        """Regression value [n], or occupancy probability [n, cells]."""
        import torch

        x = (self.inputs(tokens) - self.x_mean) / self.x_std
        with torch.no_grad():
            out = [self.module(torch.from_numpy(np.ascontiguousarray(x[lo:lo + 1024]))).numpy()
                   for lo in range(0, len(x), 1024)]
        out = np.concatenate(out).astype(np.float64) if out else np.zeros((0,), np.float64)
        if self.task == "occupancy":
            return 1.0 / (1.0 + np.exp(-out))
        return out.reshape(-1) * self.y_std + self.y_mean

    def predict_occupancy(self, tokens: np.ndarray) -> np.ndarray:
        return self.predict(tokens) >= self.threshold

    def state(self) -> dict:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        import torch

        return {"task": self.task, "kind": self.kind, "state_dict": self.module.state_dict(),
                "x_mean": torch.from_numpy(self.x_mean), "x_std": torch.from_numpy(self.x_std),
                "y_mean": self.y_mean, "y_std": self.y_std, "threshold": self.threshold, **self.extra}


def _mlp(dim: int, out: int, hidden: int):
    from torch import nn

    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))


def _standardise(x: np.ndarray, axes) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=axes).astype(np.float32), (x.std(axis=axes) + 1e-6).astype(np.float32)


def _train(module, loss_fn, epochs: int, lr: float, weight_decay: float, seed: int, size: int) -> None:
    """Full-batch AdamW; one thread for small problems (thread synchronisation costs more than it saves there)."""
    import torch

    gen_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    if size <= SMALL_PROBE_INPUT:
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
        module.eval()
    finally:
        torch.random.set_rng_state(gen_state)
        torch.set_num_threads(threads)


def fit_occupancy_probe(kind: str, tokens: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float,
                        weight_decay: float, hidden: int, seed: int) -> FittedProbe:
    """Per-cell head on tokens ``[n, cells, C]`` (already on the evaluation grid) for bool ``labels [n, cells]``:
    BCE with a positive-class weight (occupied cells are rare), ``epochs`` AdamW steps on minibatches of
    :data:`OCCUPANCY_BATCH_FRAMES` frames; the threshold maximises IoU on the training frames."""
    import torch
    import torch.nn.functional as F

    x = np.asarray(tokens, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] != np.asarray(labels).shape[1]:
        raise ValueError(f"occupancy probe: tokens {x.shape} do not match labels {np.asarray(labels).shape}")
    x_mean, x_std = _standardise(x, (0, 1))
    torch.manual_seed(seed)
    module = _cell_module(kind, x.shape[2], x.shape[1], hidden)
    y = np.asarray(labels, dtype=np.float32)
    pos = float(y.mean())
    pos_weight = torch.tensor((1 - pos) / pos if 0 < pos < 1 else 1.0).clamp(max=50.0)
    xt, yt = torch.from_numpy((x - x_mean) / x_std), torch.from_numpy(y)
    draw = torch.Generator().manual_seed(seed)

    def loss():
        rows = torch.randint(len(xt), (OCCUPANCY_BATCH_FRAMES,), generator=draw) if len(xt) > OCCUPANCY_BATCH_FRAMES \
            else slice(None)
        return F.binary_cross_entropy_with_logits(module(xt[rows]), yt[rows], pos_weight=pos_weight)

    _train(module, loss, epochs, lr, weight_decay, seed, OCCUPANCY_BATCH_FRAMES * x.shape[1] * x.shape[2])
    probe = FittedProbe("occupancy", kind, module, x_mean, x_std)
    probe.threshold = best_threshold(probe.predict(x), y.astype(bool))
    return probe


def ridge_cv(x: np.ndarray, y: np.ndarray, groups: np.ndarray, alphas=RIDGE_ALPHAS,
             folds: int = CV_FOLDS) -> tuple[np.ndarray, float, float, dict]:
    """Ridge regression of ``y [n]`` on ``x [n, F]`` with the strength chosen by ``folds``-fold cross-validation
    over ``groups`` (whole scenes per fold: neighbouring frames of one scene are nearly the same, so splitting them
    would choose too weak a ridge). Solved in the dual (``n`` is far below ``F`` for token grids): returns
    (weights [F], bias, chosen alpha, validation MSE per alpha)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    unique = np.unique(groups)
    k = max(1, min(folds, len(unique)))
    fold_of = {g: i % k for i, g in enumerate(unique)}
    fold = np.array([fold_of[g] for g in groups])
    errors = {float(a): 0.0 for a in alphas}
    if k >= 2:
        for f in range(k):
            tr, va = fold != f, fold == f
            mu = y[tr].mean()
            evals, evecs = np.linalg.eigh(x[tr] @ x[tr].T)
            proj = evecs.T @ (y[tr] - mu)
            cross = x[va] @ x[tr].T @ evecs
            for a in alphas:
                errors[float(a)] += float(np.sum((cross @ (proj / (evals + a)) + mu - y[va]) ** 2))
        best = min(errors, key=errors.get)
    else:
        best = float(np.median(alphas))
    mu = y.mean()
    dual = np.linalg.solve(x @ x.T + best * np.eye(len(x)), y - mu)
    return x.T @ dual, float(mu), best, {str(a): e / len(y) for a, e in errors.items()}


def fit_regression_probe(task: str, kind: str, tokens: np.ndarray, labels: np.ndarray, groups: np.ndarray, *,
                         epochs: int, lr: float, weight_decay: float, hidden: int, seed: int) -> FittedProbe:
    """``linear``: ridge on every token, strength by scene-grouped cross-validation; ``mlp``: a two-layer MLP on the
    4 x 4-pooled tokens, full-batch AdamW."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    y = np.asarray(labels, dtype=np.float64)
    y_mean, y_std = float(y.mean()), float(y.std()) or 1.0
    probe = FittedProbe(task, kind, None, np.zeros(1, np.float32), np.ones(1, np.float32), y_mean, y_std)
    x = probe.inputs(tokens)
    probe.x_mean, probe.x_std = _standardise(x, 0)
    xs = (x - probe.x_mean) / probe.x_std
    ys = (y - y_mean) / y_std
    if kind == "linear":
        w, b, alpha, _ = ridge_cv(xs, ys, np.asarray(groups))
        module = nn.Linear(xs.shape[1], 1)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w[None].astype(np.float32)))
            module.bias.fill_(b)
        probe.extra = {"ridge_alpha": alpha}
    else:
        torch.manual_seed(seed)
        module = _mlp(xs.shape[1], 1, hidden)
        xt, yt = torch.from_numpy(xs.astype(np.float32)), torch.from_numpy(ys.astype(np.float32))[:, None]
        _train(module, lambda: F.mse_loss(module(xt), yt), epochs, lr, weight_decay, seed, xs.size)
    probe.module = module.eval()
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
