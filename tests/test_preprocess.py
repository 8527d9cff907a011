"""Preprocessing a nuScenes dataroot into shards: agreement with the devkit, actions, bad files, resume, no radar."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from drivejepa.config import ALL_RADARS, PreprocessConfig, load_config
from drivejepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests/data/preprocess_tiny.yaml"


def tiny_cfg() -> PreprocessConfig:
    return load_config(PreprocessConfig, TINY)


@pytest.fixture(scope="module")
def nusc(synth_root):
    from nuscenes.nuscenes import NuScenes

    from drivejepa.data.synth import SYNTH_VERSION

    return NuScenes(SYNTH_VERSION, str(synth_root), verbose=False)


def _shards(shard_dir):
    from drivejepa.data.shards import read_shard

    return {p.stem: read_shard(p) for p in sorted(Path(shard_dir).glob("*.shard"))}


def _run(src, out, cfg=None, **kw):
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.data.synth import SYNTH_VERSION

    return preprocess_dataroot(src, SYNTH_VERSION, out, cfg or tiny_cfg(), progress=False, **kw)


def _copy_world(synth_root, dst) -> Path:
    shutil.copytree(synth_root, dst)
    return dst


def _sample_file(nusc, scene_name, index, channel) -> Path:
    scene = next(s for s in nusc.scene if s["name"] == scene_name)
    token = scene["first_sample_token"]
    for _ in range(index):
        token = nusc.get("sample", token)["next"]
    sd = nusc.get("sample_data", nusc.get("sample", token)["data"][channel])
    return Path(sd["filename"])


# ----------------------------------------------------------------------------------------------------------------
def test_shards_match_devkit(nusc, shard_dir):
    """Points, poses, boxes and radar counts of every key frame equal what the devkit computes from the same files:
    near-sensor returns dropped (``remove_close``), unknown (NaN) box velocities flagged, not read as 0 m/s."""
    from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion
    from scipy.spatial import cKDTree

    from drivejepa.data.shards import CLASSES, category_to_class

    cfg = tiny_cfg()
    shards = _shards(shard_dir)
    assert sorted(shards) == sorted(s["name"] for s in nusc.scene)
    checked = close_dropped = unknown_velocity = 0
    for name, shard in shards.items():
        a = shard.arrays
        assert shard.meta["frame_indices"] == list(range(len(shard.meta["sample_tokens"])))
        for t, token in enumerate(shard.meta["sample_tokens"]):
            sample = nusc.get("sample", token)
            assert a["timestamps"][t] == sample["timestamp"]
            lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            pose = nusc.get("ego_pose", lidar_sd["ego_pose_token"])
            ego_to_global = transform_matrix(pose["translation"], Quaternion(pose["rotation"]))
            np.testing.assert_allclose(a["ego_pose"][t], ego_to_global, atol=1e-9)

            # lidar: devkit read -> ego frame -> crop; the shard holds a subset of exactly min(N, kept) points
            pc = LidarPointCloud.from_file(str(Path(nusc.dataroot) / lidar_sd["filename"]))
            raw = pc.nbr_points()
            pc.remove_close(1.0)                                  # the devkit's default (multisweep, projection)
            close_dropped += raw - pc.nbr_points()
            cs = nusc.get("calibrated_sensor", lidar_sd["calibrated_sensor_token"])
            pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
            pc.translate(np.array(cs["translation"]))
            pts = pc.points.T
            keep = ((np.abs(pts[:, 0]) <= cfg.lidar_range) & (np.abs(pts[:, 1]) <= cfg.lidar_range)
                    & (pts[:, 2] >= cfg.lidar_z_range[0]) & (pts[:, 2] <= cfg.lidar_z_range[1]))
            ref = pts[keep]
            mask = a["lidar_mask"][t]
            assert mask.sum() == min(cfg.lidar_points, len(ref)) > 0
            dist, idx = cKDTree(ref[:, :3]).query(a["lidar"][t][mask, :3])
            assert dist.max() < 1e-3
            np.testing.assert_allclose(a["lidar"][t][mask, 3], ref[idx, 3], atol=1e-4)
            assert not a["lidar"][t][:, 4].any()                  # one sweep: every point's time lag is 0
            assert not a["lidar"][t][~mask].any()

            # radar: devkit defaults (filters), all radars merged
            n_radar = 0
            for ch in ALL_RADARS:
                if ch in sample["data"]:
                    sd = nusc.get("sample_data", sample["data"][ch])
                    n_radar += RadarPointCloud.from_file(str(Path(nusc.dataroot) / sd["filename"])).nbr_points()
            assert a["radar_mask"][t].sum() == min(cfg.radar_points, n_radar)

            # boxes: devkit Box moved into the ego frame, detection classes within range, nearest first
            expected = []
            for ann_token in sample["anns"]:
                ann = nusc.get("sample_annotation", ann_token)
                label = category_to_class(ann["category_name"])
                if label is None:
                    continue
                box = nusc.get_box(ann_token)
                box.velocity = nusc.box_velocity(ann_token)
                box.translate(-np.array(pose["translation"]))
                box.rotate(Quaternion(pose["rotation"]).inverse)
                if abs(box.center[0]) > cfg.box_range or abs(box.center[1]) > cfg.box_range:
                    continue
                known = bool(np.isfinite(box.velocity[:2]).all())
                v = box.velocity[:2] if known else np.zeros(2)
                expected.append((np.hypot(*box.center[:2]),
                                 [*box.center, *box.wlh, box.orientation.yaw_pitch_roll[0], *v], label, known))
            expected.sort(key=lambda e: e[0])
            expected = expected[: cfg.max_boxes]
            bm = a["box_mask"][t]
            assert bm.sum() == len(expected)
            if expected:
                got, ref_boxes = a["boxes"][t][bm], np.array([e[1] for e in expected])
                yaw_error = np.remainder(got[:, 6] - ref_boxes[:, 6] + np.pi, 2 * np.pi) - np.pi
                assert np.abs(yaw_error).max() < 1e-4
                got[:, 6] = ref_boxes[:, 6]
                np.testing.assert_allclose(got, ref_boxes, atol=1e-3)
                assert a["box_labels"][t][bm].tolist() == [e[2] for e in expected]
                assert a["box_velocity_valid"][t][bm].tolist() == [e[3] for e in expected]
                unknown_velocity += sum(not e[3] for e in expected)
                assert a["box_labels"][t][bm].max() < len(CLASSES)
            assert not a["box_velocity_valid"][t][~bm].any()
            checked += 1
        cam = nusc.get("calibrated_sensor", nusc.get("sample_data", nusc.get(
            "sample", shard.meta["sample_tokens"][0])["data"]["CAM_FRONT"])["calibrated_sensor_token"])
        k = np.array(cam["camera_intrinsic"])
        sx = cfg.image_size[0] / nusc.get("sample_data", nusc.get(
            "sample", shard.meta["sample_tokens"][0])["data"]["CAM_FRONT"])["width"]
        np.testing.assert_allclose(a["cam_intrinsics"][0][0, 0], k[0, 0] * sx, rtol=1e-5)
        np.testing.assert_allclose(a["cam_intrinsics"][0][0, 2], (k[0, 2] + 0.5) * sx - 0.5, rtol=1e-5)
        assert a["images"].shape[1:] == (1, cfg.image_size[1], cfg.image_size[0], 3) and a["image_mask"].all()
        assert shard.meta["tags"] == [t.strip().lower() for t in nusc.get("scene", shard.meta["token"])[
            "description"].split(",") if t.strip()]
    assert checked == sum(len(s.meta["sample_tokens"]) for s in shards.values())
    assert close_dropped > 0.1 * checked * 20_000 and unknown_velocity > 0   # the world has both, like real scans


def test_actions_integrate_back_to_the_trajectory(shard_dir):
    for shard in _shards(shard_dir).values():
        a = shard.arrays
        poses, actions, valid = a["ego_pose"], a["actions"], a["action_valid"]
        assert valid[:-1].all() and not valid[-1] and not actions[-1].any()
        x, y, yaw = poses[0][0, 3], poses[0][1, 3], math.atan2(poses[0][1, 0], poses[0][0, 0])
        for t in range(len(poses) - 1):
            dx, dy, dyaw, speed, yaw_rate = actions[t]
            x, y = x + math.cos(yaw) * dx - math.sin(yaw) * dy, y + math.sin(yaw) * dx + math.cos(yaw) * dy
            yaw += dyaw
            true_yaw = math.atan2(poses[t + 1][1, 0], poses[t + 1][0, 0])
            assert abs(x - poses[t + 1][0, 3]) < 1e-3 and abs(y - poses[t + 1][1, 3]) < 1e-3
            assert abs(math.remainder(yaw - true_yaw, 2 * math.pi)) < 1e-4
            dt = (a["timestamps"][t + 1] - a["timestamps"][t]) * 1e-6
            assert speed == pytest.approx(math.hypot(dx, dy) / dt, rel=1e-4)
            assert yaw_rate == pytest.approx(dyaw / dt, rel=1e-4, abs=1e-6)


def test_bad_files_skip_only_their_key_frames(tmp_path, synth_root, shard_dir, nusc, ray_session):
    world = _copy_world(synth_root, tmp_path / "world")
    scenes = sorted(s["name"] for s in nusc.scene)
    broken = {
        (scenes[0], 2): (_sample_file(nusc, scenes[0], 2, "LIDAR_TOP"), "truncated or corrupt lidar"),
        (scenes[1], 5): (_sample_file(nusc, scenes[1], 5, "CAM_FRONT"), "empty file (0 bytes)"),
        (scenes[2], 0): (_sample_file(nusc, scenes[2], 0, "RADAR_FRONT_LEFT"), "missing file"),
    }
    lidar = world / broken[(scenes[0], 2)][0]
    lidar.write_bytes(lidar.read_bytes()[:-7])
    (world / broken[(scenes[1], 5)][0]).write_bytes(b"")
    (world / broken[(scenes[2], 0)][0]).unlink()
    # every lidar file of the last scene is garbage: that scene has nothing readable and is skipped whole
    for i in range(len(_shards(shard_dir)[scenes[3]].meta["sample_tokens"])):
        (world / _sample_file(nusc, scenes[3], i, "LIDAR_TOP")).write_bytes(b"\x00garbage")

    out = tmp_path / "shards"
    summary = _run(world, out)
    reported = {(s["scene"], s["index"]): s for s in summary.skipped_frames}
    for key, (rel, reason) in broken.items():
        assert reported[key]["path"] == str(world / rel) and reported[key]["reason"].startswith(reason)
    assert {k for k in reported if k[0] != scenes[3]} == set(broken)
    assert summary.skipped_scenes == [{"scene": scenes[3], "reason": "no key frame could be read"}]
    text = summary.format(max_lines=100)
    assert str(world / broken[(scenes[1], 5)][0]) in text and scenes[3] in text

    clean, got = _shards(shard_dir), _shards(out)
    assert sorted(got) == scenes[:3]
    manifest = json.loads((out / "manifest.json").read_text())
    for name in scenes[:3]:
        kept = got[name].meta["frame_indices"]
        lost = [i for (s, i) in broken if s == name]
        assert kept == [i for i in range(len(clean[name].meta["frame_indices"])) if i not in lost]
        assert manifest["scenes"][name]["frames"] == len(kept)
        assert [s["index"] for s in manifest["scenes"][name]["skipped"]] == lost
        for key, arr in clean[name].arrays.items():  # every other key frame is kept exactly
            if key in ("boxes", "box_labels", "box_mask", "box_velocity_valid"):
                arr, other = arr[kept], got[name].arrays[key]
                width = min(arr.shape[1], other.shape[1])
                assert not arr[:, width:].any() and not other[:, width:].any()
                np.testing.assert_array_equal(other[:, :width], arr[:, :width])
            elif key == "cam_intrinsics":
                np.testing.assert_array_equal(got[name].arrays[key], arr)
            else:
                np.testing.assert_array_equal(got[name].arrays[key], arr[kept], err_msg=f"{name} {key}")


def test_killed_run_resumes_to_the_same_shards(tmp_path, synth_root, shard_dir, ray_session):
    """SIGKILL a CLI run (joined to the running Ray with --address) mid-way, rerun: the shards and the manifest
    equal an uninterrupted run byte for byte, and no temporary file is left."""
    import ray

    from drivejepa.data.synth import SYNTH_VERSION

    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "drivejepa.cli", "preprocess", "-q", "--dataroot", str(synth_root), "--version",
           SYNTH_VERSION, "--out", str(out), "--config", str(TINY), "--num-workers", "1",
           "--address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, env=dict(os.environ, RAY_AUTH_MODE="disabled"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    done_at_kill = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done_at_kill = len(json.loads(manifest.read_text())["scenes"])
        except (OSError, ValueError):
            done_at_kill = None
        if done_at_kill:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    total = len(list(Path(shard_dir).glob("*.shard")))
    assert 1 <= done_at_kill < total  # the kill really came mid-way

    rerun = _run(synth_root, out)
    assert rerun.reused >= done_at_kill and rerun.written == total - rerun.reused
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in Path(shard_dir).iterdir())  # no temporary file left behind
    for name in names:
        assert (out / name).read_bytes() == (Path(shard_dir) / name).read_bytes(), name


def test_rerun_skips_complete_and_rewrites_stale(tmp_path, synth_root, shard_dir, ray_session):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    again = _run(synth_root, out)
    assert (again.written, again.reused) == (0, again.scenes)
    stale = _run(synth_root, out, cfg=load_config(PreprocessConfig, TINY, ["lidar_points=512"]))
    assert (stale.written, stale.reused) == (stale.scenes, 0)
    assert all(s.arrays["lidar"].shape[1] == 512 for s in _shards(out).values())
    assert json.loads((out / "manifest.json").read_text())["config"]["lidar_points"] == 512


def _world_with_tables(tmp_path, synth_root, edit) -> Path:
    """A dataroot sharing the fixture's files (symlinks) with tables changed by ``edit(tables)`` in place."""
    from drivejepa.data.synth import SYNTH_VERSION

    world = tmp_path / "world"
    (world / SYNTH_VERSION).mkdir(parents=True)
    for entry in Path(synth_root).iterdir():
        if entry.name != SYNTH_VERSION:
            (world / entry.name).symlink_to(entry)
    tables = {p.stem: json.loads(p.read_text()) for p in (Path(synth_root) / SYNTH_VERSION).glob("*.json")}
    edit(tables)
    for name, rows in tables.items():
        (world / SYNTH_VERSION / f"{name}.json").write_text(json.dumps(rows))
    return world


