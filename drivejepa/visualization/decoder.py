"""A light decoder from world-model states (bird's-eye token grids) to a finer bird's-eye view of the scene, so
predictions can be looked at.

The decoder is trained on DETACHED latents of a trained world model (it never changes the world model): target
latents of real key frames, and the predictor's one-step predictions of the next frame, each paired with the
bird's-eye grids of the true frame. Per cell of a G x G grid over the lidar range it predicts

- ``density``: log(1 + number of lidar points), lifted back to a point cloud of about the true density;
- ``height``: mean lidar height in the cell (where there are points);
- ``agents``: whether an annotated box covers the cell (the evaluation's occupancy grid of box footprints), from
  which decoded boxes are extracted.

Tokens are layer-normalised first, the way the world model normalises its regression targets, so raw target
states and predictions of normalised targets decode alike. The decoder is convolutional on the state's own grid and
upsamples it (``grid`` cells per side over the state's ``range``), so a cell is decoded from its token and its
neighbours'. The decoder is saved beside the run
(``RUN/decoders/<checkpoint>.pt``) with the checkpoint's SHA-256: a retrained checkpoint gets a new decoder.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from drivejepa.artifacts import artifact_path, find_artifact, load_artifact, module_from_state, save_module
from drivejepa.latent_space import layer_norm
from drivejepa.evaluation.probes import grid_centers, iou, occupancy_grid

FORMAT = 2                       # 2: decodes token grids (1: one vector per frame)
CHANNELS = ("density", "height", "agents")


@dataclasses.dataclass
class DecoderSpec:
    latent_dim: int                  # channels of a state token
    bev_size: int = 16               # the state's cells per side
    grid: int = 64                   # decoded cells per side: bev_size times a power of two
    range: float = 32.0              # metres: both grids cover |x|, |y| <= range in the ego frame
    hidden: int = 64
    box_z: float = 0.8               # mean centre height and height of the training boxes, given to decoded boxes
    box_h: float = 1.6

    @property
    def cell(self) -> float:
        return 2 * self.range / self.grid


class LatentDecoder(nn.Module):
    """states [B, N, C] -> grids [B, 3, G, G] (density log1p, height, agent logit).

    The output is a learned correction of ``prior``, the training set's mean grids (agent cover as a logit), set by
    :func:`train_decoder`: the decoder starts at the best latent-blind answer and learns what the state adds."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        factor = spec.grid // spec.bev_size
        if spec.grid % spec.bev_size or factor & (factor - 1):
            raise ValueError(f"decoder grid {spec.grid} must be the state's {spec.bev_size} cells times a power of 2")
        self.spec = spec
        h = spec.hidden
        layers: list[nn.Module] = [nn.Conv2d(spec.latent_dim, h, 3, padding=1), nn.GELU()]
        while factor > 1:                                       # one 2x upsampling per halving
            layers += [nn.ConvTranspose2d(h, max(h // 2, 8), 4, 2, 1), nn.GELU()]
            h, factor = max(h // 2, 8), factor // 2
        layers.append(nn.Conv2d(h, len(CHANNELS), 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("prior", torch.zeros(len(CHANNELS), spec.grid, spec.grid))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        z = layer_norm(states.float())
        g = self.spec.bev_size
        image = z.transpose(-1, -2).reshape(-1, z.shape[-1], g, g)
        return self.prior + self.net(image)


# ----------------------------------------------------------------------------------------------------------------
# Bird's-eye targets from a frame and back
# ----------------------------------------------------------------------------------------------------------------
def _cells(xy: np.ndarray, spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    ij = np.floor((xy + spec.range) / spec.cell).astype(np.int64)
    inside = np.all((ij >= 0) & (ij < spec.grid), axis=1)
    return ij, inside


def bev_targets(lidar: np.ndarray, lidar_mask: np.ndarray, boxes: np.ndarray, box_mask: np.ndarray,
                spec: DecoderSpec) -> np.ndarray:
    """[3, G, G] float32 grids of one frame: log1p(point count), mean point height, box cover (0/1).
    Grid index [i, j] is x (forward) bin i, y (left) bin j."""
    g = spec.grid
    out = np.zeros((len(CHANNELS), g, g), dtype=np.float32)
    pts = np.asarray(lidar, dtype=np.float64)[np.asarray(lidar_mask, dtype=bool)]
    ij, inside = _cells(pts[:, :2], spec)
    ij, z = ij[inside], pts[inside, 2]
    flat = ij[:, 0] * g + ij[:, 1]
    count = np.bincount(flat, minlength=g * g).astype(np.float64)
    zsum = np.bincount(flat, weights=z, minlength=g * g)
    out[0] = np.log1p(count).reshape(g, g)
    out[1] = np.where(count > 0, zsum / np.maximum(count, 1), 0.0).reshape(g, g)
    b = np.asarray(boxes, dtype=np.float64)[np.asarray(box_mask, dtype=bool)]
    out[2] = occupancy_grid(b[:, :2], b[:, 6], b[:, 3:5], g, spec.range).reshape(g, g)
    return out


def cell_centres(spec: DecoderSpec) -> np.ndarray:
    """[G, G, 2] x, y of every cell centre."""
    return grid_centers(spec.grid, spec.range).reshape(spec.grid, spec.grid, 2)


def lift_points(grids: np.ndarray, spec: DecoderSpec, seed: int = 0, max_points: int = 60000) -> np.ndarray:
    """Decoded grids [3, G, G] -> [P, 3] points: round(expm1(density)) points per cell, spread over the cell with
    a seeded jitter, at the cell's decoded height."""
    counts = np.rint(np.expm1(np.clip(grids[0], 0.0, 12.0))).astype(np.int64).ravel()
    if counts.sum() > max_points:
        counts = np.floor(counts * (max_points / counts.sum())).astype(np.int64)
    centres = cell_centres(spec).reshape(-1, 2)
    heights = grids[1].ravel()
    cell = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(seed)
    xy = centres[cell] + rng.uniform(-0.5, 0.5, (len(cell), 2)) * spec.cell
    return np.concatenate([xy, heights[cell, None]], axis=1).astype(np.float32)


def extract_boxes(grids: np.ndarray, spec: DecoderSpec, threshold: float = 0.5, min_cells: int = 1,
                  max_length: float = 20.0) -> np.ndarray:
    """Decoded boxes [M, 9] from the agent channel: one oriented box per 8-connected blob of cells whose agent
    probability is over ``threshold`` (orientation from the blob's principal axis). Blobs longer than
    ``max_length`` metres (longer than any road user) are not boxes and are left out. Heights are not decoded:
    boxes get the training boxes' median centre height and height."""
    from scipy import ndimage

    prob = 1.0 / (1.0 + np.exp(-grids[2]))
    labels, n = ndimage.label(prob > threshold, structure=np.ones((3, 3)))
    centres = cell_centres(spec)
    out = []
    for k in range(1, n + 1):
        cells = labels == k
        if cells.sum() < min_cells:
            continue
        xy = centres[cells]
        mean = xy.mean(axis=0)
        if len(xy) >= 2:
            evals, evecs = np.linalg.eigh(np.cov((xy - mean).T) + 1e-9 * np.eye(2))
            axis = evecs[:, np.argmax(evals)]
        else:
            axis = np.array([1.0, 0.0])
        yaw = float(np.arctan2(axis[1], axis[0]))
        rot = np.array([[np.cos(yaw), np.sin(yaw)], [-np.sin(yaw), np.cos(yaw)]])
        local = (xy - mean) @ rot.T
        length = float(np.ptp(local[:, 0])) + spec.cell
        width = float(np.ptp(local[:, 1])) + spec.cell
        if length > max_length:
            continue
        out.append([mean[0], mean[1], spec.box_z, width, length, spec.box_h, yaw, 0.0, 0.0])
    return np.asarray(out, dtype=np.float32).reshape(-1, 9)


# ----------------------------------------------------------------------------------------------------------------
# Training and storage
# ----------------------------------------------------------------------------------------------------------------
def decoder_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Density and agent cover everywhere; heights only where there is something to have a height."""
    density = F.smooth_l1_loss(out[:, 0], target[:, 0])
    occupied = (target[:, 0] > 0).float()
    height = (F.smooth_l1_loss(out[:, 1], target[:, 1], reduction="none") * occupied).sum() / occupied.sum().clamp(min=1)
    positive = target[:, 2].mean().clamp(1e-3, 0.5)
    agents = F.binary_cross_entropy_with_logits(out[:, 2], target[:, 2], pos_weight=(1 - positive) / positive)
    return density + 0.5 * height + 0.5 * agents


def grid_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Occupancy IoU (a cell is occupied when it holds >= 1 point; decoded: >= 0.5) and agent-cover IoU, summed
    over all the given frames [N, 3, G, G]."""
    return {"occupancy_iou": iou(np.expm1(pred[:, 0]) >= 0.5, target[:, 0] > 0),
            "agent_iou": iou(pred[:, 2] > 0, target[:, 2] > 0.5)}


def train_decoder(latents: np.ndarray, targets: np.ndarray, spec: DecoderSpec, *, steps: int = 300,
                  batch_size: int = 32, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> LatentDecoder:
    """Fit a decoder on (state [n, N, C], grids [n, 3, G, G]) pairs, all detached numpy arrays."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    decoder = LatentDecoder(spec)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    x = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    prior = y.mean(dim=0)
    cover = prior[2].clamp(1e-4, 1 - 1e-4)
    prior[2] = torch.log(cover / (1 - cover))
    decoder.prior.copy_(prior)
    decoder.train()
    # The decoder's ops are too small to gain from intra-op threads; on a shared machine extra threads only fight
    # for cores (measured here: 5x slower with 2 threads under load), so train on one and restore the setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bar = tqdm(range(steps), desc="training decoder", unit="step", disable=not progress, leave=False)
        for _ in bar:
            idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
            loss = decoder_loss(decoder(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        torch.set_num_threads(threads)
    return decoder.eval()


@torch.no_grad()
def decode(decoder: LatentDecoder, latents: np.ndarray | torch.Tensor) -> np.ndarray:
    """States [..., N, C] -> [n, 3, G, G] decoded grids (numpy), the leading dims flattened."""
    x = torch.as_tensor(np.asarray(latents, dtype=np.float32))
    return decoder(x.reshape(-1, *x.shape[-2:])).numpy()


def decoder_path(checkpoint: str | Path) -> Path:
    """RUN/decoders/<checkpoint stem>.pt for RUN/checkpoints/<stem>.pt (else beside the checkpoint)."""
    return artifact_path(checkpoint, "decoders")


def save_decoder(path: str | Path, decoder: LatentDecoder, meta: dict) -> Path:
    """Atomically write the decoder (and its numbers as JSON beside it)."""
    return save_module(path, decoder, decoder.spec, meta, FORMAT)


def _decoder_from_state(state: dict, path) -> tuple[LatentDecoder, dict]:
    return module_from_state(state, path, lambda spec: LatentDecoder(DecoderSpec(**spec)), "decoder", FORMAT)


def load_decoder(path: str | Path) -> tuple[LatentDecoder, dict]:
    return _decoder_from_state(load_artifact(path, "decoder"), path)


def find_decoder(checkpoint: str | Path) -> Optional[tuple[LatentDecoder, dict]]:
    """The saved decoder of this exact checkpoint (same SHA-256), or None."""
    state = find_artifact(checkpoint, "decoders", "decoder")
    return None if state is None else _decoder_from_state(state, decoder_path(checkpoint))
