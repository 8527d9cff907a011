"""The multimodal JEPA world model: online encoder, EMA target encoder and action-conditioned predictor.

A state is a bird's-eye grid of tokens ``[N, C]`` in the ego frame (drivejepa/models/bev.py); the encoder builds it
from every sensor (models/fusion.py), the predictor moves it (models/predictor.py), and the JEPA loss compares
predicted and target states token by token.

``loss`` encodes a window of L key frames with both encoders, predicts frame i+1 from the online states up to i and
action i (teacher forcing; this trains the encoder), rolls forward K steps from the target encoder's latents of the
first ``context`` frames (this trains the predictor exactly as it is evaluated), and compares the predictions with
the stop-gradient target latents under the configured objective (those predictor terms are ``predictor_terms``,
which the predictor stage, drivejepa/training/predictor_stage.py, calls on cached target latents alone). Two
regularisers act on the online states: the VICReg variance/covariance term against collapse, and the
inverse-dynamics term (the ego motion between consecutive states must be recoverable) against latents that ignore
what the action changes. A third, the equivariance ratio (``losses.equivariance_ratio``), asks the online state of a
frame, carried by the ego's motion, to predict the next frame's target state better than the same state left where
it is: a state that moves with the world is what the predictor's warp carries and what the action can move.

Rollouts outside training (validation, evaluation, visualisation) start from the EMA target encoder's latents
(``context_states``): it is the encoder JEPA models deploy, and it is the source of the targets and of the copy-last
baseline, so a prediction and its baselines differ by the predictor alone. Predictions and targets are compared in
the model's latent space (``space``, set from the objective by ``build_world_model``; see drivejepa/latent_space.py).
"""
from __future__ import annotations

import copy
import math
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from drivejepa.config import LossConfig, ModelConfig, TrainConfig, resolve_model_config
from drivejepa.data.shards import PER_CAMERA, SENSOR_KEYS
from drivejepa.diagnostics import collapse_diagnostics
from drivejepa import latent_space
from drivejepa.losses import (equivariance_ratio, inverse_dynamics_loss, prediction_loss, sibling_contrast_loss,
                              vicreg_terms)
from drivejepa.models.bev import warp
from drivejepa.models.fusion import MultimodalEncoder, grid_of
from drivejepa.models.inverse_dynamics import MOTION_DIMS, InverseDynamicsHead
from drivejepa.models.predictor import Predictor