def test_dataroot_without_radar(tmp_path, synth_root, ray_session):
    """Radar channels absent from the tables: recorded as absent, masks all False, every key frame kept."""
    def drop_radar(tables):
        radar_sensors = {s["token"] for s in tables["sensor"] if s["channel"].startswith("RADAR")}
        radar_cs = {c["token"] for c in tables["calibrated_sensor"] if c["sensor_token"] in radar_sensors}
        tables["sensor"] = [s for s in tables["sensor"] if s["token"] not in radar_sensors]
        tables["calibrated_sensor"] = [c for c in tables["calibrated_sensor"] if c["token"] not in radar_cs]
        tables["sample_data"] = [d for d in tables["sample_data"] if d["calibrated_sensor_token"] not in radar_cs]

    world = _world_with_tables(tmp_path, synth_root, drop_radar)
    summary = _run(world, tmp_path / "shards", cfg=load_config(PreprocessConfig, TINY, ["cameras=[CAM_FRONT]"]))
    assert summary.skipped_frames == [] and summary.skipped_scenes == [] and summary.frames > 0
    for shard in _shards(tmp_path / "shards").values():
        assert set(ALL_RADARS) <= set(shard.meta["channels_absent"])
        assert not shard.arrays["radar_mask"].any() and shard.arrays["lidar_mask"].any()
        assert shard.arrays["radar"].shape[1:] == (64, 6)


