"""Fusion encoder: one moment of the sensor suite -> the bird's-eye state ``[B, N, C]`` (drivejepa/models/bev.py).

Every modality is put on the same ego-frame grid first: lidar and radar points by PointPillars branches
(models/points.py), camera features by geometric lifting placed in depth by the lidar (models/lift.py). The grids are
summed; a modality that is absent (or hidden by modality dropout) contributes its learned 'missing' embedding
instead. A transformer over the cell tokens fuses them; its output tokens, after a norm and a linear head, are the
state. The learned position embedding only steers attention (added to queries and keys, not to the tokens): a token
says what is in its cell, not where the cell is, so the state moves with the world when the ego moves and the
predictor's warp (models/predictor.py) carries it, instead of fighting a grid-fixed pattern. In training, modality dropout hides whole sensors (the cameras, the lidar, the
radar) at random so that a sensor missing at test time degrades the state instead of breaking it; at least one
present sensor is always kept.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from drivejepa.config import ModelConfig
from drivejepa.models.bev import BevGrid
from drivejepa.models.image import ImageEncoder
from drivejepa.models.lift import lift
from drivejepa.models.points import LIDAR_SCALES, RADAR_SCALES, PillarNet

MODALITIES = ("image", "lidar", "radar")
CALIBRATION_KEYS = ("cam_intrinsics", "cam_to_key_ego")


SHORT_SEQUENCE = 4     # keys up to this many: attention as one product and sum per key (_short_attention)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                pos: Optional[torch.Tensor] = None, last: Optional[int] = None) -> torch.Tensor:
        """``pos`` (broadcast to x) is added to what queries and keys see, not to the values (DETR's way), so where
        a token is steers attention without becoming part of what the token says. ``last``: only the last ``last``
        tokens ask (the output is theirs, ``[B, last, D]``), all of them answer."""
        b, t, d = x.shape
        if t == 1 and pos is None and attn_mask is None:       # one key: its softmax weight is 1, the output its value
            return self.out(F.linear(x, self.qkv.weight[2 * d :], self.qkv.bias[2 * d :]))
        qkv = self.qkv(x)
        if pos is not None:
            qk = F.linear(pos.to(x.dtype), self.qkv.weight[: 2 * d])
            qkv = torch.cat([qkv[..., : 2 * d] + qk, qkv[..., 2 * d :]], dim=-1)
        qkv = qkv.view(b, t, 3, self.heads, d // self.heads)
        if t <= SHORT_SEQUENCE:
            q, k, v = qkv.unbind(2)                                              # [B, T, H, hd]
            y = _short_attention(q if last is None else q[:, t - last :], k, v, attn_mask)
            return self.out(y.reshape(b, y.shape[1], d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                     # [B, H, T, hd]
        if last is not None:
            q = q[:, :, t - last :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(b, q.shape[2], d))


def _short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over a handful of keys, in the ``[B, T, H, hd]`` layout (``q``
    ``[B, Tq, H, hd]``, ``attn_mask`` in SDPA's ``[..., H, Tq, T]`` form, True attends) -> ``[B, Tq, H, hd]``: one
    product and sum per key. The predictor's attention over time is one sequence of 2 frames per cell and candidate
    (4608 sequences a step for the planner's 18 candidates), where the fused CPU kernel pays a per-sequence overhead
    and bf16 costs it more: measured on a 2-core AVX512-BF16 CPU for those sequences, 4.5 ms against 5.9 ms in fp32
    and 3.0 ms against 13.5 ms in bf16 (1.7 / 1.6 ms against 3.2 / 4.3 ms for the last frame's query alone)."""
    keys = k.shape[1]
    scores = torch.stack([(q * k[:, j : j + 1]).sum(-1) for j in range(keys)], dim=-1) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).transpose(1, 2)
        scores = scores.masked_fill(~mask, float("-inf"))                    # [B, Tq, H, T]
    weights = scores.softmax(dim=-1)
    return sum(weights[..., j : j + 1] * v[:, j : j + 1] for j in range(keys))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth (DropPath) on both residual branches."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask, pos))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def grid_of(cfg: ModelConfig) -> BevGrid:
    """The state's grid of a resolved model config."""
    return BevGrid(cfg.bev_size, cfg.bev_range)


