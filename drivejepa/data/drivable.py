"""The drivable area around the ego: nuScenes' basic map mask sampled on a bird's-eye grid of each key frame.

The devkit's basic map (``map`` table -> ``maps/*.png``, read through ``nuscenes.utils.map_mask.MapMask``; the
synthetic world writes one too) is a global raster at 0.1 m a pixel whose foreground (255) is the drivable surface
and sidewalks (the map category ``semantic_prior``). The driver crops each scene's map to the region its key frames'
grids can reach (:func:`map_crop`: a few MB, sent with the scene's task); the worker samples the crop at the centres
of a ``size x size`` grid over ``[-range, range]`` metres of each key frame's ego frame (x forward, y left, cell
``i * size + j`` for x bin i and y bin j, as ``evaluation.probes.grid_centers``), each centre moved to global
coordinates by the key frame's ego pose and looked up as the devkit's ``MapMask.is_on_mask`` does (pixel
``round(x / res)``, ``round(H - y / res)``). A centre outside the map is not drivable.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

MAP_RESOLUTION = 0.1                  # metres a pixel of nuScenes' basic map (the devkit's default)


def map_crop(mask: np.ndarray, poses: list[np.ndarray], grid_range: float,
             resolution: float = MAP_RESOLUTION) -> Optional[dict]:
    """The part of a map mask (uint8 [H, W], 255 = drivable) that grids of half-width ``grid_range`` around the
    ego ``poses`` (4x4 ego -> global) can reach: ``{"mask": crop, "row0", "col0", "height": H, "resolution"}``,
    or None when no pose is given."""
    if not poses:
        return None
    xy = np.array([p[:2, 3] for p in poses], dtype=np.float64)
    reach = grid_range * math.sqrt(2.0) + 2 * resolution
    height, width = mask.shape
    col0 = max(0, int(math.floor((xy[:, 0].min() - reach) / resolution)))
    col1 = min(width, int(math.ceil((xy[:, 0].max() + reach) / resolution)) + 1)
    row0 = max(0, int(math.floor(height - (xy[:, 1].max() + reach) / resolution)))
    row1 = min(height, int(math.ceil(height - (xy[:, 1].min() - reach) / resolution)) + 1)
    crop = np.ascontiguousarray(mask[row0:max(row0, row1), col0:max(col0, col1)], dtype=np.uint8)
    return {"mask": crop, "row0": row0, "col0": col0, "height": int(height), "resolution": float(resolution)}


def drivable_grid(crop: Optional[dict], pose: np.ndarray, size: int, grid_range: float) -> np.ndarray:
    """Bool [size, size] drivable grid of the key frame with ego pose ``pose`` (4x4 ego -> global), from a
    :func:`map_crop` (all False without a map)."""
    from drivejepa.evaluation.probes import grid_centers

    out = np.zeros(size * size, dtype=bool)
    if crop is None:
        return out.reshape(size, size)
    centres = grid_centers(size, grid_range)
    world = centres @ pose[:2, :2].T + pose[:2, 3]
    res = crop["resolution"]
    px = np.round(world[:, 0] / res).astype(np.int64) - crop["col0"]
    py = np.round(crop["height"] - world[:, 1] / res).astype(np.int64) - crop["row0"]
    mask = crop["mask"]
    inside = (px >= 0) & (px < mask.shape[1]) & (py >= 0) & (py < mask.shape[0])
    out[inside] = mask[py[inside], px[inside]] == 255
    return out.reshape(size, size)


def sample_grid(grid: np.ndarray, grid_range: float, xy: np.ndarray) -> np.ndarray:
    """Values of a [..., G, G] bird's-eye grid over ``[-grid_range, grid_range]`` at points ``xy`` [P, 2] of the
    same ego frame (nearest cell; False / 0 outside): [..., P]. How a grid of another size (a cost head's) reads
    the shards' drivable grid."""
    g = grid.shape[-1]
    cell = 2.0 * grid_range / g
    ij = np.floor((np.asarray(xy, dtype=np.float64) + grid_range) / cell).astype(np.int64)
    inside = np.all((ij >= 0) & (ij < g), axis=1)
    out = np.zeros((*grid.shape[:-2], len(ij)), dtype=grid.dtype)
    out[..., inside] = grid[..., ij[inside, 0], ij[inside, 1]]
    return out
