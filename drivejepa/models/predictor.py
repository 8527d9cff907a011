"""Action-conditioned predictor: a space-time transformer that moves the bird's-eye state, s_t+1 = f(s_<=t, a_t).

Two paths carry the action. The geometric one: the ego motion of one step is a rigid transform of the ego-frame
grid, so the last ``model.max_context`` states are warped into the frame of the state being predicted by the
commanded motions (drivejepa/models/bev.py: ``warp``); a static world needs nothing else. The learned one: every
block is modulated by the action (adaptive LayerNorm with a gate, DiT's adaLN-Zero), so the network predicts what
else changes: other agents reacting, what comes into view. Blocks factorise attention: over the context frames per
cell (the warped past shows how things move), then over the cells per frame, then an MLP.

The prediction is residual on the warped last state in the model's latent space (``latent_space.targets``), plus a
learned change scaled by a per-channel gate (LayerScale) that starts at 0.01 and by the state's RMS, so the untrained
predictor is the warp-last baseline (drivejepa/baselines.py) in every space, and copy-last for a standing ego. Not all
of a state moves with the world: lidar coverage and the camera's view move with the ego. A per-channel gate, learned
from 1 (warped) towards 0 (kept), says which channels are which; cells that come into view start from the last
state's token there.

Actions are (dx, dy, dyaw, speed, yaw_rate), normalised inside with fixed scales (raw metres, radians, m/s go in);
the action embedding reads dx, dy, dyaw and the chord speed (yaw_rate is dyaw / 0.5 s, a copy). An action that is not
known is replaced by a learned 'unknown' embedding (trained by dropping actions at random) and its warp is the
identity; a context frame is only used when every action between it and the predicted frame is known.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath

from drivejepa import latent_space
from drivejepa.config import ModelConfig
from drivejepa.models.bev import BevGrid, compose, motion_matrix, warp
from drivejepa.models.fusion import Attention, drop_path_rates, grid_of

ACTION_SCALES = (10.0, 2.0, 0.5, 15.0, 1.0)   # dx (m), dy (m), dyaw (rad), speed (m/s), yaw_rate (rad/s)
SPEED_INDEX = 3
MOTION_INDEX = (0, 1, 2)                      # dx, dy, dyaw
CONDITION_INDEX = (0, 1, 2, 3)                # what the action embedding reads: the motion and the chord speed


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SpaceTimeBlock(nn.Module):
    """Temporal attention per cell, spatial attention per frame, MLP; each branch adaLN-Zero modulated by ``cond``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.time_attn = Attention(dim, heads)
        self.space_attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.GELU(), nn.Linear(dim, 9 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor, frame_valid: torch.Tensor,
                pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, T, N, D], cond [B, D], frame_valid [B, T] (the last frame always valid), pos [N, D] (the cells'
        position embedding, seen by the spatial attention's queries and keys). ``last_only``: the output is the
        last frame's alone, ``[B, 1, N, D]`` (the predictor's last block: nothing reads the other frames after it,
        so their spatial attention and MLP are not computed)."""
        b, t, n, d = x.shape
        mods = self.modulation(cond).view(b, 9, 1, 1, d).unbind(1)
        h = _modulate(self.norms[0](x), mods[0], mods[1]).transpose(1, 2).reshape(b * n, t, d)
        mask = frame_valid.repeat_interleave(n, dim=0)[:, None, None, :] if t > 1 else None   # the last is valid
        out = 1 if last_only else t
        h = self.time_attn(h, mask, last=out).view(b, n, out, d).transpose(1, 2)
        x = x[:, t - out :] + self.drop_path(mods[2] * h)
        h = _modulate(self.norms[1](x), mods[3], mods[4]).reshape(b * out, n, d)
        x = x + self.drop_path(mods[5] * self.space_attn(h, pos=pos).view(b, out, n, d))
        h = _modulate(self.norms[2](x), mods[6], mods[7])
        return x + self.drop_path(mods[8] * self.mlp(h))


class Predictor(nn.Module):
    def __init__(self, cfg: ModelConfig, space: str = "layer_norm", grid: Optional[BevGrid] = None):
        super().__init__()
        self.space = latent_space.check(space)
        if cfg.action_dim != len(ACTION_SCALES):
            raise ValueError(f"model.action_dim must be {len(ACTION_SCALES)} (dx, dy, dyaw, speed, yaw_rate), "
                             f"got {cfg.action_dim}")
        dim = cfg.latent_dim
        self.dim = dim
        self.grid = grid or grid_of(cfg)
        self.max_context = cfg.max_context
        self.register_buffer("action_scales", torch.tensor(ACTION_SCALES), persistent=False)
        self.register_buffer("condition_index", torch.tensor(CONDITION_INDEX), persistent=False)
        self.action_in = nn.Sequential(nn.Linear(len(CONDITION_INDEX), dim), nn.GELU(), nn.Linear(dim, dim))
        self.unknown_action = nn.Parameter(torch.zeros(dim))
        self.state_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.unseen = nn.Parameter(torch.zeros(dim))
        self.age_embed = nn.Parameter(torch.zeros(cfg.max_context, dim))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid.tokens, dim))
        for p in (self.unknown_action, self.unseen, self.age_embed, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(SpaceTimeBlock(dim, cfg.predictor_heads, cfg.mlp_ratio, r)
                                    for r in drop_path_rates(cfg.drop_path, cfg.predictor_depth))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        nn.init.trunc_normal_(self.out[1].weight, std=0.02)
        nn.init.zeros_(self.out[1].bias)
        self.change_gate = nn.Parameter(torch.full((dim,), 0.01))
        self.world_gate = nn.Parameter(torch.ones(dim))

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"unknown_action", "unseen", "age_embed", "pos_embed", "change_gate", "world_gate"}

    def motion(self, actions: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Transforms ``[B, T, 3, 3]`` of each step's commanded motion (identity where the action is unknown)."""
        motion = actions[..., list(MOTION_INDEX)].float()
        return motion_matrix(torch.where(known.unsqueeze(-1), motion, torch.zeros_like(motion)))

    def step(self, states: torch.Tensor, actions: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """The state after the last of T frames ``[B, T, N, C]`` (oldest first; the last ``max_context`` are used);
        ``actions[:, j]`` moves frame j to j+1 (the last is the action taken now), ``known [B, T]`` -> ``[B, N, C]``."""
        states, actions, known = (x[:, -self.max_context:] for x in (states, actions, known))
        b, t, n, c = states.shape
        steps = self.motion(actions, known)
        transforms = [steps[:, -1]]                          # next frame -> frame t-1-o, newest first
        for j in range(t - 2, -1, -1):
            transforms.append(compose(steps[:, j], transforms[-1]))
        transforms = torch.stack(transforms[::-1], dim=1)                               # [B, T, 3, 3]
        later_known = known.int().flip(1).cummin(dim=1).values.flip(1).bool()             # every action from j on
        frame_valid = torch.cat([later_known[:, :-1], torch.ones_like(known[:, -1:])], dim=1)
        bases = latent_space.targets(states, self.space)
        warped, seen = warp(bases.reshape(b * t, n, c), transforms.reshape(b * t, 3, 3), self.grid)
        warped, seen = warped.view(b, t, n, c), seen.view(b, t, n)
        age = self.age_embed[:t].flip(0).to(warped.dtype)                               # newest frame: age 0
        x = (self.state_in(warped) + age.view(1, t, 1, c)
             + torch.where(seen.unsqueeze(-1), torch.zeros((), dtype=warped.dtype, device=warped.device),
                           self.unseen.to(warped.dtype)))
        a = actions[:, -1].to(x.dtype) / self.action_scales.to(x.dtype)
        cond = self.action_in(a.index_select(-1, self.condition_index))
        cond = torch.where(known[:, -1:], cond, self.unknown_action.to(cond.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, cond, frame_valid, self.pos_embed, last_only=i == len(self.blocks) - 1)
        change = self.out(x[:, -1])
        scale = bases[:, -1].detach().pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()   # the change is relative to it
        return self.base(bases[:, -1], warped[:, -1], seen[:, -1]) + self.change_gate * scale * change

    def base(self, last: torch.Tensor, warped: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """What the prediction is residual on: per channel, the last state carried with the world (``world_gate``
        1: warped) or with the ego (0: as it was); cells that come into view keep the last state's token there.
        The gate is clamped to [0, 1] with the gradient passed straight through: ``clamp``'s own gradient is 0 at
        the bound, where the gate starts, so it would never move."""
        gate = self.world_gate - (self.world_gate - self.world_gate.clamp(0.0, 1.0)).detach()   # straight-through
        gate = gate.to(last.dtype)
        return torch.where(seen.unsqueeze(-1), last + gate * (warped - last), last)

    def forward(self, states: torch.Tensor, actions: torch.Tensor,
                action_known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced, causal: states [B, T, N, C], actions [B, T, 5] -> [B, T, N, C], output t predicts s_{t+1}
        from s_{t-max_context+1..t} and a_{..t}."""
        b, t = states.shape[:2]
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions {tuple(actions.shape)} do not match states {tuple(states.shape)}")
        known = torch.ones(b, t, dtype=torch.bool, device=states.device) if action_known is None \
            else action_known.to(torch.bool)
        ctx = min(self.max_context, t)
        index = torch.arange(t, device=states.device)[:, None] + torch.arange(-ctx + 1, 1, device=states.device)
        pad = index < 0                                                                # [T, ctx]
        index = index.clamp(min=0)
        win_states = states[:, index].reshape(b * t, ctx, *states.shape[2:])
        win_actions = actions[:, index].reshape(b * t, ctx, actions.shape[-1])
        win_known = (known[:, index] & ~pad).reshape(b * t, ctx)
        return self.step(win_states, win_actions, win_known).view(b, t, *states.shape[2:])

    def rollout(self, context_states: torch.Tensor, actions: torch.Tensor,
                past_actions: Optional[torch.Tensor] = None, future_known: bool = True,
                guidance: float = 1.0) -> torch.Tensor:
        """Autoregressive prediction of K steps; see WorldModel.rollout. ``future_known=False`` gives the K future
        actions the 'unknown' token too (only ``actions.shape`` is read then). ``guidance`` g != 1 predicts each
        step as ``u + g (c - u)`` from the same frames, c with the actions and u with every action unknown
        (classifier-free guidance: g > 1 strengthens what the action changes)."""
        b, tc = context_states.shape[:2]
        k = actions.shape[1]
        if past_actions is None:
            past_actions = actions.new_zeros(b, tc - 1, actions.shape[2])
            past_known = torch.zeros(b, tc - 1, dtype=torch.bool, device=actions.device)
        else:
            if past_actions.shape[1] != tc - 1:
                raise ValueError(f"past_actions must hold the {tc - 1} actions before the last context frame, "
                                 f"got {tuple(past_actions.shape)}")
            past_known = torch.ones(b, tc - 1, dtype=torch.bool, device=actions.device)
        all_actions = torch.cat([past_actions.to(actions.dtype), actions], dim=1)
        known = torch.cat([past_known, torch.full((b, k), future_known, dtype=torch.bool, device=actions.device)],
                          dim=1)
        frames = list(context_states.unbind(1))
        preds = []
        for step in range(k):
            end = tc + step
            start = max(0, end - self.max_context)
            states = torch.stack(frames[start:end], dim=1)
            if guidance == 1.0 or not future_known:
                nxt = self.step(states, all_actions[:, start:end], known[:, start:end])
            else:
                both = self.step(torch.cat([states, states]), torch.cat([all_actions[:, start:end]] * 2),
                                 torch.cat([known[:, start:end], torch.zeros_like(known[:, start:end])]))
                cond, uncond = both.chunk(2)
                nxt = uncond + guidance * (cond - uncond)
            preds.append(nxt)
            frames.append(nxt)
        return torch.stack(preds, dim=1)
