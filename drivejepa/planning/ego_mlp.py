"""The ego-status baseline (AD-MLP / Ego-MLP): the 3 s plan from the ego's own past motion and the route command.

On nuScenes open loop an MLP that sees only the ego's status matches full perception stacks (AD-MLP, BEV-Planner's
Ego-MLP), so every planning number is reported beside it. Input: the last ``past_steps`` actions (dx, dy, dyaw,
speed, yaw rate of each 0.5 s interval, scaled by the predictor's ``ACTION_SCALES``) and the command one-hot;
output: the controls of the next ``horizon`` steps, driven the planner's way (``motion.py``) into a trajectory, so
its plans are feasible actions a closed-loop driver can execute. Trained with the mean L2 distance of the
trajectory's positions on the train split's windows, the same data the world model trained on; saved beside the run
like the cost heads (``artifacts.py``: ``RUN/ego_mlp/<stem>-<settings digest>.pt``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from drivejepa.artifacts import artifact_path, changed_settings, find_artifact, module_from_state, save_module
from drivejepa.errors import UserError
from drivejepa.planning.motion import controls_to_actions, integrate
from drivejepa.models.predictor import ACTION_SCALES
from drivejepa.planning.route import COMMANDS

KIND = "ego_mlp"
FORMAT = 1


@dataclasses.dataclass
class EgoSpec:
    past_steps: int
    horizon: int
    frame_seconds: float
    hidden: int = 128


class EgoMLP(nn.Module):
    """(past actions ``[B, P, 5]``, command ``[B]``) -> controls ``[B, H, 2]`` (speed >= 0, yaw rate)."""

    def __init__(self, spec: EgoSpec):
        super().__init__()
        self.spec = spec
        n_in = spec.past_steps * 5 + len(COMMANDS)
        self.net = nn.Sequential(nn.Linear(n_in, spec.hidden), nn.GELU(), nn.Linear(spec.hidden, spec.hidden),
                                 nn.GELU(), nn.Linear(spec.hidden, spec.horizon * 2))
        self.register_buffer("scales", torch.tensor(ACTION_SCALES))

    def forward(self, past: torch.Tensor, command: torch.Tensor) -> torch.Tensor:
        x = torch.cat([(past / self.scales).flatten(1), nn.functional.one_hot(command, len(COMMANDS)).float()], 1)
        out = self.net(x).view(-1, self.spec.horizon, 2)
        speed_now = past[:, -1, 3:4]
        speed = nn.functional.softplus(speed_now + out[..., 0] * self.scales[3] / 4)   # a change from now, >= 0
        return torch.stack([speed, out[..., 1] * self.scales[4] / 4], dim=-1)

    @torch.no_grad()
    def plan(self, past_actions, command) -> tuple[np.ndarray, np.ndarray]:
        """Numpy (actions ``[B, H, 5]``, trajectory ``[B, H + 1, 3]``) of past actions ``[B, >=P, 5]`` and command
        indices ``[B]``."""
        past = torch.as_tensor(np.asarray(past_actions, dtype=np.float32)[:, -self.spec.past_steps:])
        controls = self(past, torch.as_tensor(np.asarray(command), dtype=torch.long))
        actions = controls_to_actions(controls, self.spec.frame_seconds)
        return actions.numpy(), integrate(actions).numpy()


def trajectory_loss(model: EgoMLP, past, command, truth_xy) -> torch.Tensor:
    actions = controls_to_actions(model(past, command), model.spec.frame_seconds)
    return (integrate(actions)[:, 1:, :2] - truth_xy).norm(dim=-1).mean()


def fit_ego_mlp(windows, spec: EgoSpec, cfg, progress: bool = True) -> EgoMLP:
    """Fit on ``windows`` (``planning.windows.Windows``); ``cfg`` is a ``config.EgoMLPConfig``."""
    from tqdm import tqdm

    from drivejepa.runtime import torch_threads

    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):                  # seeded weights; the caller's random state untouched
        torch.manual_seed(cfg.seed)
        model = EgoMLP(spec)
    past = torch.from_numpy(np.ascontiguousarray(windows.past[:, -spec.past_steps:], dtype=np.float32))
    command = torch.from_numpy(np.asarray(windows.command, dtype=np.int64))
    truth = torch.from_numpy(np.ascontiguousarray(windows.truth[:, 1:spec.horizon + 1, :2], dtype=np.float32))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    with torch_threads(1):
        bar = tqdm(range(cfg.steps), desc="fitting the ego-status MLP", unit="step", disable=not progress,
                   leave=False)
        for _ in bar:
            idx = torch.randint(0, len(past), (min(cfg.batch_size, len(past)),), generator=gen)
            loss = trajectory_loss(model, past[idx], command[idx], truth[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(l2=f"{loss.item():.2f}", refresh=False)
    return model.eval()


def ego_mlp_settings(shard_dir: str | Path, plan_cfg) -> dict:
    """What the MLP depends on besides its checkpoint: the shards it is fitted on (resolved), the ``ego_mlp``
    section, the horizon and the step length."""
    return {"shards": str(Path(shard_dir).resolve()), "config": dataclasses.asdict(plan_cfg.ego_mlp),
            "horizon": int(plan_cfg.horizon), "frame_seconds": float(plan_cfg.frame_seconds)}


def ego_mlp_path(checkpoint: str | Path, settings: dict) -> Path:
    return artifact_path(checkpoint, KIND, settings)


def save_ego_mlp(path, model: EgoMLP, meta: dict) -> Path:
    return save_module(path, model, model.spec, meta, FORMAT)


def ego_mlp_from_state(state: dict, path) -> tuple[EgoMLP, dict]:
    return module_from_state(state, path, lambda spec: EgoMLP(EgoSpec(**spec)), "ego-status MLP", FORMAT)


def ensure_ego_mlp(checkpoint: str | Path, train_cfg, shard_dir: str | Path, plan_cfg, *, retrain: bool = False,
                   progress: bool = True) -> tuple[EgoMLP, dict, Path]:
    """The ego-status MLP saved beside this checkpoint's run for these settings (:func:`ego_mlp_settings`; unless
    ``retrain``), or one fitted on the run's train split (every window of its factual scenes,
    ``decoder_training.split_scenes``: the counterfactual branches the world model also trained on are left out)
    and saved there."""
    from drivejepa.data.shards import read_shard, shard_path
    from drivejepa.evaluation.latents import window_starts
    from drivejepa.io import file_sha256
    from drivejepa.planning.heads import agent_ids
    from drivejepa.planning.windows import concatenate, scene_windows
    from drivejepa.visualization.decoder_training import split_scenes

    e = plan_cfg.ego_mlp
    settings = ego_mlp_settings(shard_dir, plan_cfg)
    path = ego_mlp_path(checkpoint, settings)
    state = None if retrain else find_artifact(checkpoint, KIND, "ego-status MLP", settings=settings)
    if state is not None:
        model, meta = ego_mlp_from_state(state, path)
        changed = changed_settings(meta, settings)
        if changed is None:
            return model, meta, path
        logging.getLogger(__name__).info("%s was fitted with other settings (%s); refitting", path, changed)
    t0 = time.perf_counter()
    train_scenes, _ = split_scenes(shard_dir, train_cfg)
    ids = agent_ids(plan_cfg.agent_classes)
    parts = []
    for scene in train_scenes:
        shard = read_shard(shard_path(shard_dir, scene))
        frames = np.asarray(shard.meta.get("frame_indices", np.arange(shard.frames)))
        starts = window_starts(shard.frames, 1, plan_cfg.horizon, np.asarray(shard.arrays["action_valid"], bool),
                               frames)
        parts.append(scene_windows(shard, 1, plan_cfg.horizon, e.past_steps, plan_cfg, ids, starts=starts))
    windows = concatenate(parts)
    if windows is None:
        raise UserError(f"{shard_dir}: no window of {plan_cfg.horizon} key frames in the train scenes to fit the "
                        "ego-status MLP on")
    spec = EgoSpec(past_steps=e.past_steps, horizon=plan_cfg.horizon, frame_seconds=plan_cfg.frame_seconds,
                   hidden=e.hidden)
    model = fit_ego_mlp(windows, spec, e, progress=progress)
    with torch.no_grad():
        train_l2 = float(trajectory_loss(model, torch.from_numpy(windows.past[:, -e.past_steps:].astype(np.float32)),
                                         torch.from_numpy(windows.command),
                                         torch.from_numpy(windows.truth[:, 1:, :2].astype(np.float32))))
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), **settings,
            "train_scenes": train_scenes, "train_windows": len(windows), "train_mean_l2_m": round(train_l2, 4),
            "fit_seconds": round(time.perf_counter() - t0, 2)}
    save_ego_mlp(path, model, meta)
    logging.getLogger(__name__).info("ego-status MLP saved to %s (%.1f s)", path, meta["fit_seconds"])
    return model, meta, path
