"""Camera features lifted into the bird's-eye grid with the camera geometry, placed in depth by the lidar.

Each cell is sampled at a few heights (``model.lift_heights``) above SUBCELLS x SUBCELLS points spread over it: each
3-D point is projected into every camera with the shard's calibration (``cam_intrinsics``, and ``cam_to_key_ego``: the camera at its own capture
time in the key ego frame, the devkit's ``map_pointcloud_to_image`` chain), and the camera's feature map is sampled
there bilinearly (Simple-BEV, Harley et al. 2022). Along one pixel's ray every cell would get the same feature; the
lidar says where along the ray the surface is. The frame's lidar points are projected into each camera's feature map
and the nearest depth per feature pixel kept; a sample's weight is ``exp(-((depth - lidar depth) / cell)^2)`` where
its pixel has a lidar depth (so the feature lands in the cell where the lidar sees the surface, not in the free space
in front of it nor in the occluded space behind), and 1 where it has none (sky, beyond the lidar's reach, no lidar
at all: spread along the ray). A cell's feature is the weighted sum over cameras and samples divided by the number
of samples that fell in an image, so a disagreeing depth attenuates the feature instead of being normalised away;
the log of the total weight (how much of the cell any camera saw) is returned beside it.

The geometry runs in float32 whatever the autocast: pixel coordinates of a 1600-pixel image need more than bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from drivejepa.models.bev import BevGrid

MIN_DEPTH = 0.1     # metres in front of the camera for a point to project
SUBCELLS = 2        # samples per cell side at each height: a cell is wider than a car, its centre alone misses one


def project(points: torch.Tensor, cam_to_ego: torch.Tensor, intrinsics: torch.Tensor):
    """Ego-frame points ``[B, P, 3]`` into each camera ``[B, C, 4, 4]`` (camera -> ego) with ``[B, C, 3, 3]``
    intrinsics: (pixel coordinates ``[B, C, P, 2]``, depth along the optical axis ``[B, C, P]``)."""
    ego_to_cam = torch.linalg.inv(cam_to_ego)
    cam = torch.einsum("bcij,bpj->bcpi", ego_to_cam[..., :3, :3], points) + ego_to_cam[..., None, :3, 3]
    depth = cam[..., 2]
    pix = torch.einsum("bcij,bcpj->bcpi", intrinsics, cam)
    uv = pix[..., :2] / depth.clamp(min=MIN_DEPTH).unsqueeze(-1)
    return uv, depth


def normalised(uv: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates -> grid_sample coordinates (-1 and 1 are the image's outer edges; pixel u covers
    [u - 0.5, u + 0.5])."""
    h, w = image_hw
    return torch.stack([(uv[..., 0] + 0.5) * (2.0 / w) - 1.0, (uv[..., 1] + 0.5) * (2.0 / h) - 1.0], dim=-1)


def feature_pixel(coords: torch.Tensor, feature_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat feature-map pixel index, inside) of normalised coordinates."""
    h, w = feature_hw
    col = torch.floor((coords[..., 0] + 1.0) * (w / 2.0)).long()
    row = torch.floor((coords[..., 1] + 1.0) * (h / 2.0)).long()
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return row.clamp(0, h - 1) * w + col.clamp(0, w - 1), inside


def lidar_depth(lidar: torch.Tensor, lidar_mask: torch.Tensor, cam_to_ego: torch.Tensor, intrinsics: torch.Tensor,
                image_hw: tuple[int, int], feature_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest lidar depth per feature-map pixel of each camera: ``[B, C, h * w]``, inf where no point projects."""
    uv, depth = project(lidar[..., :3], cam_to_ego, intrinsics)
    index, inside = feature_pixel(normalised(uv, image_hw), feature_hw)
    ok = inside & (depth > MIN_DEPTH) & lidar_mask[:, None, :]
    b, c, _ = depth.shape
    pixels = feature_hw[0] * feature_hw[1]
    index = torch.where(ok, index, torch.full_like(index, pixels))                 # discarded group
    out = torch.full((b, c, pixels + 1), float("inf"), dtype=depth.dtype, device=depth.device)
    out = out.scatter_reduce(2, index, torch.where(ok, depth, torch.full_like(depth, float("inf"))), "amin")
    return out[..., :pixels]


def lift(features: torch.Tensor, intrinsics: torch.Tensor, cam_to_ego: torch.Tensor, image_mask: torch.Tensor,
         image_hw: tuple[int, int], grid: BevGrid, heights: list[float], lidar: torch.Tensor | None = None,
         lidar_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera feature maps ``[B, C, D, h, w]`` (of images ``image_hw`` = (H, W) pixels) -> (cell features
    ``[B, N, D]``, log(1 + total sample weight) ``[B, N]``). ``lidar [B, P, >=3]`` with ``lidar_mask [B, P]`` place
    the features in depth; without them every sample along a ray counts alike."""
    b, c, d, fh, fw = features.shape
    device = features.device
    with torch.autocast(device.type, enabled=False):
        intrinsics, cam_to_ego = intrinsics.float(), cam_to_ego.float()
        offsets = (torch.arange(SUBCELLS, device=device, dtype=torch.float32) + 0.5) / SUBCELLS - 0.5
        offsets = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1).reshape(-1, 2) * grid.cell
        z = torch.tensor(heights, device=device, dtype=torch.float32)
        below = offsets[:, None, :].expand(-1, len(z), 2)                                         # [S, H, 2]
        local = torch.cat([below, z[None, :, None].expand(len(offsets), -1, 1)], dim=-1).reshape(-1, 3)
        centres = grid.centres(device)                                                             # [N, 2]
        n, k = centres.shape[0], local.shape[0]
        points = (torch.cat([centres, torch.zeros_like(centres[:, :1])], dim=1)[:, None, :] + local[None]
                  ).reshape(-1, 3)                                                                 # [N*k, 3]
        uv, depth = project(points.expand(b, -1, -1), cam_to_ego, intrinsics)                    # [B, C, N*k]
        coords = normalised(uv, image_hw)
        pixel, inside = feature_pixel(coords, (fh, fw))
        visible = (inside & (depth > MIN_DEPTH) & image_mask.bool()[..., None]).float()
        weight = visible
        if lidar is not None:
            mask = torch.ones(lidar.shape[:2], dtype=torch.bool, device=device) if lidar_mask is None \
                else lidar_mask.bool()
            surface = lidar_depth(lidar[..., :3].float(), mask, cam_to_ego, intrinsics, image_hw, (fh, fw))
            seen = torch.gather(surface, 2, pixel)                                               # [B, C, N*k]
            agree = torch.exp(-((depth - seen) / grid.cell) ** 2)
            weight = weight * torch.where(torch.isfinite(seen), agree, torch.ones_like(agree))
    sampled = F.grid_sample(features.reshape(b * c, d, fh, fw), coords.reshape(b * c, 1, n * k, 2).to(features.dtype),
                            mode="bilinear", padding_mode="zeros", align_corners=False)          # [B*C, D, 1, N*k]
    sampled = sampled.view(b, c, d, n, k)
    w = weight.view(b, c, 1, n, k).to(sampled.dtype)
    count = visible.view(b, c, n, k).sum(dim=(1, 3)).to(sampled.dtype)                            # [B, N]
    cells = (sampled * w).sum(dim=(1, 4)) / count.clamp(min=1.0).unsqueeze(1)                     # [B, D, N]
    return cells.transpose(1, 2), torch.log1p(w.sum(dim=(1, 4))[:, 0])
