"""The bird's-eye grid the latent state lives on, and the geometry that moves it.

A state ``s_t`` is ``[N, C]``: one C-channel token per cell of a ``G x G`` grid over ``[-R, R]`` metres around the
ego in the ego frame of key frame t (x forward, y left). Token ``i * G + j`` is x bin ``i`` and y bin ``j``: the
layout of ``drivejepa.evaluation.probes.grid_centers``, so a token and an occupancy cell of the same grid are the
same place. As an image the grid is ``[C, G, G]`` with rows = x bins and columns = y bins.

``warp`` is the geometric path of the predictor: the ego motion of one step is a rigid transform of the ego-frame
grid, so a state seen from frame t is resampled into frame t+1's grid by the commanded motion (bicubic; cells that
come into view from outside the grid are zeros and flagged unseen). A static world warped by the true motion is the
state the encoder builds at the moved pose, away from the borders (tests/test_bev.py).

Bicubic, not bilinear: a rollout warps its own prediction again at every step, and bilinear resampling blurs a
little each time (six sub-cell steps on 4 m cells lose 12% of a smooth scene's variance, bicubic 3%), which takes
what tells two futures apart. On the demo checkpoint's branch points (val and test), the last state warped step by
step along each future's motion lands nearest its own future at 3 s 0.45 / 0.31 of the time (val / test) with
bilinear steps, 0.52 / 0.45 with bicubic, and 0.55 / 0.48 warped once.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class BevGrid:
    size: int           # G cells per side
    range: float        # R metres: the grid covers [-R, R] in x and y

    @property
    def cell(self) -> float:
        return 2.0 * self.range / self.size

    @property
    def tokens(self) -> int:
        return self.size * self.size

    def centres(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """[N, 2] (x, y) cell centres, token order (x-major)."""
        c = -self.range + (torch.arange(self.size, device=device, dtype=dtype) + 0.5) * self.cell
        gx, gy = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)

    def cell_index(self, xy: torch.Tensor, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat index [...], inside [...]) of points ``xy [..., 2]`` on the grid refined ``factor`` times per side."""
        g = self.size * factor
        ij = torch.floor((xy + self.range) * (g / (2.0 * self.range))).long()
        inside = ((ij >= 0) & (ij < g)).all(dim=-1)
        ij = ij.clamp(0, g - 1)
        return ij[..., 0] * g + ij[..., 1], inside

    def to_image(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., N, C] -> [..., C, G, G]."""
        lead = tokens.shape[:-2]
        return tokens.transpose(-1, -2).reshape(*lead, tokens.shape[-1], self.size, self.size)

    def to_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """[..., C, G, G] -> [..., N, C]."""
        return image.flatten(-2).transpose(-1, -2)


def motion_matrix(motion: torch.Tensor) -> torch.Tensor:
    """Ego motions ``[..., 3]`` (dx, dy, dyaw: frame t+1's pose in frame t) -> ``[..., 3, 3]`` homogeneous transforms
    that map frame t+1 coordinates into frame t."""
    dx, dy, dyaw = motion.unbind(-1)
    c, s = torch.cos(dyaw), torch.sin(dyaw)
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    return torch.stack([torch.stack([c, -s, dx], -1), torch.stack([s, c, dy], -1),
                        torch.stack([zero, zero, one], -1)], dim=-2)


def compose(*transforms: torch.Tensor) -> torch.Tensor:
    """The product of ``[..., 3, 3]`` transforms (left to right), in float32 (float64 for float64 inputs) whatever the
    autocast: under bf16 autocast a matrix product keeps three significant digits, 0.1 m of a 30 m offset."""
    dtype = torch.promote_types(torch.float32, transforms[0].dtype)
    with torch.autocast(transforms[0].device.type, enabled=False):
        out = transforms[0].to(dtype)
        for t in transforms[1:]:
            out = out @ t.to(dtype)
    return out


def warp(tokens: torch.Tensor, transform: torch.Tensor, grid: BevGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample states ``[B, N, C]`` seen from frame a into frame b, with ``transform [B, 3, 3]`` mapping frame b
    coordinates into frame a (a product of :func:`motion_matrix`, :func:`compose`). Returns (warped [B, N, C] in the
    tokens' dtype, seen [B, N]: the cell's centre fell inside frame a's grid). The coordinates and the resampling
    run in float32 (or the inputs' float64) whatever the autocast: bf16 sample coordinates in [-1, 1] are 1/128
    apart near the edge, a quarter of a metre on the demo grid, and a rollout resamples its own prediction at every
    step."""
    b = tokens.shape[0]
    dtype = torch.promote_types(torch.promote_types(torch.float32, tokens.dtype), transform.dtype)
    with torch.autocast(tokens.device.type, enabled=False):
        centres = grid.centres(tokens.device, dtype)                             # [N, 2] in frame b
        homo = torch.cat([centres, torch.ones_like(centres[:, :1])], dim=-1)    # [N, 3]
        src = torch.einsum("bij,nj->bni", transform.to(dtype), homo)[..., :2]   # [B, N, 2] in frame a
        seen = (src.abs() <= grid.range).all(dim=-1)
        # grid_sample: last dim is (column, row) = (y, x), normalised so that -1 / 1 are the grid's outer edges.
        sample = (src / grid.range).flip(-1).view(b, grid.size, grid.size, 2)
        image = F.grid_sample(grid.to_image(tokens).to(dtype), sample, mode="bicubic", padding_mode="zeros",
                              align_corners=False)
    return grid.to_tokens(image).to(tokens.dtype), seen
