"""Point branches: PointNet features per point, max-pooled per pillar of the bird's-eye grid (PointPillars).

Each point gets its channels (fixed scales) but its x, y, and its offset from the centre of the pillar it falls in; a
shared per-point MLP lifts them and a masked max pools them per pillar. Pillars are ``factor`` times finer than the
state's cells; a strided convolution turns each ``factor x factor`` block into one cell, so a cell token sees where
in the cell its points lie. An empty pillar gets a learned 'empty' feature. Neither the pillar's position nor its point
count (which falls off with range from the sensor) is an input: a pillar says what is there, the same wherever the
ego stands, so the state moves with the world (models/fusion.py).
Padding (masked points, whatever their values) and points outside the grid go to a discarded group, so they never
change the output, and the pooling makes the output independent of point order. A real point that is not finite
makes the state not finite (so a corrupt reading is caught, not silently dropped).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from drivejepa.models.bev import BevGrid

# Fixed input scales: raw metres, intensities and velocities go in; the network sees values of order one.
LIDAR_SCALES = (50.0, 50.0, 5.0, 255.0)                 # x, y, z (m), intensity (0-255)
RADAR_SCALES = (100.0, 100.0, 5.0, 30.0, 10.0, 10.0)    # x, y, z (m), rcs (dBsm), vx_comp, vy_comp (m/s)


class PillarNet(nn.Module):
    """``[B, P, F]`` points + ``[B, P]`` mask (ego frame) -> ``[B, dim, G, G]`` features of the state's grid."""

    def __init__(self, scales: Sequence[float], widths: Sequence[int], dim: int, grid: BevGrid, factor: int = 1):
        super().__init__()
        if not widths:
            raise ValueError("a PointNet needs at least one layer width")
        self.in_dim = len(scales)
        self.grid = grid
        self.factor = factor
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        prev = self.in_dim                                # channels but x, y, + offset in the pillar (x, y)
        for i, width in enumerate(widths):
            layers.append(nn.Linear(prev, width))
            if i < len(widths) - 1:
                layers.append(nn.ReLU(inplace=True))     # no per-point norm: it costs more than the matmuls
            prev = width
        self.mlp = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.LayerNorm(prev), nn.Linear(prev, dim))
        self.empty = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.empty, std=0.02)
        self.pool = nn.Conv2d(dim, dim, factor, stride=factor) if factor > 1 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW must not decay (timm's convention; collected by ``training.optim.param_groups``)."""
        return {"empty"}

    def forward(self, points: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != self.in_dim:
            raise ValueError(f"points must be [B, P, {self.in_dim}], got {tuple(points.shape)}")
        b, p, _ = points.shape
        if mask is None:
            mask = torch.ones(b, p, dtype=torch.bool, device=points.device)
        mask = mask.to(torch.bool)
        # Zero the padding first so that NaN or huge padding values cannot leak through any arithmetic.
        points = torch.where(mask.unsqueeze(-1), points, torch.zeros((), dtype=points.dtype, device=points.device))
        g = self.grid.size * self.factor
        cells = g * g
        index, inside = self.grid.cell_index(points[..., :2], self.factor)
        # A real point that is not finite (a corrupt shard) is kept, so the state is not finite either and the
        # window is reported and skipped downstream instead of the reading vanishing unnoticed.
        keep = mask & (inside | ~torch.isfinite(points).all(dim=-1))
        pillar = 2.0 * self.grid.range / g
        centre = torch.stack([index // g, index % g], dim=-1).to(points.dtype) * pillar - self.grid.range + pillar / 2
        offset = (points[..., :2] - centre) / pillar
        scaled = (points / self.scales.to(points.dtype))[..., 2:]                 # not x, y: where is the cell's
        feats = self.mlp(torch.cat([scaled, offset], dim=-1))                      # [B, P, W]
        width = feats.shape[-1]
        groups = cells + 1                                                         # last group: padding, outside
        index = torch.where(keep, index, torch.full_like(index, cells))
        flat = (index + groups * torch.arange(b, device=points.device).unsqueeze(1)).reshape(-1)
        pooled = torch.full((b * groups, width), float("-inf"), dtype=feats.dtype, device=feats.device)
        pooled = pooled.scatter_reduce(0, flat.unsqueeze(1).expand(-1, width), feats.reshape(-1, width), "amax")
        counts = torch.zeros(b * groups, dtype=feats.dtype, device=points.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=feats.dtype))
        pooled = pooled.view(b, groups, width)[:, :cells]
        counts = counts.view(b, groups, 1)[:, :cells]
        occupied = counts > 0
        pooled = torch.where(occupied, pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
        out = torch.where(occupied, self.proj(pooled), self.empty.to(pooled.dtype))
        return self.pool(out.transpose(1, 2).reshape(b, -1, g, g))
