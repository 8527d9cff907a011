"""Fusion encoder: a transformer over the tokens of every modality, read out through a CLS token as the latent state.

Each token carries a learned modality embedding (image / lidar / radar) on top of its branch's own camera or sector
embedding. Tokens of absent cameras are hidden from attention with a key padding mask. In training, modality dropout
hides whole sensors (each camera, the lidar, the radar) at random so that a sensor missing at test time degrades the
state instead of breaking it; at least one present sensor is always kept.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from drivejepa.config import ModelConfig
from drivejepa.models.image import ImageEncoder
from drivejepa.models.points import LIDAR_SCALES, RADAR_SCALES, PointNet

MODALITIES = ("image", "lidar", "radar")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


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

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to ``rate`` over the blocks."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class MultimodalEncoder(nn.Module):
    """obs (any of images / lidar / radar with their masks) -> latent state ``[B, latent_dim]``."""

    def __init__(self, cfg: ModelConfig, cameras: list[str]):
        super().__init__()
        dim = cfg.latent_dim
        self.dim = dim
        self.modality_dropout = cfg.modality_dropout
        self.image = ImageEncoder(dim, cameras, cfg.image_tokens, cfg.image_backbone, cfg.image_weights,
                                  cfg.image_size)
        self.lidar = PointNet(LIDAR_SCALES, cfg.lidar_widths, dim, cfg.lidar_tokens)
        self.radar = PointNet(RADAR_SCALES, cfg.radar_widths, dim, cfg.radar_tokens)
        self.modality_embed = nn.Parameter(torch.zeros(len(MODALITIES), dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.fusion_heads, cfg.mlp_ratio, r) for r in drop_path_rates(cfg.drop_path, cfg.fusion_depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"modality_embed", "cls_token"}

    def branch_tokens(self, obs: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(modality, tokens [B, T, D], valid [B, T]) for each modality present in ``obs``."""
        out = []
        if "images" in obs:
            out.append(("image", *self.image(obs["images"], obs.get("image_mask"))))
        for name, branch in (("lidar", self.lidar), ("radar", self.radar)):
            if name in obs:
                tokens = branch(obs[name][..., : branch.in_dim], obs.get(f"{name}_mask"))  # lidar: not time_lag
                out.append((name, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)))
        if not out:
            raise ValueError("obs holds none of 'images', 'lidar', 'radar'")
        return out

    def drop_modalities(self, parts: list[tuple[str, torch.Tensor, torch.Tensor]], obs: Mapping[str, torch.Tensor]):
        """Hide whole sensors at random (training only); every sample keeps at least one sensor it has."""
        units, present = [], []                       # per sensor: (part index, token slice), presence [B]
        for i, (name, tokens, valid) in enumerate(parts):
            if name == "image":
                per_cam = self.image.tokens
                for c in range(valid.shape[1] // per_cam):
                    units.append((i, slice(c * per_cam, (c + 1) * per_cam)))
                    present.append(valid[:, c * per_cam])
            else:
                units.append((i, slice(None)))
                if f"{name}_mask" in obs and name == "lidar":
                    present.append(obs["lidar_mask"].to(torch.bool).any(dim=1))
                else:
                    present.append(torch.ones_like(valid[:, 0]))
        present_t = torch.stack(present, dim=1)                                        # [B, U]
        score = torch.rand(present_t.shape, device=present_t.device)
        keep = (score >= self.modality_dropout) & present_t
        lost = present_t.any(dim=1) & ~keep.any(dim=1)
        rescue = F.one_hot(torch.where(present_t, score, -1.0).argmax(dim=1), present_t.shape[1]).bool()
        keep = keep | (rescue & lost.unsqueeze(1))
        parts = [(name, tokens, valid.clone()) for name, tokens, valid in parts]
        for u, (i, sl) in enumerate(units):
            parts[i][2][:, sl] &= keep[:, u : u + 1]
        return parts

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = self.branch_tokens(obs)
        if self.training and self.modality_dropout > 0:
            parts = self.drop_modalities(parts, obs)
        tokens = torch.cat([t + self.modality_embed[MODALITIES.index(n)] for n, t, _ in parts], dim=1)
        valid = torch.cat([v for _, _, v in parts], dim=1)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=valid.device), valid], dim=1)
        attn_mask = valid[:, None, None, :]                                            # True = may be attended to
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        return self.head(x[:, 0])
