"""The planner's cost heads: per-cell logits of agent occupancy and drivable area, read from state tokens.

Both heads read FROZEN target-encoder tokens (the world model never changes): each token ``[C]`` of the model's
``G x G`` grid, with the tokens around it (``neighbourhood`` r: the ``(2r+1) x (2r+1)`` block centred on it, tokens
beyond the grid reading the training mean), gives ``subcells x subcells`` logits per task through one shared linear
map or MLP, plus a learned bias per output cell (what that place around the ego usually holds: the ego's own cells
are drivable), so states ``[..., N, C]`` become logits ``[..., 2, G*s, G*s]`` over the model's ``[-R, R]`` (cell
``I * G*s + J`` for x bin I and y bin J, as ``evaluation.probes.grid_centers``). A car on 4 m tokens straddles
their borders, so a token alone says little of which of its 1 m cells are taken: on the demo checkpoint's val key
frames (the planner's settings), occupancy IoU 0.392 with the 3 x 3 block against 0.314 with the token alone, log
loss 0.092 against 0.111 (rollout set: 0.271 against 0.236); a longer fit gave 0.420 against 0.327, and 5 x 5
0.424. Tokens are standardised per channel with the training set's statistics, in the model's latent space
(``latent_space.targets``), which is where its predictions live
(``latent_space.predictions``), so the heads read rollouts as they read encoder states.

Two sets (:class:`PlanningHeads`), because a prediction is not an encoder state: ``states`` read what the encoder
sees now (the planner's static floor), ``rollouts`` read the model's predictions and are fitted on its own rollouts
under the logged actions (the train scenes and their counterfactual branches), labelled with the true future frame.
An MSE-trained rollout blurs a car it is unsure of; heads fitted on encoder states read that blur as an empty
road, heads fitted on rollouts read it as the probability that the cell is occupied given what the model predicts
(the demo checkpoint's val rollouts: occupancy log loss 0.169 against 0.128, IoU 0.09 against 0.24).

Labels: occupancy is the evaluation's agent-footprint grid (``evaluation.probes.occupancy_grid``), the drivable area
the shards' drivable grid (``data/drivable.py``) read at the heads' cell centres. Fitted with AdamW on the train
split, scored on the held-out split (IoU at the threshold that is best on train beside the prior grid that ignores
the tokens, and log loss), saved beside the run for the exact checkpoint and settings (``artifacts.py``:
``RUN/planning_heads/<stem>-<settings digest>.pt``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from drivejepa.artifacts import artifact_path, changed_settings, find_artifact, module_from_state, save_module
from drivejepa.errors import UserError
from drivejepa.evaluation.probes import token_head

log = logging.getLogger(__name__)

TASKS = ("occupancy", "drivable")
KIND = "planning_heads"
FORMAT = 4                          # 2: probabilities calibrated (the positives' weight taken out of the bias);
                                    # 3: a second set fitted on the model's rollouts; 4: the tokens' neighbourhood


@dataclasses.dataclass
class HeadSpec:
    channels: int                      # C of a state token
    bev_size: int                      # G: the model's grid
    bev_range: float                   # R: the grid covers [-R, R] metres
    subcells: int = 4
    hidden: int = 64
    kind: str = "mlp"
    neighbourhood: int = 0             # r: each token is read with the (2r+1) x (2r+1) tokens centred on it

    @property
    def grid(self) -> int:
        return self.bev_size * self.subcells

    @classmethod
    def of(cls, model, heads_cfg) -> "HeadSpec":
        """The spec of a model's grid and a ``config.HeadsConfig``."""
        return cls(channels=int(model.latent_dim), bev_size=int(model.bev_size), bev_range=float(model.bev_range),
                   subcells=heads_cfg.subcells, hidden=heads_cfg.hidden, kind=heads_cfg.kind,
                   neighbourhood=heads_cfg.neighbourhood)

    @property
    def inputs(self) -> int:
        """Width of what the shared head reads for one token."""
        return self.channels * (2 * self.neighbourhood + 1) ** 2


