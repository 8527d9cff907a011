"""Point branch: a PointNet (shared per-point MLP + masked max pooling) whose local features are kept as tokens.

Points are grouped into azimuth sectors around the ego vehicle and max-pooled within each sector, giving one token per
sector. The grouping depends only on each real point's own coordinates and masked points are routed to a discarded
group, so padding (masked points, whatever their values) never changes the output. A sector without any real point --
and so a whole empty radar sweep -- gets a learned 'empty' token.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

# Fixed input scales: raw metres, intensities and velocities go in; the network sees values of order one.
LIDAR_SCALES = (50.0, 50.0, 5.0, 255.0)                 # x, y, z (m), intensity (0-255)
RADAR_SCALES = (100.0, 100.0, 5.0, 30.0, 10.0, 10.0)    # x, y, z (m), rcs (dBsm), vx_comp, vy_comp (m/s)


class PointNet(nn.Module):
    """``[B, N, F]`` points + ``[B, N]`` mask -> ``[B, tokens, dim]`` sector tokens (every token valid)."""

    def __init__(self, scales: Sequence[float], widths: Sequence[int], dim: int, tokens: int):
        super().__init__()
        if not widths:
            raise ValueError("a PointNet needs at least one layer width")
        self.in_dim = len(scales)
        self.tokens = tokens
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        prev = self.in_dim
        for i, width in enumerate(widths):
            layers.append(nn.Linear(prev, width))
            if i < len(widths) - 1:
                layers.append(nn.ReLU(inplace=True))     # no per-point norm: it costs more than the matmuls
            prev = width
        self.mlp = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.LayerNorm(prev), nn.Linear(prev, dim))
        self.empty_token = nn.Parameter(torch.zeros(dim))
        self.sector_embed = nn.Parameter(torch.zeros(tokens, dim))
        nn.init.trunc_normal_(self.empty_token, std=0.02)
        nn.init.trunc_normal_(self.sector_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"empty_token", "sector_embed"}

    def sectors(self, xy: torch.Tensor) -> torch.Tensor:
        """Azimuth sector index in ``[0, tokens)`` of each point."""
        azimuth = torch.atan2(xy[..., 1], xy[..., 0])
        return ((azimuth + math.pi) * (self.tokens / (2 * math.pi))).long().clamp_(0, self.tokens - 1)

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != self.in_dim:
            raise ValueError(f"points must be [B, N, {self.in_dim}], got {tuple(points.shape)}")
        b, n, _ = points.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=points.device)
        mask = mask.to(torch.bool)
        # Zero the padding first so that NaN or huge padding values cannot leak through any arithmetic.
        points = torch.where(mask.unsqueeze(-1), points, torch.zeros((), dtype=points.dtype, device=points.device))
        feats = self.mlp(points / self.scales.to(points.dtype))                     # [B, N, W]
        width = feats.shape[-1]
        groups = self.tokens + 1                                                   # last group collects the padding
        sector = torch.where(mask, self.sectors(points[..., :2]), torch.full_like(mask, self.tokens, dtype=torch.long))
        index = (sector + groups * torch.arange(b, device=points.device).unsqueeze(1)).reshape(-1)
        pooled = torch.full((b * groups, width), float("-inf"), dtype=feats.dtype, device=feats.device)
        pooled = pooled.scatter_reduce(0, index.unsqueeze(1).expand(-1, width), feats.reshape(-1, width), "amax")
        counts = torch.zeros(b * groups, dtype=torch.long, device=points.device).index_add_(
            0, index, torch.ones_like(index))
        pooled = pooled.view(b, groups, width)[:, : self.tokens]
        occupied = (counts.view(b, groups)[:, : self.tokens] > 0).unsqueeze(-1)
        pooled = torch.where(occupied, pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
        tokens = torch.where(occupied, self.proj(pooled), self.empty_token.to(pooled.dtype))
        return tokens + self.sector_embed
