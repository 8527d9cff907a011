"""The planners as closed-loop drivers of ``drivejepa drive`` (factories for ``kind: factory`` in a drive config).

    - {name: world_model, kind: factory, factory: "drivejepa.planning.drivers:world_model",
       options: {checkpoint: RUN/checkpoints/best.pt, shards: SHARDS}}
    - {name: ego_mlp, kind: factory, factory: "drivejepa.planning.drivers:ego_mlp",
       options: {checkpoint: RUN/checkpoints/best.pt, shards: SHARDS}}

``shards`` are the shards the checkpoint was trained on: the cost heads and the ego-status MLP are fitted on their
train split the first time (``drivejepa drive`` builds each factory driver once before its workers start, so they
are fitted once; kept beside the run, ``artifacts.py``), exactly as ``drivejepa plan`` and the
evaluation's planning section use them. Each key frame the world-model planner encodes the last ``context`` frames
the simulator rendered (through the preprocessing code, like a shard) and plans 3 s by MPC in latent space,
warm-started from its previous plan; the ego-status MLP maps the realised past actions and the route command to its
3 s plan. The first action of the plan is executed.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _plan_config(config: Optional[str], overrides):
    """The PlanConfig of ``config`` (default pipelines/plan.yaml) with ``overrides`` (key=value strings)."""
    from drivejepa.commands.plan import default_config
    from drivejepa.config import PlanConfig, load_config

    return load_config(PlanConfig, config or default_config(), list(overrides))


class WorldModelDriver:
    """MPC over the world model (planning/planner.py) as a driver (driving/drivers.py's protocol)."""

    def __init__(self, checkpoint: str, shards: str, config: Optional[str] = None, overrides=()):
        from drivejepa.planning.heads import ensure_heads
        from drivejepa.planning.planner import Planner
        from drivejepa.runtime import select_device
        from drivejepa.training.checkpoint import load_world_model

        cfg = _plan_config(config, overrides)
        device = select_device(cfg.device)
        model, train_cfg = load_world_model(checkpoint, device)
        heads, _, _ = ensure_heads(checkpoint, model, train_cfg, shards, cfg, progress=False)
        self.planner = Planner(model, heads, cfg, device=device)
        self.context = int(train_cfg.data.context)
        self.cameras = list(model.cameras)
        self.name = "world_model"

    def reset(self, info) -> None:
        missing = [c for c in self.cameras if c not in info.cameras]
        if missing:
            raise ValueError(f"the world model reads cameras {missing} that the drive config's observation lacks")
        self.camera_index = [list(info.cameras).index(c) for c in self.cameras]
        self.intrinsics = info.intrinsics
        self.planner.reset()

    def act(self, history: list, status, command: str):
        from drivejepa.driving.drivers import Action, window
        from drivejepa.planning.planner import observation_history

        if len(history) < self.context:
            raise ValueError(f"the world-model planner needs {self.context} observed key frames, got {len(history)}")
        frames = window(history, status, self.context)
        frames["cam_intrinsics"] = self.intrinsics()
        obs = observation_history(frames, np.arange(self.context), self.camera_index)
        past = np.asarray(status.past_actions, dtype=np.float32).reshape(-1, 5)
        plan = self.planner.plan(obs, past, command)
        return Action(plan.actions[0], plan=plan.trajectory[1:], candidates=plan.candidates[:, 1:])


class EgoMLPDriver:
    """The ego-status MLP (AD-MLP / Ego-MLP, planning/ego_mlp.py): past motion and route command only."""

    def __init__(self, checkpoint: str, shards: str, config: Optional[str] = None, overrides=()):
        from drivejepa.planning.ego_mlp import ensure_ego_mlp
        from drivejepa.training.checkpoint import config_of, load_checkpoint

        cfg = _plan_config(config, overrides)
        train_cfg = config_of(load_checkpoint(checkpoint, mmap=True), f"{checkpoint} (config)")
        self.model, _, _ = ensure_ego_mlp(checkpoint, train_cfg, shards, cfg, progress=False)
        self.name = "ego_mlp"

    def reset(self, info) -> None:
        pass

    def act(self, history: list, status, command: str):
        from drivejepa.driving.drivers import Action
        from drivejepa.planning.route import command_index

        past = np.asarray(status.past_actions, dtype=np.float32).reshape(-1, 5)
        need = self.model.spec.past_steps
        if len(past) < need:                     # the first decisions of a run: repeat the oldest known motion
            past = np.concatenate([np.repeat(past[:1], need - len(past), axis=0), past]) if len(past) else \
                np.zeros((need, 5), np.float32)
        actions, trajectory = self.model.plan(past[None], np.array([command_index(command)]))
        return Action(actions[0, 0], plan=trajectory[0, 1:])


def world_model(checkpoint: str, shards: str, config: Optional[str] = None, overrides=()) -> WorldModelDriver:
    return WorldModelDriver(checkpoint, shards, config, overrides)


def ego_mlp(checkpoint: str, shards: str, config: Optional[str] = None, overrides=()) -> EgoMLPDriver:
    return EgoMLPDriver(checkpoint, shards, config, overrides)