class MultimodalEncoder(nn.Module):
    """obs (any of images with calibration / lidar / radar, with their masks) -> state tokens ``[B, N, dim]``."""

    def __init__(self, cfg: ModelConfig, cameras: list[str]):
        super().__init__()
        dim = cfg.latent_dim
        self.dim = dim
        self.grid = grid_of(cfg)
        self.heights = list(cfg.lift_heights)
        self.modality_dropout = cfg.modality_dropout
        self.image = ImageEncoder(dim, cameras, cfg.image_backbone, cfg.image_weights, cfg.image_size,
                                  cfg.image_stage)
        self.image_seen = nn.Linear(1, dim)
        self.lidar = PillarNet(LIDAR_SCALES, cfg.lidar_widths, dim, self.grid, cfg.pillar_factor)
        self.radar = PillarNet(RADAR_SCALES, cfg.radar_widths, dim, self.grid)
        self.missing = nn.Parameter(torch.zeros(len(MODALITIES), dim))
        self.pos_embed = nn.Parameter(torch.zeros(self.grid.tokens, dim))
        nn.init.trunc_normal_(self.missing, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.fusion_heads, cfg.mlp_ratio, r) for r in drop_path_rates(cfg.drop_path, cfg.fusion_depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"missing", "pos_embed"}

    def branch_grids(self, obs: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """modality -> (cell features [B, N, dim], present [B]) for each modality in ``obs``."""
        out = {}
        lidar, lidar_mask = obs.get("lidar"), obs.get("lidar_mask")
        if lidar is not None and lidar_mask is None:
            lidar_mask = torch.ones(lidar.shape[:2], dtype=torch.bool, device=lidar.device)
        if "images" in obs:
            missing = [k for k in CALIBRATION_KEYS if k not in obs]
            if missing:
                raise ValueError(f"images need the camera calibration to be lifted into the grid: obs lacks {missing}")
            images = obs["images"]
            mask = obs.get("image_mask")
            mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device) if mask is None else mask.bool()
            feats = self.image(images)                                                 # [B, C, dim, h, w]
            cells, seen = lift(feats, obs["cam_intrinsics"], obs["cam_to_key_ego"], mask, tuple(images.shape[2:4]),
                               self.grid, self.heights, lidar, lidar_mask)
            out["image"] = (cells + self.image_seen(seen.unsqueeze(-1).to(cells.dtype)), mask.any(dim=1))
        for name, branch in (("lidar", self.lidar), ("radar", self.radar)):
            if name in obs:
                points = obs[name][..., : branch.in_dim]                               # lidar: not time_lag
                mask = obs.get(f"{name}_mask")
                tokens = self.grid.to_tokens(branch(points, mask))
                present = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
                if name == "lidar" and mask is not None:
                    present = mask.bool().any(dim=1)
                out[name] = (tokens, present)
        if not out:
            raise ValueError("obs holds none of 'images', 'lidar', 'radar'")
        return out

    def drop_modalities(self, present: torch.Tensor) -> torch.Tensor:
        """Hide whole sensors at random (training only): ``present [B, M]`` -> kept ``[B, M]``; every sample keeps
        at least one sensor it has."""
        score = torch.rand(present.shape, device=present.device)
        keep = (score >= self.modality_dropout) & present
        lost = present.any(dim=1) & ~keep.any(dim=1)
        rescue = F.one_hot(torch.where(present, score, -1.0).argmax(dim=1), present.shape[1]).bool()
        return keep | (rescue & lost.unsqueeze(1))

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        grids = self.branch_grids(obs)
        some = next(iter(grids.values()))[0]
        b = some.shape[0]
        present = torch.stack([grids[m][1] if m in grids else torch.zeros(b, dtype=torch.bool, device=some.device)
                               for m in MODALITIES], dim=1)
        if self.training and self.modality_dropout > 0:
            present = self.drop_modalities(present)
        x = torch.zeros_like(some)
        for i, name in enumerate(MODALITIES):
            missing = self.missing[i].to(some.dtype)
            if name in grids:
                x = x + torch.where(present[:, i, None, None], grids[name][0], missing)
            else:
                x = x + missing
        for block in self.blocks:
            x = block(x, pos=self.pos_embed)
        return self.head(self.norm(x))