class CostHeads(nn.Module):
    """States ``[..., N, C]`` (N = G*G) -> logits ``[..., 2, G*s, G*s]`` (occupancy, drivable)."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec
        c, s, t = spec.channels, spec.subcells, len(TASKS)
        self.head = token_head(spec.kind, spec.inputs, t * s * s, spec.hidden)   # the occupancy probe's kind of head
        self.bias = nn.Parameter(torch.zeros(t, spec.grid, spec.grid))
        self.register_buffer("mean", torch.zeros(c))
        self.register_buffer("std", torch.ones(c))
        self.register_buffer("threshold", torch.full((t,), 0.5))
        self.register_buffer("around", neighbours(spec.bev_size, spec.neighbourhood), persistent=False)

    def read(self, states: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the head reads ``[..., K, inputs]`` for the tokens ``tokens`` ``[K]`` (default: all) of states
        ``[..., N, C]``: each standardised, with its neighbourhood (outside the grid: 0, the training mean)."""
        x = states.float()
        if self.spec.neighbourhood == 0:                                                 # the token alone
            return ((x if tokens is None else x.index_select(-2, tokens)) - self.mean) / self.std
        around = self.around if tokens is None else self.around[tokens]                   # [K, (2r+1)^2]
        x = torch.cat([x, self.mean.expand(*x.shape[:-2], 1, -1)], dim=-2)                # index N: outside
        x = (x.index_select(-2, around.flatten()) - self.mean) / self.std
        return x.flatten(-2).unflatten(-1, (len(around), -1))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        g, s, t = self.spec.bev_size, self.spec.subcells, len(TASKS)
        lead = states.shape[:-2]
        if states.shape[-2] != g * g:
            raise ValueError(f"states with {states.shape[-2]} tokens do not fit the heads' {g} x {g} grid")
        out = self.head(self.read(states))                                              # [..., G*G, T*s*s]
        out = out.reshape(-1, g, g, t, s, s).permute(0, 3, 1, 4, 2, 5)               # [n, T, G, s, G, s]
        return out.reshape(*lead, t, g * s, g * s) + self.bias

    def probabilities(self, states: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(states))

    def token_of(self, cells: torch.Tensor) -> torch.Tensor:
        """The state token ``[M]`` that holds each output cell of ``cells`` (``[M]`` flat indices ``I * G*s + J``)."""
        g, s = self.spec.bev_size, self.spec.subcells
        row, col = cells // (g * s), cells % (g * s)
        return (row // s) * g + col // s

    def logits_at(self, states: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., 2, M]`` of the output cells ``cells`` (``[M]`` flat indices ``I * G*s + J``) only: the
        tokens holding them go through the head, nothing else (the planner reads the few cells under the ego)."""
        g, s, t = self.spec.bev_size, self.spec.subcells, len(TASKS)
        row, col = cells // (g * s), cells % (g * s)
        tokens, which = torch.unique(self.token_of(cells), return_inverse=True)
        out = self.head(self.read(states, tokens)).unflatten(-1, (t, s * s))[..., which, :, :]   # [..., M, T, s*s]
        sub = ((row % s) * s + col % s).view(-1, 1, 1).expand(*out.shape[:-1], 1)
        picked = out.gather(-1, sub)[..., 0].transpose(-1, -2)                          # [..., T, M]
        return picked + self.bias[:, row, col]


def neighbours(grid: int, radius: int) -> torch.Tensor:
    """``[G*G, (2r+1)^2]`` token indices of each token's block, row-major, centred on it; ``G*G`` where the block
    leaves the grid."""
    i, j = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    d = torch.arange(-radius, radius + 1)
    di, dj = torch.meshgrid(d, d, indexing="ij")
    ri, rj = i.reshape(-1, 1) + di.reshape(1, -1), j.reshape(-1, 1) + dj.reshape(1, -1)
    inside = (ri >= 0) & (ri < grid) & (rj >= 0) & (rj < grid)
    return torch.where(inside, ri * grid + rj, torch.full_like(ri, grid * grid))


class PlanningHeads(nn.Module):
    """The planner's two sets of cost heads of one spec: ``states`` for encoder states, ``rollouts`` for the model's
    predictions (the same weights as ``states`` when none were fitted on rollouts)."""

    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.spec = spec
        self.states = CostHeads(spec)
        self.rollouts = CostHeads(spec)

    @classmethod
    def of(cls, states: CostHeads, rollouts: Optional[CostHeads] = None) -> "PlanningHeads":
        heads = cls(states.spec)
        heads.states.load_state_dict(states.state_dict())
        heads.rollouts.load_state_dict((rollouts or states).state_dict())
        return heads.eval()


# ----------------------------------------------------------------------------------------------------------------
# Labels and data
# ----------------------------------------------------------------------------------------------------------------
def frame_labels(arrays, spec: HeadSpec, drivable_range: float, agent_ids: np.ndarray) -> np.ndarray:
    """Bool ``[T, 2, G*s, G*s]`` labels of every key frame of a shard: agent footprints and drivable area."""
    from drivejepa.data.drivable import sample_grid
    from drivejepa.evaluation.probes import agent_mask, grid_centers, occupancy_grid

    g, r = spec.grid, spec.bev_range
    boxes = np.asarray(arrays["boxes"], dtype=np.float64)
    keep = agent_mask(np.asarray(arrays["box_labels"]), np.asarray(arrays["box_mask"]), agent_ids)
    occ = np.stack([occupancy_grid(b[k, :2], b[k, 6], b[k, 3:5], g, r) for b, k in zip(boxes, keep)])
    drivable = sample_grid(np.asarray(arrays["drivable"]), drivable_range, grid_centers(g, r))
    return np.stack([occ, drivable], axis=1).reshape(len(boxes), len(TASKS), g, g)


def agent_ids(classes) -> np.ndarray:
    """Indices in ``shards.CLASSES`` of the agent classes the occupancy head (and the collision rate) count."""
    from drivejepa.data.shards import CLASSES

    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise UserError(f"agent_classes: {unknown} are not detection classes ({', '.join(CLASSES)})")
    return np.array([CLASSES.index(c) for c in classes])


def model_device(model) -> torch.device:
    """Where the model's weights are (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def scene_data(model, shard, spec: HeadSpec, drivable_range: float, ids: np.ndarray, *, states: bool = True,
               context: int = 0, horizon: int = 0, stride: int = 1, shared: int = -1) -> dict:
    """What one shard gives the heads, each (inputs ``[n, N, C]`` in the model's latent space, labels ``[n, 2, G*s,
    G*s]``): ``states``, its key frames' target-encoder states; with ``horizon`` > 0, ``rollouts``, the model rolled
    out ``horizon`` steps from every ``stride``-th window (``context`` frames) under the logged actions, each step
    labelled with its true frame. ``shared`` is a branch's last key frame shared with its parent (-1 for a factual
    scene): only windows whose future passes it are rolled out (the others are the parent's)."""
    from drivejepa import latent_space
    from drivejepa.evaluation.latents import encode_frames, rollout_windows, window_actions, window_starts
    from drivejepa.visualization.decoder_training import camera_index

    _, target = encode_frames(model, shard.arrays, shard.frames, 16, model_device(model), camera_index(shard, model),
                              with_online=False)
    labels = frame_labels(shard.arrays, spec, drivable_range, ids)
    out = {"states": (latent_space.targets(target, model.space), labels)} if states else {}
    if horizon > 0:
        frames = np.asarray(shard.meta.get("frame_indices", np.arange(shard.frames)))
        starts = window_starts(shard.frames, context, horizon, np.asarray(shard.arrays["action_valid"], dtype=bool),
                               frames)
        starts = starts[frames[starts + horizon] > shared][::stride]
        future, past = window_actions(shard.arrays["actions"], starts, context, horizon)
        pred = rollout_windows(model, target, starts, context, future, past, 32, model_device(model))
        pred = latent_space.predictions(torch.from_numpy(pred), model.space).numpy()
        index = starts[:, None] + np.arange(1, horizon + 1)
        out["rollouts"] = (pred.reshape(-1, *pred.shape[2:]), labels[index.reshape(-1)])
    return out