def test_every_dropped_box_is_counted_by_reason(tmp_path, synth_root, nusc):
    """Boxes of non-detection categories, outside box_range and past max_boxes are counted per scene in the
    manifest, and with the kept ones they add up to every annotation of the kept key frames."""
    from nuscenes.utils.geometry_utils import transform_matrix
    from pyquaternion import Quaternion

    from drivejepa.data.shards import category_to_class

    instances = sorted(nusc.instance, key=lambda i: -i["nbr_annotations"])[:3]
    animal = next(c["token"] for c in nusc.category if c["name"] == "animal")

    def relabel(tables):
        for inst in tables["instance"]:
            if inst["token"] in {i["token"] for i in instances}:
                inst["category_token"] = animal

    world = _world_with_tables(tmp_path, synth_root, relabel)
    cfg = load_config(PreprocessConfig, TINY, ["max_boxes=4", "box_range=30.0"])
    _run(world, tmp_path / "shards", cfg=cfg, num_workers=0)
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    relabelled = {i["token"] for i in instances}
    totals = {"category": 0, "out_of_range": 0, "past_max_boxes": 0}
    for name, entry in manifest["scenes"].items():
        shard = _shards(tmp_path / "shards")[name]
        expected = {"category": 0, "out_of_range": 0, "past_max_boxes": 0}
        anns = 0
        for token in shard.meta["sample_tokens"]:
            sample = nusc.get("sample", token)
            pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
            to_ego = np.linalg.inv(transform_matrix(pose["translation"], Quaternion(pose["rotation"])))
            in_range = 0
            for ann_token in sample["anns"]:
                ann = nusc.get("sample_annotation", ann_token)
                anns += 1
                if ann["instance_token"] in relabelled or category_to_class(ann["category_name"]) is None:
                    expected["category"] += 1
                    continue
                x, y, _ = to_ego[:3, :3] @ ann["translation"] + to_ego[:3, 3]
                if abs(x) > cfg.box_range or abs(y) > cfg.box_range:
                    expected["out_of_range"] += 1
                else:
                    in_range += 1
            expected["past_max_boxes"] += max(0, in_range - cfg.max_boxes)
        assert entry["boxes_dropped"] == expected, name
        assert anns == sum(expected.values()) + int(shard.arrays["box_mask"].sum())
        totals = {k: totals[k] + v for k, v in expected.items()}
    assert min(totals.values()) > 0


