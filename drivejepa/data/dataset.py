"""Windows of consecutive key frames of one scene, read from shards through memory maps.

A window is ``context + horizon`` key frames of one scene with consecutive original frame indices: it never spans a
key frame that preprocessing skipped. Shards are mapped lazily in each process (DataLoader workers included), so an
item costs one copy of just its frames out of the page cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from drivejepa.baselines import shuffled_sources
from drivejepa.data.shards import (PER_CAMERA, Shard, camera_positions, load_manifest, read_shard, read_shard_meta,
                                   shard_path)
from drivejepa.data.synth.scenarios import branch_of
from drivejepa.errors import UserError

NEVER_PARTS = 1 << 30          # ``parted_after`` of a window that is no branch's
CAMERA_AXIS = {"images": 1, "image_mask": 1, "cam_to_key_ego": 1, "cam_timestamps": 1}  # per-frame camera axis


class WindowDataset(Dataset):
    """Item = dict of tensors with a leading L = context + horizon axis, plus ``scene`` and ``start``.

    A counterfactual branch scene of the synthetic world (drivejepa/data/synth/branches.py) contributes only the
    windows that reach past its branch frame: a window wholly within the key frames it shares with its parent is the
    parent's window again (the same sensor files), so it would only weigh the shared past more than once.

    Windows that start at the same key frame of a parent scene and its branches, and whose context key frames are
    all shared, see the same past (the same sensor files; preprocessing draws its point subsamples per sample token,
    so those can differ) and then different futures: they form a sibling group (``context_group``, the id every
    item carries; ``sibling_groups()``). ``parted_after`` is the window position of a branch's branch frame (its
    last key frame shared with the parent; ``NEVER_PARTS`` for a scene that is no branch): two siblings see the
    same scene up to the smaller of theirs. Batches of siblings (:func:`sibling_batches`) let the
    sibling-contrastive loss (``losses.sibling_contrast_loss``) train the predictor to tell those futures apart by
    their actions alone.

    ``cameras`` (optional) selects and orders a subset of the shards' cameras. With ``shuffle_actions_seed``, item i
    also holds ``shuffled_actions`` [L, 5], the actions of window ``baselines.shuffled_sources(len, seed)[i]``: the
    shuffled-action baseline's partner (drivejepa/baselines.py), fixed whatever the batching or the ranks."""

    def __init__(self, shard_dir: str | Path, scenes: Optional[list[str]] = None, context: int = 2,
                 horizon: int = 6, stride: int = 1, cameras: Optional[list[str]] = None,
                 shuffle_actions_seed: Optional[int] = None):
        if context < 1 or horizon < 0 or stride < 1:
            raise UserError(f"window: context ({context}) and stride ({stride}) must be >= 1, horizon ({horizon}) >= 0")
        self.shard_dir = Path(shard_dir)
        self.length = context + horizon
        self.context, self.horizon, self.stride = context, horizon, stride
        manifest = load_manifest(self.shard_dir)
        available = sorted(manifest["scenes"])
        if scenes is None:
            scenes = available
        unknown = sorted(set(scenes) - set(available))
        if unknown:
            raise UserError(f"{self.shard_dir}: scenes not in the shards: {', '.join(unknown[:10])}")
        self.scenes = list(scenes)
        self.cameras = cameras
        self._camera_index: dict[str, Optional[list[int]]] = {}
        self.index: list[tuple[str, int]] = []
        context_keys: list[tuple[str, int]] = []
        parted: list[int] = []
        for scene in self.scenes:
            meta = read_shard_meta(shard_path(self.shard_dir, scene))
            self._camera_index[scene] = self._select_cameras(scene, meta["cameras"])
            frames = np.asarray(meta["frame_indices"])
            branch = branch_of(meta.get("description", ""))
            shared = -1 if branch is None else branch["frame"]
            for start in range(0, len(frames) - self.length + 1, stride):
                if frames[start + self.length - 1] - frames[start] == self.length - 1 \
                        and frames[start + self.length - 1] > shared:
                    self.index.append((scene, start))
                    own_past = branch is None or frames[start + context - 1] > shared
                    context_keys.append((scene if own_past else branch["parent"], int(frames[start])))
                    parted.append(NEVER_PARTS if branch is None else int(shared - frames[start]))
        ids: dict[tuple[str, int], int] = {}
        self.context_group = np.array([ids.setdefault(key, len(ids)) for key in context_keys], dtype=np.int64)
        self.parted_after = np.array(parted, dtype=np.int64)
        self._shards: dict[str, Shard] = {}
        self.shuffled_source = None
        if shuffle_actions_seed is not None and len(self.index) > 1:
            self.shuffled_source = shuffled_sources(len(self.index), shuffle_actions_seed)

    def _select_cameras(self, scene: str, shard_cameras: list[str]) -> Optional[list[int]]:
        if self.cameras is None or list(self.cameras) == list(shard_cameras):
            return None
        return camera_positions(shard_cameras, self.cameras, shard_path(self.shard_dir, scene))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_shards"] = {}  # memory maps are reopened in each worker process
        return state

    def sibling_groups(self) -> list[list[int]]:
        """Indices of the windows that share their context with at least one other window, one list per context."""
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(self.context_group.tolist()):
            groups.setdefault(g, []).append(i)
        return [g for g in groups.values() if len(g) > 1]

    def __len__(self) -> int:
        return len(self.index)

    def shard(self, scene: str) -> Shard:
        if scene not in self._shards:
            self._shards[scene] = read_shard(shard_path(self.shard_dir, scene))
        return self._shards[scene]

    def frames(self, scene: str, start: int, stop: int, keys: Optional[tuple[str, ...]] = None) -> dict:
        """Shard positions ``start..stop-1`` of ``scene`` as tensors with a leading frame axis (per-camera
        calibration without it), the cameras selected; ``keys`` limits which arrays are read (all by default)."""
        shard = self.shard(scene)
        cams = self._camera_index[scene]
        out: dict = {}
        for key, arr in shard.arrays.items():
            if keys is not None and key not in keys:
                continue
            if key in PER_CAMERA:
                window = arr if cams is None else arr[cams]
            else:
                window = arr[start:stop]
                if cams is not None and key in CAMERA_AXIS:
                    window = window[:, cams]
            out[key] = torch.from_numpy(np.array(window))
        return out

    def __getitem__(self, i: int) -> dict:
        return self.item(i)

    def item(self, i: int, keys: Optional[tuple[str, ...]] = None) -> dict:
        """Window i (``keys``: the shard arrays to read, all by default) with ``context_group``, ``parted_after``,
        ``scene``, ``start`` and, with ``shuffle_actions_seed``, ``shuffled_actions``."""
        scene, start = self.index[i]
        item = self.frames(scene, start, start + self.length, keys)
        if self.shuffled_source is not None:
            other, other_start = self.index[self.shuffled_source[i]]
            actions = self.shard(other).arrays["actions"][other_start:other_start + self.length]
            item["shuffled_actions"] = torch.from_numpy(np.array(actions))
        item["context_group"] = torch.tensor(int(self.context_group[i]))
        item["parted_after"] = torch.tensor(int(self.parted_after[i]))
        item["scene"] = scene
        item["start"] = start
        return item