def collect(model, shard_dir, scenes: list[str], spec: HeadSpec, drivable_range: float, ids, *, max_frames: int,
            context: int = 0, horizon: int = 0, stride: int = 1, max_rollout_frames: int = 0,
            progress: bool = True) -> dict:
    """``{"states": (x, y)[, "rollouts": (x, y)]}`` over ``scenes`` (:func:`scene_data`; encoder states of the
    factual scenes, rollouts of every scene and branch), each source up to its cap (rollouts: a seeded sample)."""
    from tqdm import tqdm

    from drivejepa.data.shards import load_manifest, read_shard, shard_path
    from drivejepa.data.synth.scenarios import branch_of

    described = load_manifest(shard_dir)["scenes"]
    parts: dict[str, list] = {"states": [], "rollouts": []}
    counts = {"states": 0, "rollouts": 0}
    for scene in tqdm(scenes, desc="cost heads: encoding and rolling out", unit="scene", disable=not progress,
                      leave=False):
        branch = branch_of(described.get(scene, {}).get("description", ""))
        want_states = branch is None and counts["states"] < max_frames
        want_rollouts = horizon > 0 and counts["rollouts"] < 2 * max_rollout_frames
        if not (want_states or want_rollouts):
            continue
        got = scene_data(model, read_shard(shard_path(shard_dir, scene)), spec, drivable_range, ids,
                         states=want_states, context=context, horizon=horizon if want_rollouts else 0,
                         stride=stride, shared=-1 if branch is None else branch["frame"])
        for source, pair in got.items():
            parts[source].append(pair)
            counts[source] += len(pair[0])
    if not parts["states"]:
        raise UserError(f"{shard_dir}: no scenes to fit the planner's cost heads on")
    out = {}
    for source, pairs in parts.items():
        if pairs:
            x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
            cap = max_frames if source == "states" else max_rollout_frames
            if len(x) > cap:
                keep = np.sort(np.random.default_rng(0).choice(len(x), cap, replace=False))
                x, y = x[keep], y[keep]
            out[source] = (x, y)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fitting, scoring, storage
