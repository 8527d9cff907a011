"""WindowDataset and collate_windows: windows of consecutive key frames of one scene, masks kept by the collate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from drivejepa.data.dataset import WindowDataset, collate_windows
from drivejepa.data.shards import (ARRAY_DTYPES, PER_CAMERA, SCHEMA_VERSION, read_shard, shard_path, write_manifest,
                                   write_shard)
from drivejepa.errors import UserError


def _fake_scene(out, name, frame_indices, n_boxes, cameras=("CAM_FRONT", "CAM_BACK")):
    """A small hand-made shard whose values encode (frame, camera) so slicing mistakes show."""
    t, c = len(frame_indices), len(cameras)
    rng = np.random.default_rng(len(name) + n_boxes)
    images = np.zeros((t, c, 4, 6, 3), np.uint8)
    for i in range(t):
        for j in range(c):
            images[i, j] = 10 * frame_indices[i] + j
    box_mask = np.zeros((t, n_boxes), bool)
    box_mask[:, : max(0, n_boxes - 1)] = True
    arrays = {
        "images": images, "image_mask": np.ones((t, c), bool),
        "lidar": rng.normal(size=(t, 16, 5)).astype(np.float32), "lidar_mask": rng.random((t, 16)) > 0.3,
        "radar": rng.normal(size=(t, 8, 6)).astype(np.float32), "radar_mask": rng.random((t, 8)) > 0.5,
        "actions": rng.normal(size=(t, 5)).astype(np.float32), "action_valid": np.arange(t) < t - 1,
        "ego_pose": np.tile(np.eye(4), (t, 1, 1)), "timestamps": np.array(frame_indices, np.int64) * 500_000,
        "boxes": rng.normal(size=(t, n_boxes, 9)).astype(np.float32),
        "box_labels": rng.integers(0, 10, (t, n_boxes)), "box_mask": box_mask,
        "box_velocity_valid": box_mask.copy(),
        "cam_intrinsics": np.stack([np.eye(3, dtype=np.float32) * (j + 1) for j in range(c)]),
        "cam_to_key_ego": np.eye(4, dtype=np.float32) * (images[:, :, :1, 0, :1] + np.float32(1)),
        "cam_timestamps": images[:, :, 0, 0, 0].astype(np.int64),
        "drivable": rng.random((t, 4, 4)) > 0.5,
    }
    meta = {"scene": name, "token": name, "description": "", "tags": [], "cameras": list(cameras),
            "channels_absent": [], "sample_tokens": [f"{name}-{i}" for i in frame_indices],
            "frame_indices": list(frame_indices), "num_samples": max(frame_indices) + 1, "skipped": []}
    write_shard(shard_path(out, name), meta, arrays)
    return {"file": f"{name}.shard", "frames": t}


@pytest.fixture
def fake_shards(tmp_path):
    scenes = {"scene-a": _fake_scene(tmp_path, "scene-a", [0, 1, 2, 4, 5, 6, 7], n_boxes=3),
              "scene-b": _fake_scene(tmp_path, "scene-b", [0, 1, 2, 3], n_boxes=5)}
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "splits": {}, "scenes": scenes})
    return tmp_path


def test_write_read_roundtrip_is_zero_copy(fake_shards):
    shard = read_shard(shard_path(fake_shards, "scene-a"))
    assert set(shard.arrays) == set(ARRAY_DTYPES)
    for key, arr in shard.arrays.items():
        assert arr.dtype == np.dtype(ARRAY_DTYPES[key]), key
        base = arr
        while base.base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert isinstance(base, np.memmap), key  # a view of the mapped file, not a copy
        assert not arr.flags.writeable
    assert shard.arrays["images"][4, 1, 0, 0, 0] == 10 * 5 + 1


def test_windows_never_span_a_skipped_frame(fake_shards):
    ds = WindowDataset(fake_shards, context=2, horizon=1)
    # scene-a frames 0 1 2 | 4 5 6 7 -> starts 0, 3, 4 ; scene-b 0 1 2 3 -> starts 0, 1
    assert ds.index == [("scene-a", 0), ("scene-a", 3), ("scene-a", 4), ("scene-b", 0), ("scene-b", 1)]
    item = ds[1]
    assert item["scene"] == "scene-a" and item["start"] == 3
    assert item["images"][:, 0, 0, 0, 0].tolist() == [40, 50, 60]
    assert WindowDataset(fake_shards, context=2, horizon=1, stride=2).index == [
        ("scene-a", 0), ("scene-a", 4), ("scene-b", 0)]
    with pytest.raises(UserError, match="scene-z"):
        WindowDataset(fake_shards, scenes=["scene-z"])


def test_camera_subset_follows_the_requested_order(fake_shards):
    item = WindowDataset(fake_shards, scenes=["scene-b"], context=1, horizon=1, cameras=["CAM_BACK"])[0]
    assert item["images"].shape == (2, 1, 4, 6, 3) and item["images"][:, 0, 0, 0, 0].tolist() == [1, 11]
    assert item["cam_intrinsics"][0, 0, 0] == 2 and item["image_mask"].shape == (2, 1)
    assert item["cam_to_key_ego"][:, 0, 0, 0].tolist() == [2, 12] and item["cam_timestamps"][:, 0].tolist() == [1, 11]
    with pytest.raises(UserError, match="CAM_SIDE"):
        WindowDataset(fake_shards, cameras=["CAM_SIDE"])


def test_each_window_carries_the_actions_of_its_shuffled_action_partner(fake_shards):
    """The shuffled-action baseline's partner of window i is window shuffled_sources(n, seed)[i] (past and future
    actions alike), whatever order the items are read in: validation over any number of ranks means one thing."""
    from drivejepa.baselines import shuffled_sources

    ds = WindowDataset(fake_shards, context=2, horizon=1, shuffle_actions_seed=3)
    perm = shuffled_sources(len(ds), 3)
    assert not np.any(perm == np.arange(len(ds)))
    for i in reversed(range(len(ds))):
        assert torch.equal(ds[i]["shuffled_actions"], ds[int(perm[i])]["actions"])
    assert "shuffled_actions" not in WindowDataset(fake_shards, context=2, horizon=1)[0]


def test_collate_pads_boxes_and_keeps_masks(fake_shards):
    ds = WindowDataset(fake_shards, context=2, horizon=1)
    a, b = ds[0], ds[3]  # 3 and 5 boxes
    batch = collate_windows([a, b])
    assert batch["scene"] == ["scene-a", "scene-b"] and batch["start"].dtype == torch.long
    assert batch["boxes"].shape == (2, 3, 5, 9)
    assert batch["box_mask"].shape == batch["box_velocity_valid"].shape == (2, 3, 5)
    assert not batch["box_mask"][0, :, 3:].any() and not batch["boxes"][0, :, 3:].any()
    assert not batch["box_velocity_valid"][0, :, 3:].any()
    assert torch.equal(batch["box_mask"][0, :, :3], a["box_mask"]) and torch.equal(batch["box_mask"][1], b["box_mask"])
    for key in ("lidar_mask", "radar_mask", "image_mask", "action_valid"):
        assert batch[key].dtype == torch.bool and torch.equal(batch[key][1], b[key])
    assert batch["images"].shape == (2, 3, 2, 4, 6, 3) and batch["images"].dtype == torch.uint8
    assert batch["ego_pose"].dtype == torch.float64 and batch["cam_intrinsics"].shape == (2, 2, 3, 3)


def test_windows_from_real_shards_are_consecutive_frames_of_one_scene(shard_dir):
    ds = WindowDataset(shard_dir, context=2, horizon=3)
    shards = {p.stem: read_shard(p) for p in shard_dir.glob("*.shard")}
    assert len(ds) == sum(s.frames - 4 for s in shards.values())
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=1, collate_fn=collate_windows,
                        generator=torch.Generator().manual_seed(0))
    seen = 0
    for batch in loader:
        for i, (scene, start) in enumerate(zip(batch["scene"], batch["start"].tolist())):
            src = shards[scene].arrays
            assert src["timestamps"][start:start + 5].tolist() == batch["timestamps"][i].tolist()
            assert np.all(np.diff(batch["timestamps"][i].numpy()) > 0)
            for key in ("images", "lidar", "lidar_mask", "radar_mask", "actions", "ego_pose"):
                np.testing.assert_array_equal(batch[key][i].numpy(), src[key][start:start + 5])
            seen += 1
    assert seen == len(ds)
    assert all(key in batch for key in ARRAY_DTYPES)
    assert all(batch[key].shape[1] == len(shards[batch["scene"][0]].meta["cameras"]) for key in PER_CAMERA)


def test_sibling_batches_keep_each_group_together_and_cover_every_window():
    from drivejepa.data.dataset import sibling_batches

    groups = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    n, batch = 23, 4
    counts = set()
    for seed in range(5):
        batches = sibling_batches(groups, n, batch, np.random.default_rng(seed))
        counts.add(len(batches))
        assert all(len(b) == batch for b in batches)
        assert set(i for b in batches for i in b) == set(range(n))
        for g in groups:                # a group of 5 in two chunks of 3 and 2, each in one batch, never alone
            holding = [set(b) & set(g) for b in batches if set(b) & set(g)]
            assert sorted(map(len, holding)) == ([2, 3] if len(g) == 5 else [len(g)])
    assert len(counts) == 1             # how many batches does not depend on the draw
    with pytest.raises(ValueError, match="at least 2"):
        sibling_batches(groups, n, 1, np.random.default_rng(0))
