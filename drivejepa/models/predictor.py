"""Action-conditioned predictor: a causal transformer over time, three tokens a step.

Step t contributes a state token s_t, an ego-speed token and a motion token (dx, dy, dyaw), in that order; the output
read at the motion token of step t is the prediction of s_{t+1}. The motion token has the action's 3 degrees of
freedom: the shards' yaw_rate is dyaw / dt at a fixed key-frame interval (0.5 s), a copy of dyaw, so it is not an
input. The speed token is the action's speed, the chord of the same interval over dt (``frames.action_from_motion``),
so it is the action again (|dx, dy| / dt), not a state of the ego at t; the ego's speed so far reaches the predictor
through the previous steps' tokens. A "speed now" state token (the previous interval's speed, unknown at the first
step of a window) is a model change to measure, not assume (issue 16's action-sensitivity work).
A token-level causal mask makes output t depend only on steps <= t, so teacher-forced prediction of a whole sequence
and step-by-step rollout agree.
The prediction is residual: the current state in the model's latent space (``latent_space.targets``) plus a learned
change scaled by a per-channel gate (LayerScale) that starts at 0.01 and by the state's RMS (1 for layer-normed
states), so the change is equally small in every space. Consecutive latents are close, so the untrained
predictor starts at the copy-last-latent baseline in the space its predictions are compared in, and training only has
to learn what the action and the scene change.
Actions are normalised inside with fixed scales (raw metres, radians, m/s go in). An action that is not known (for
instance the frames before the last context frame when the caller has no actions for them) is replaced by a learned
'unknown' token, trained by dropping actions at random during training.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from drivejepa.config import ModelConfig
from drivejepa import latent_space
from drivejepa.models.fusion import Block, drop_path_rates

ACTION_SCALES = (10.0, 2.0, 0.5, 15.0, 1.0)   # dx (m), dy (m), dyaw (rad), speed (m/s), yaw_rate (rad/s)
SPEED_INDEX = 3
MOTION_INDEX = (0, 1, 2)                      # dx, dy, dyaw; yaw_rate (index 4) = dyaw / dt duplicates dyaw
TOKENS_PER_STEP = 3


class Predictor(nn.Module):
    def __init__(self, cfg: ModelConfig, space: str = "layer_norm"):
        super().__init__()
        self.space = latent_space.check(space)
        if cfg.action_dim != len(ACTION_SCALES):
            raise ValueError(f"model.action_dim must be {len(ACTION_SCALES)} (dx, dy, dyaw, speed, yaw_rate), "
                             f"got {cfg.action_dim}")
        dim = cfg.latent_dim
        self.dim = dim
        self.max_context = cfg.max_context
        self.register_buffer("action_scales", torch.tensor(ACTION_SCALES), persistent=False)
        self.register_buffer("motion_index", torch.tensor(MOTION_INDEX), persistent=False)
        self.state_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.speed_in = nn.Sequential(nn.Linear(1, dim), nn.GELU(), nn.Linear(dim, dim))
        self.motion_in = nn.Sequential(nn.Linear(len(MOTION_INDEX), dim), nn.GELU(), nn.Linear(dim, dim))
        self.unknown_speed = nn.Parameter(torch.zeros(dim))
        self.unknown_motion = nn.Parameter(torch.zeros(dim))
        self.time_embed = nn.Parameter(torch.zeros(cfg.max_context, dim))
        self.type_embed = nn.Parameter(torch.zeros(TOKENS_PER_STEP, dim))
        for p in (self.unknown_speed, self.unknown_motion, self.time_embed, self.type_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, cfg.predictor_heads, cfg.mlp_ratio, r)
                                    for r in drop_path_rates(cfg.drop_path, cfg.predictor_depth))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        nn.init.trunc_normal_(self.out[1].weight, std=0.02)
        nn.init.zeros_(self.out[1].bias)
        self.change_gate = nn.Parameter(torch.full((dim,), 0.01))
        n = cfg.max_context * TOKENS_PER_STEP
        self.register_buffer("causal", torch.ones(n, n, dtype=torch.bool).tril(), persistent=False)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"unknown_speed", "unknown_motion", "time_embed", "type_embed", "change_gate"}

    def forward(self, states: torch.Tensor, actions: torch.Tensor,
                action_known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """states [B, T, D], actions [B, T, 5] -> predictions [B, T, D] (output t predicts s_{t+1})."""
        b, t, d = states.shape
        if actions.shape[:2] != (b, t):
            raise ValueError(f"actions {tuple(actions.shape)} do not match states {tuple(states.shape)}")
        if t > self.max_context:
            raise ValueError(f"sequence of {t} steps exceeds model.max_context = {self.max_context}")
        a = actions.to(states.dtype) / self.action_scales.to(states.dtype)
        speed = self.speed_in(a[..., SPEED_INDEX : SPEED_INDEX + 1])
        motion = self.motion_in(a.index_select(-1, self.motion_index))
        if action_known is not None:
            known = action_known.to(torch.bool).unsqueeze(-1)
            speed = torch.where(known, speed, self.unknown_speed.to(speed.dtype))
            motion = torch.where(known, motion, self.unknown_motion.to(motion.dtype))
        x = torch.stack([self.state_in(states), speed, motion], dim=2)                 # [B, T, 3, D]
        x = x + self.time_embed[:t].view(1, t, 1, d) + self.type_embed.view(1, 1, TOKENS_PER_STEP, d)
        x = x.reshape(b, t * TOKENS_PER_STEP, d)
        n = t * TOKENS_PER_STEP
        causal = self.causal[:n, :n]
        for block in self.blocks:
            x = block(x, causal)
        change = self.out(x.view(b, t, TOKENS_PER_STEP, d)[:, :, -1])
        base = latent_space.targets(states, self.space)
        scale = base.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()           # the change is relative to it
        return base + self.change_gate * scale * change

    def rollout(self, context_states: torch.Tensor, actions: torch.Tensor,
                past_actions: Optional[torch.Tensor] = None, future_known: bool = True) -> torch.Tensor:
        """Autoregressive prediction of K steps; see WorldModel.rollout. Keeps the last ``max_context`` steps.
        ``future_known=False`` gives the K future actions the 'unknown' token too (only ``actions.shape`` is read)."""
        b, tc, _ = context_states.shape
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
        seq = context_states
        preds = []
        for step in range(k):
            end = tc + step
            start = max(0, end - self.max_context)
            nxt = self(seq[:, start:end], all_actions[:, start:end], known[:, start:end])[:, -1]
            preds.append(nxt)
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        return torch.stack(preds, dim=1)