# ----------------------------------------------------------------------------------------------------------------
def fit_heads(states: np.ndarray, labels: np.ndarray, spec: HeadSpec, cfg, progress: bool = True,
              steps: Optional[int] = None) -> CostHeads:
    """Fit both heads on (states ``[n, N, C]``, bool labels ``[n, 2, G*s, G*s]``); ``cfg`` is a
    ``config.HeadsConfig`` (``steps`` overrides its ``steps``). Occupancy's rare positive cells are weighted up (as
    the occupancy probe does), which learns logits shifted by log(pos_weight) (the minimiser of the weighted loss
    for a cell occupied with probability p is logit(p) + log w); the shift is taken back out of the bias after the
    fit, so the costs read calibrated probabilities (with it, a cell occupied 5% of the time read 0.5, and the empty
    lane ahead 0.5-0.9)."""
    from tqdm import tqdm

    from drivejepa.evaluation.probes import best_threshold
    from drivejepa.runtime import torch_threads

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):                  # seeded weights; the caller's random state untouched
        torch.manual_seed(cfg.seed)
        heads = CostHeads(spec)
    x = torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))
    heads.mean.copy_(x.mean(dim=(0, 1)))
    heads.std.copy_(x.std(dim=(0, 1)) + 1e-6)
    prior = y.mean(dim=0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        heads.bias.copy_(torch.log(prior / (1 - prior)))
    positive = y.mean(dim=(0, 2, 3)).clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - positive) / positive).clamp(max=50.0)[:, None, None]
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=1e-4)
    with torch_threads(1):
        heads.train()
        bar = tqdm(range(steps or cfg.steps), desc="fitting cost heads", unit="step", disable=not progress, leave=False)
        for _ in bar:
            idx = torch.randint(0, len(x), (min(cfg.batch_size, len(x)),), generator=gen)
            loss = F.binary_cross_entropy_with_logits(heads(x[idx]), y[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        heads.eval()
        with torch.no_grad():
            heads.bias.sub_(torch.log(pos_weight))
        prob = predict(heads, states)
    truth = np.asarray(labels, dtype=bool)
    heads.threshold.copy_(torch.tensor([best_threshold(prob[:, t], truth[:, t]) for t in range(len(TASKS))]))
    return heads


@torch.no_grad()
def predict(heads: CostHeads, states: np.ndarray, batch: int = 256) -> np.ndarray:
    """Probabilities ``[n, 2, G*s, G*s]`` of states ``[n, N, C]`` (numpy)."""
    out = [heads.probabilities(torch.from_numpy(np.ascontiguousarray(states[i:i + batch], dtype=np.float32)))
           for i in range(0, len(states), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(TASKS), heads.spec.grid, heads.spec.grid))


def score_heads(heads: CostHeads, states: np.ndarray, labels: np.ndarray, train_labels: np.ndarray) -> dict:
    """IoU and log loss (per cell) of each head on (states, labels) beside the prior grid fitted to ``train_labels``
    (tokens ignored)."""
    from drivejepa.evaluation.probes import iou, prior_grid

    prob = predict(heads, states)
    truth = np.asarray(labels, dtype=bool)
    out = {"frames": int(len(states))}
    for t, task in enumerate(TASKS):
        p = np.clip(prob[:, t], 1e-6, 1 - 1e-6)
        prior = prior_grid(np.asarray(train_labels[:, t], dtype=bool).reshape(len(train_labels), -1))
        out[task] = {"iou": iou(prob[:, t] >= float(heads.threshold[t]), truth[:, t]),
                     "prior_iou": iou(np.broadcast_to(prior.reshape(truth.shape[-2:]), truth[:, t].shape),
                                      truth[:, t]),
                     "log_loss": float(-np.where(truth[:, t], np.log(p), np.log1p(-p)).mean()),
                     "positive_share": float(truth[:, t].mean())}
    return out


def score_planning_heads(heads: PlanningHeads, data: dict, train: dict) -> dict:
    """Scores of each set on its own source of ``data`` (:func:`collect`'s dict), and of the state heads on the
    rollouts (what reading predictions with heads fitted on encoder states gives)."""
    out = {"states": score_heads(heads.states, *data["states"], train["states"][1])}
    if "rollouts" in data:
        out["rollouts"] = score_heads(heads.rollouts, *data["rollouts"], train["states"][1])
        out["state_heads_on_rollouts"] = score_heads(heads.states, *data["rollouts"], train["states"][1])
    return out


def heads_settings(shard_dir: str | Path, plan_cfg) -> dict:
    """What a set of heads depends on besides its checkpoint: the shards it is fitted on (resolved), the ``heads``
    section, the horizon of the rollouts and the agent classes."""
    return {"shards": str(Path(shard_dir).resolve()), "config": dataclasses.asdict(plan_cfg.heads),
            "horizon": int(plan_cfg.horizon), "agent_classes": list(plan_cfg.agent_classes)}


def heads_path(checkpoint: str | Path, settings: dict) -> Path:
    return artifact_path(checkpoint, KIND, settings)


def find_heads(checkpoint: str | Path, settings: dict) -> Optional[tuple["PlanningHeads", dict]]:
    """(heads, meta) saved for this checkpoint and these settings (:func:`heads_settings`), else None."""
    state = find_artifact(checkpoint, KIND, "cost heads", FORMAT, settings)
    return None if state is None else heads_from_state(state, heads_path(checkpoint, settings))


def save_heads(path: str | Path, heads: PlanningHeads, meta: dict) -> Path:
    return save_module(path, heads, heads.spec, meta, FORMAT)


def heads_from_state(state: dict, path) -> tuple[PlanningHeads, dict]:
    return module_from_state(state, path, lambda spec: PlanningHeads(HeadSpec(**spec)), "set of cost heads", FORMAT)


def ensure_heads(checkpoint: str | Path, model, train_cfg, shard_dir: str | Path, plan_cfg, *,
                 retrain: bool = False, progress: bool = True) -> tuple[PlanningHeads, dict, Path]:
    """The heads saved for this checkpoint and these settings (:func:`heads_settings`; unless ``retrain``), or new
    ones fitted on the run's train split (the rollout set also on the train scenes' branches), scored on its
    held-out split and saved beside the run. Returns (heads, meta, path)."""
    from drivejepa.data.shards import load_manifest
    from drivejepa.io import file_sha256
    from drivejepa.visualization.decoder_training import split_scenes

    h = plan_cfg.heads
    settings = heads_settings(shard_dir, plan_cfg)
    path = heads_path(checkpoint, settings)
    found = None if retrain else find_heads(checkpoint, settings)
    if found is not None:
        heads, meta = found
        changed = changed_settings(meta, settings)
        if changed is None:
            return heads, meta, path
        log.info("%s was fitted with other settings (%s); refitting", path, changed)
    t0 = time.perf_counter()
    pre = load_manifest(shard_dir).get("config", {})
    if "drivable_range" not in pre:
        raise UserError(f"{shard_dir}: shards without a drivable grid (schema < 3); preprocess again")
    spec = HeadSpec.of(model, h)
    ids = agent_ids(plan_cfg.agent_classes)
    train_scenes, held_scenes = split_scenes(shard_dir, train_cfg)
    with_branches = sorted(set(train_scenes) | set(_split_or_none(shard_dir, train_cfg.data.train_split)))
    windows = {"context": int(train_cfg.data.context), "horizon": int(plan_cfg.horizon) if h.rollouts else 0,
               "stride": h.rollout_stride, "max_rollout_frames": h.max_rollout_frames}
    train = collect(model, shard_dir, with_branches, spec, float(pre["drivable_range"]), ids,
                    max_frames=h.max_train_frames, progress=progress, **windows)
    states = fit_heads(*train["states"], spec, h, progress=progress)
    rollouts = fit_heads(*train["rollouts"], spec, h, progress=progress, steps=h.rollout_steps) \
        if "rollouts" in train else None
    heads = PlanningHeads.of(states, rollouts)
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), **settings,
            "train_scenes": with_branches, "held_out_scenes": held_scenes,
            "train_frames": {k: int(len(v[0])) for k, v in train.items()},
            "train_scores": score_planning_heads(heads, train, train)}
    if held_scenes:
        held = collect(model, shard_dir, held_scenes, spec, float(pre["drivable_range"]), ids,
                       max_frames=h.max_train_frames, progress=False, **windows)
        meta["held_out_scores"] = score_planning_heads(heads, held, train)
    meta["fit_seconds"] = round(time.perf_counter() - t0, 2)
    save_heads(path, heads, meta)
    log.info("planner cost heads saved to %s (%.1f s)", path, meta["fit_seconds"])
    return heads, meta, path


def _split_or_none(shard_dir, split: str) -> list[str]:
    """Every scene of ``split``, branches included (none when the shards have no such split)."""
    from drivejepa.data.shards import readable_scenes, scenes_in_split

    try:
        return readable_scenes(shard_dir, scenes_in_split(shard_dir, split), "the planner's cost heads")[0]
    except UserError:
        return []