def ema_momentum(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine schedule of the EMA momentum from ``start`` (step 0) to ``end`` (step ``total_steps`` and after)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


class WorldModel(nn.Module):
    def __init__(self, cfg: ModelConfig, cameras: list[str], space: str = "layer_norm"):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        self.cameras = list(cameras)
        self.latent_dim = cfg.latent_dim
        self.grid = grid_of(cfg)
        self.bev_size, self.bev_range = self.grid.size, self.grid.range
        self.encoder = MultimodalEncoder(cfg, self.cameras)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        self.target_encoder.eval()
        self.predictor = Predictor(cfg, space, self.grid)
        self.space = self.predictor.space
        self.inverse_dynamics = InverseDynamicsHead(cfg.latent_dim, self.grid)

    def train(self, mode: bool = True) -> "WorldModel":
        """The target encoder always runs in eval mode (no modality dropout, no DropPath, BatchNorm running stats)."""
        super().train(mode)
        self.target_encoder.eval()
        return self

    # ---------------------------------------------------------------------------------------------- encoding
    def encode(self, obs: Mapping[str, torch.Tensor], target: bool = False) -> torch.Tensor:
        """obs (images uint8 [B, C, H, W, 3] with cam_intrinsics [B, C, 3, 3] and cam_to_key_ego [B, C, 4, 4],
        lidar [B, P, 4], radar [B, M, 6] and masks; any subset) -> state tokens [B, N, C]."""
        if target:
            with torch.no_grad():
                return self.target_encoder(obs)
        return self.encoder(obs)

    def encode_sequence(self, batch: Mapping[str, torch.Tensor], target: bool = False) -> torch.Tensor:
        """Batch arrays with an L axis ([B, L, ...]; per-camera calibration [B, C, ...]) -> states [B, L, N, C]."""
        obs = {k: batch[k] for k in SENSOR_KEYS if k in batch}
        framed = [k for k in obs if k not in PER_CAMERA]
        if not framed:
            raise ValueError("batch holds none of 'images', 'lidar', 'radar'")
        b, length = obs[framed[0]].shape[:2]
        flat = {k: (v.unsqueeze(1).expand(b, length, *v.shape[1:]) if k in PER_CAMERA else v)
                for k, v in obs.items()}
        flat = {k: v.reshape(b * length, *v.shape[2:]) for k, v in flat.items()}
        states = self.encode(flat, target=target)
        return states.view(b, length, *states.shape[1:])

    def summary(self, states: torch.Tensor) -> torch.Tensor:
        """The pooled vector of states ``[..., N, C]`` in the model's space (``latent_space.summary``)."""
        return latent_space.summary(states, self.space)

    def context_states(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The latents rollouts start from outside training: the EMA target encoder's, [B, L, D]."""
        return self.encode_sequence(batch, target=True)

    # ---------------------------------------------------------------------------------------------- prediction
    def predict(self, states: torch.Tensor, actions: torch.Tensor,
                action_known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced, causal: states [B, T, N, C], actions [B, T, 5] -> [B, T, N, C], output t predicts
        s_{t+1}."""
        return self.predictor(states, actions, action_known)

    def rollout(self, context_states: torch.Tensor, actions: torch.Tensor,
                past_actions: Optional[torch.Tensor] = None, future_known: bool = True) -> torch.Tensor:
        """Autoregressive: context [B, Tc, N, C] and actions a_t..a_{t+K-1} [B, K, 5] (a_t = action of the last
        context frame) -> predicted states s_{t+1}..s_{t+K} [B, K, N, C]. ``past_actions`` [B, Tc-1, 5] are the
        actions of the earlier context frames; without them the predictor uses its learned 'unknown action' token
        there (and does not warp those frames). ``future_known=False`` puts that token in place of the future actions
        too (an action-blind rollout: no warp, no modulation by the action). A model trained with
        ``model.action_dropout = 1`` never saw an action, so its rollouts are always action-blind (the 'same
        predictor trained with actions masked' baseline of ``drivejepa evaluate --action-blind-checkpoint``).
        Outside training the rollout uses ``model.guidance`` (classifier-free guidance, ``Predictor.rollout``)."""
        if self.action_blind:
            past_actions, future_known = None, False
        guidance = 1.0 if self.training else self.cfg.guidance
        return self.predictor.rollout(context_states, actions, past_actions, future_known, guidance)

    @property
    def action_blind(self) -> bool:
        """Trained with every action masked (``model.action_dropout = 1``)."""
        return self.cfg.action_dropout >= 1.0

    # ---------------------------------------------------------------------------------------------- training
    def loss(self, batch: Mapping[str, torch.Tensor], loss_cfg: LossConfig, context: int):
        """(total loss, metrics) on a window batch [B, L, ...]; metrics include the collapse diagnostics."""
        actions = batch["actions"]
        b, length = actions.shape[:2]
        if not 1 <= context < length:
            raise ValueError(f"context = {context} must be in [1, {length - 1}] for windows of {length} frames")
        states = self.encode_sequence(batch)                                         # online, [B, L, N, C]
        target_states = self.encode_sequence(batch, target=True)                     # stop-gradient
        if latent_space.space_of(loss_cfg) != self.space:
            raise ValueError(f"loss.objective = {loss_cfg.objective!r}, normalize_targets = "
                             f"{loss_cfg.normalize_targets} compares in space "
                             f"'{latent_space.space_of(loss_cfg)}', but this model was built for '{self.space}'")
        targets = latent_space.targets(target_states.float(), self.space)

        valid = batch.get("action_valid")
        valid = torch.ones(b, length, dtype=torch.bool, device=actions.device) if valid is None else valid.bool()
        total, metrics, one_step_pred = self.predictor_terms(states, target_states, targets, batch, valid, loss_cfg,
                                                             context)

        if loss_cfg.equivariance_weight > 0:
            eq = self.equivariance(states, targets, actions, valid)
            total = total + loss_cfg.equivariance_weight * eq
            metrics["loss_equivariance"] = float(eq.detach())

        if loss_cfg.idm_weight > 0:
            scales = self.predictor.action_scales[:MOTION_DIMS]
            motion = self.inverse_dynamics(states[:, :-1].float(), states[:, 1:].float())
            idm = inverse_dynamics_loss(motion, actions[:, :-1, :MOTION_DIMS].float() / scales, valid[:, :-1])
            total = total + loss_cfg.idm_weight * idm
            metrics["loss_idm"] = float(idm.detach())

        var, cov = vicreg_terms(states)
        if loss_cfg.vicreg_weight > 0:
            regulariser = loss_cfg.vicreg_var_weight * var + loss_cfg.vicreg_cov_weight * cov
            total = total + loss_cfg.vicreg_weight * regulariser
        metrics.update(vicreg_var=float(var.detach()), vicreg_cov=float(cov.detach()))
        first = latent_space.predictions(one_step_pred.detach().float(), self.space)
        # Spread and rank of the pooled states (an SVD of every token would cost a tenth of a step on a CPU).
        metrics.update(collapse_diagnostics(self.summary(states.detach().float()), first, targets[:, 1:],
                                            targets[:, :-1]))
        metrics["loss"] = float(total.detach())
        return total, metrics

    def predictor_terms(self, inputs: torch.Tensor, target_states: torch.Tensor, targets: torch.Tensor,
                        batch: Mapping[str, torch.Tensor], valid: torch.Tensor, loss_cfg: LossConfig, context: int):
        """The predictor's share of the objective on a window batch: teacher-forced one-step predictions from
        ``inputs`` (the online states in the joint run, which trains the encoder through them; the cached target
        latents in the predictor stage, drivejepa/training/predictor_stage.py), the K-step rollout from the target
        latents of the context frames, and the sibling-contrastive term. ``targets`` are ``target_states`` in the
        model's space, ``valid [B, L]`` the actions that are known. Returns (total, metrics, one-step predictions)."""
        actions = batch["actions"]
        b, length = actions.shape[:2]
        known = valid
        if self.training and self.cfg.action_dropout > 0:
            known = known & (torch.rand(b, length, device=actions.device) >= self.cfg.action_dropout)
        one_step_pred = self.predict(inputs[:, :-1], actions[:, :-1], known[:, :-1])
        one_step = prediction_loss(one_step_pred.float(), targets[:, 1:], loss_cfg)
        total = one_step
        metrics = {"loss_one_step": float(one_step.detach())}

        k = min(loss_cfg.rollout_steps, length - context)
        if k > 0 and loss_cfg.rollout_weight > 0:
            rolled = self.rollout(target_states[:, :context], actions[:, context - 1 : context - 1 + k],
                                  actions[:, : context - 1])
            rollout = prediction_loss(rolled.float(), targets[:, context : context + k], loss_cfg)
            total = total + loss_cfg.rollout_weight * rollout
            metrics["loss_rollout"] = float(rollout.detach())
            metrics["rollout_cosine"] = float(
                F.cosine_similarity(rolled.detach().float(), targets[:, context : context + k], dim=-1).mean())
            if loss_cfg.sibling_weight > 0 and "context_group" in batch:
                sibling, terms = sibling_contrast_loss(latent_space.predictions(rolled.float(), self.space),
                                                       targets[:, context : context + k], batch["context_group"],
                                                       batch["parted_after"], context,
                                                       loss_cfg.sibling_temperature)
                if terms:
                    total = total + loss_cfg.sibling_weight * sibling
                    metrics["loss_sibling"] = float(sibling.detach())
        return total, metrics, one_step_pred

    def equivariance(self, states: torch.Tensor, targets: torch.Tensor, actions: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        """``losses.equivariance_ratio`` of the online states of frames t ``[B, L, N, C]`` carried into frame t+1 by
        the ego's motion a_t (the predictor's warp, every channel) against the target states of t+1 (``targets``,
        in the model's space), over the cells frame t saw and the steps whose action is known."""
        b, length, n, c = states.shape
        moved = self.predictor.motion(actions[:, :-1], valid[:, :-1]).reshape(-1, 3, 3)
        source = latent_space.targets(states[:, :-1].float(), self.space).reshape(b * (length - 1), n, c)
        warped, seen = warp(source, moved, self.grid)
        mask = seen.view(b, length - 1, n) & valid[:, :-1, None]
        return equivariance_ratio(source.view(b, length - 1, n, c), warped.view(b, length - 1, n, c),
                                  targets[:, 1:].float(), mask)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target = m * target + (1 - m) * online for every parameter (one fused ``torch._foreach_*`` call each, not a
        Python loop of kernels); buffers (BatchNorm statistics) copied."""
        target = list(self.target_encoder.parameters())
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, [p.detach() for p in self.encoder.parameters()], alpha=1.0 - momentum)
        torch._foreach_copy_(list(self.target_encoder.buffers()), list(self.encoder.buffers()))


def build_world_model(cfg: TrainConfig) -> WorldModel:
    """The world model of a training config: size preset applied, cameras from ``cfg.data.cameras``, latent space
    from the objective (``latent_space.space_of(cfg.loss)``)."""
    return WorldModel(cfg.model, cfg.data.cameras, latent_space.space_of(cfg.loss))