def test_shards_of_an_older_schema_are_rebuilt_never_read(tmp_path, synth_root, shard_dir):
    from drivejepa.data.shards import SCHEMA_VERSION, load_manifest, read_shard, write_shard

    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    old = sorted(out.glob("*.shard"))[0]
    shard = read_shard(old)
    arrays = {k: np.array(v) for k, v in shard.arrays.items()}
    write_shard(old, dict(shard.meta, schema_version=SCHEMA_VERSION - 1), arrays)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=SCHEMA_VERSION - 1)))
    with pytest.raises(UserError, match=f"schema version {SCHEMA_VERSION - 1} is not {SCHEMA_VERSION}"):
        load_manifest(out)
    again = _run(synth_root, out)
    assert (again.written, again.reused) == (1, again.scenes - 1)
    assert read_shard(old).meta["schema_version"] == SCHEMA_VERSION and load_manifest(out)
    assert old.read_bytes() == (Path(shard_dir) / old.name).read_bytes()


def test_inconsistent_table_entry_skips_its_key_frame(tmp_path, synth_root, nusc, ray_session):
    scene = nusc.scene[0]
    target = nusc.get("sample", nusc.get("sample", scene["first_sample_token"])["next"])
    bad_sd = target["data"]["CAM_FRONT"]

    def dangle(tables):
        next(d for d in tables["sample_data"] if d["token"] == bad_sd)["ego_pose_token"] = "no-such-pose"

    summary = _run(_world_with_tables(tmp_path, synth_root, dangle), tmp_path / "shards",
                   cfg=load_config(PreprocessConfig, TINY, ["cameras=[CAM_FRONT]"]))
    assert [(s["scene"], s["index"]) for s in summary.skipped_frames] == [(scene["name"], 1)]
    assert "inconsistent table entry" in summary.skipped_frames[0]["reason"]
    shard = _shards(tmp_path / "shards")[scene["name"]]
    assert target["token"] not in shard.meta["sample_tokens"] and shard.meta["frame_indices"][:2] == [0, 2]
    assert summary.frames == sum(len(s.meta["sample_tokens"]) for s in _shards(tmp_path / "shards").values())


def test_splits_resolve_through_the_manifest(shard_dir):
    from drivejepa.data.shards import scenes_in_split

    everything = scenes_in_split(shard_dir)
    train, val = scenes_in_split(shard_dir, "train"), scenes_in_split(shard_dir, "val")
    assert val == [s for s in everything if int(s.split("-")[1]) % 5 == 3] and val
    assert sorted(train + val) == everything
    with pytest.raises(UserError, match="unknown split 'nope'"):
        scenes_in_split(shard_dir, "nope")


def test_missing_dataroot_or_version_is_one_line_error(tmp_path, synth_root):
    from drivejepa.cli import main

    cases = [(tmp_path / "nowhere", "v1.0-mini", "dataroot does not exist"),
             (synth_root, "v1.0-nope", "version 'v1.0-nope' not found")]
    for root, version, message in cases:
        with pytest.raises(UserError, match=message):
            _run_version(root, version, tmp_path / "out")
        assert main(["preprocess", "-q", "--dataroot", str(root), "--version", version, "--out",
                     str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def _run_version(root, version, out):
    from drivejepa.data.preprocess import preprocess_dataroot

    return preprocess_dataroot(root, version, out, tiny_cfg(), progress=False)