def sibling_batches(groups: list[list[int]], n: int, batch: int, rng: np.random.Generator) -> list[list[int]]:
    """One epoch of batches over windows ``range(n)`` in which every sibling group (``WindowDataset.sibling_groups``)
    arrives together: a group is split into the fewest chunks of at most ``batch`` windows (sizes as equal as
    possible, so no chunk is alone), each chunk filled up to ``batch`` with windows of no group, and the other
    windows batched as they come. Every window appears once, and a batch still short at the end is topped up with
    windows of no group drawn at random (as DistributedSampler pads), so that every batch is full and a sampler can
    hand them out as a flat list. The batch order is shuffled by ``rng``; how many batches there are depends only on
    the group sizes, ``n`` and ``batch``."""
    if batch < 2:
        raise ValueError(f"sibling batches need at least 2 windows a batch, got {batch}")
    grouped = {i for g in groups for i in g}
    ungrouped = [i for i in range(n) if i not in grouped]
    loose = [int(i) for i in rng.permutation(ungrouped)]
    batches = []
    for g in groups:
        g = [int(i) for i in rng.permutation(g)]
        parts = -(-len(g) // batch)
        bounds = np.linspace(0, len(g), parts + 1).round().astype(int)
        for a, b in zip(bounds[:-1], bounds[1:]):
            chunk = g[a:b]
            while len(chunk) < batch and loose:
                chunk.append(loose.pop())
            batches.append(chunk)
    batches += [loose[i:i + batch] for i in range(0, len(loose), batch)]
    pool = np.array(ungrouped or range(n))
    for b in batches:
        b.extend(int(i) for i in rng.choice(pool, batch - len(b)))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate_windows(items: list[dict]) -> dict:
    """Stack items to [batch, L, ...]; boxes are padded to the largest count in the batch with mask False."""
    if not items:
        raise ValueError("collate_windows needs at least one item")
    batch: dict = {"scene": [it["scene"] for it in items],
                   "start": torch.tensor([it["start"] for it in items], dtype=torch.long)}
    n_boxes = max((it["boxes"].shape[1] for it in items if "boxes" in it), default=0)
    for key in items[0]:
        if key in ("scene", "start"):
            continue
        tensors = [it[key] for it in items]
        if key in ("boxes", "box_labels", "box_mask", "box_velocity_valid"):
            tensors = [_pad_axis1(t, n_boxes) for t in tensors]
        batch[key] = torch.stack(tensors)
    return batch


def _pad_axis1(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[1] == size:
        return t
    pad = torch.zeros((t.shape[0], size - t.shape[1], *t.shape[2:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=1)
