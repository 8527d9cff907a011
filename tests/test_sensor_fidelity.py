"""What each sensor saw and when, checked against the devkit: camera timing and poses, lidar sweeps, intrinsics.

The synthetic world is as untidy as real nuScenes here: its cameras fire up to ~32 ms from the lidar while the ego
moves, each with its own ego pose, and its lidar sees the ego's own roof within a metre of the sensor.
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from drivejepa.config import ALL_CAMERAS, PreprocessConfig, load_config
from drivejepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests/data/preprocess_tiny.yaml"


def _nusc(root):
    from nuscenes.nuscenes import NuScenes

    from drivejepa.data.synth import SYNTH_VERSION

    return NuScenes(SYNTH_VERSION, str(root), verbose=False)


def _build(nusc, scene_name: str, cfg: PreprocessConfig, out: Path):
    """One scene's shard built in this process (no Ray), read back."""
    from drivejepa.data.frames import build_scene
    from drivejepa.data.nuscenes_tasks import scene_task
    from drivejepa.data.shards import read_shard

    scene = next(s for s in nusc.scene if s["name"] == scene_name)
    report = build_scene(scene_task(nusc, scene, cfg), cfg, "test", str(out))
    return read_shard(out), report


def _lidar_in_ego(nusc, sd: dict) -> np.ndarray:
    """The raw scan of lidar sample_data ``sd`` in its ego frame, [N, 3], file order, moved by the devkit."""
    from nuscenes.utils.data_classes import LidarPointCloud
    from pyquaternion import Quaternion

    pc = LidarPointCloud.from_file(str(Path(nusc.dataroot) / sd["filename"]))
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
    pc.translate(np.array(cs["translation"]))
    return pc.points[:3].T


@pytest.fixture(scope="module")
def sweep_world(tmp_path_factory) -> Path:
    """One urban scene of 3 key frames with every sweep between them (lidar 20 Hz)."""
    from drivejepa.data.synth import write_world

    out = tmp_path_factory.mktemp("sweeps") / "nuscenes"
    write_world(out, scenes=1, samples_per_scene=3, seed=1, image_size=(64, 36), cameras=["CAM_FRONT"], sweeps=True,
                workers=1, progress=False)
    return out


# ----------------------------------------------------------------------------------------------------------------
def test_lidar_lands_in_every_camera_where_the_devkit_projects_it(synth_root, tmp_path, monkeypatch):
    """Each shard lidar point, put into each shard camera with the shard's own transforms and intrinsics, lands
    within half a pixel (median, full resolution) of the devkit's ``map_pointcloud_to_image``, which moves it from
    the lidar's ego pose to the camera's own. The ego is on the highway (over 15 m/s): the per-scene camera
    calibration alone misses by pixels."""
    import nuscenes.nuscenes
    from scipy.spatial import cKDTree

    from drivejepa.data.nuscenes_tasks import pose_matrix

    nusc = _nusc(synth_root)
    cfg = load_config(PreprocessConfig, TINY, [f"cameras=[{','.join(ALL_CAMERAS)}]", "image_size=[160,96]",
                                               "lidar_points=6000"])
    shard, _ = _build(nusc, "scene-0002", cfg, tmp_path / "scene.shard")
    a = shard.arrays
    assert a["actions"][:-1, 3].min() > 15.0
    lag_us = np.abs(a["cam_timestamps"] - a["timestamps"][:, None])
    assert lag_us.max() > 25_000 and (lag_us > 5_000).mean() > 0.5     # the cameras fire around the lidar

    captured = []
    view_points = nuscenes.nuscenes.view_points

    def spy(points, view, normalize):      # the devkit's camera-frame cloud: every raw point, in file order
        out = view_points(points, view, normalize)
        captured.append((np.array(points[:3]), out))
        return out

    monkeypatch.setattr(nuscenes.nuscenes, "view_points", spy)
    misses = {c: [] for c in ALL_CAMERAS}
    static = {c: [] for c in ALL_CAMERAS}
    for t, token in enumerate(shard.meta["sample_tokens"]):
        sample = nusc.get("sample", token)
        lidar_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        pts = a["lidar"][t][a["lidar_mask"][t], :3].astype(np.float64)
        dist, idx = cKDTree(_lidar_in_ego(nusc, lidar_sd)).query(pts)
        assert dist.max() < 1e-3
        for c, channel in enumerate(cfg.cameras):
            cam_sd = nusc.get("sample_data", sample["data"][channel])
            nusc.explorer.map_pointcloud_to_image(lidar_sd["token"], cam_sd["token"])
            cam_dev, uv_dev = captured[-1]
            depth, uv_dev = cam_dev[2, idx], uv_dev[:2, idx].T
            full = np.array([cam_sd["width"], cam_sd["height"]], dtype=np.float64)
            seen = (depth > 1.0) & (uv_dev > 1).all(axis=1) & (uv_dev < full - 1).all(axis=1)
            small = np.array(cfg.image_size, dtype=np.float64)
            K = a["cam_intrinsics"][c].astype(np.float64)
            calib = pose_matrix(nusc.get("calibrated_sensor", cam_sd["calibrated_sensor_token"]))
            for transform, out in ((a["cam_to_key_ego"][t, c], misses), (calib, static)):
                to_cam = np.linalg.inv(transform.astype(np.float64))
                cam = pts[seen] @ to_cam[:3, :3].T + to_cam[:3, 3]
                uv = cam @ K.T
                uv = (uv[:, :2] / uv[:, 2:3] + 0.5) * full / small - 0.5       # shard pixels -> full resolution
                out[channel].append(np.hypot(*(uv - uv_dev[seen]).T))
    for channel in ALL_CAMERAS:
        miss = np.concatenate(misses[channel])
        assert len(miss) > 200, channel
        assert np.median(miss) < 0.5, (channel, np.median(miss))
    worst_static = max(np.median(np.concatenate(static[c])) for c in ALL_CAMERAS)
    assert worst_static > 3.0          # ignoring the camera's own time and pose would be caught


def test_sweeps_accumulate_like_from_file_multisweep(sweep_world, tmp_path):
    """lidar_sweeps=5: the same points as the devkit's ``from_file_multisweep`` (near-sensor returns dropped in each
    sweep's own sensor frame before it is moved), each with the devkit's time lag; none within the radius of the
    sensor in any sweep, although every raw sweep has such returns (the ego's roof)."""
    from nuscenes.utils.data_classes import LidarPointCloud
    from pyquaternion import Quaternion
    from scipy.spatial import cKDTree

    from drivejepa.data.nuscenes_tasks import pose_matrix

    nusc = _nusc(sweep_world)
    cfg = load_config(PreprocessConfig, TINY, ["lidar_sweeps=5", "lidar_points=200000"])
    shard, report = _build(nusc, "scene-0001", cfg, tmp_path / "scene.shard")
    assert report["missing_sweeps"] == [] and report["skipped"] == []
    a, r = shard.arrays, 1.0              # the devkit's default radius
    for t, token in enumerate(shard.meta["sample_tokens"]):
        sample = nusc.get("sample", token)
        pc, times = LidarPointCloud.from_file_multisweep(nusc, sample, "LIDAR_TOP", "LIDAR_TOP", nsweeps=5)
        key_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        cs = nusc.get("calibrated_sensor", key_sd["calibrated_sensor_token"])
        pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
        pc.translate(np.array(cs["translation"]))
        ref, times = pc.points[:3].T, times[0]
        keep = ((np.abs(ref[:, 0]) <= cfg.lidar_range) & (np.abs(ref[:, 1]) <= cfg.lidar_range)
                & (ref[:, 2] >= cfg.lidar_z_range[0]) & (ref[:, 2] <= cfg.lidar_z_range[1]))
        got = a["lidar"][t][a["lidar_mask"][t]]
        assert len(got) == keep.sum()
        dist, idx = cKDTree(ref[keep]).query(got[:, :3])
        assert dist.max() < 1e-3
        np.testing.assert_allclose(got[:, 4], times[keep][idx], atol=1e-6)
        lags = np.unique(got[:, 4])
        assert len(lags) == (1 if t == 0 else 5)

        sd, key_pose = key_sd, pose_matrix(nusc.get("ego_pose", key_sd["ego_pose_token"]))
        for lag in lags:                   # each sweep's points, back in that sweep's own sensor frame
            while 1e-6 * (key_sd["timestamp"] - sd["timestamp"]) < lag - 1e-6:
                sd = nusc.get("sample_data", sd["prev"])
            sensor_to_key = (np.linalg.inv(key_pose) @ pose_matrix(nusc.get("ego_pose", sd["ego_pose_token"]))
                             @ pose_matrix(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])))
            back = np.linalg.inv(sensor_to_key)
            own = got[np.abs(got[:, 4] - lag) < 1e-6, :3].astype(np.float64) @ back[:3, :3].T + back[:3, 3]
            assert not ((np.abs(own[:, 0]) < r) & (np.abs(own[:, 1]) < r)).any()
            raw = LidarPointCloud.from_file(str(Path(nusc.dataroot) / sd["filename"])).points
            assert ((np.abs(raw[0]) < r) & (np.abs(raw[1]) < r)).mean() > 0.1


def test_a_missing_sweep_drops_only_that_sweep_and_is_reported(sweep_world, tmp_path):
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.data.shards import read_shard, shard_path
    from drivejepa.data.synth import SYNTH_VERSION

    world = tmp_path / "world"
    shutil.copytree(sweep_world, world)
    nusc = _nusc(world)
    sample = nusc.get("sample", nusc.get("sample", nusc.scene[0]["first_sample_token"])["next"])
    key_sd = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    lost = nusc.get("sample_data", key_sd["prev"])
    (world / lost["filename"]).unlink()

    cfg = load_config(PreprocessConfig, TINY, ["lidar_sweeps=3", "lidar_points=200000"])
    summary = preprocess_dataroot(world, SYNTH_VERSION, tmp_path / "shards", cfg, num_workers=0, progress=False)
    assert summary.skipped_frames == [] and summary.frames == 3
    expected = [{"scene": "scene-0001", "index": 1, "sample": sample["token"], "path": str(world / lost["filename"]),
                 "reason": "missing file"}]
    assert summary.missing_sweeps == expected
    assert str(world / lost["filename"]) in summary.format()
    entry = read_shard(shard_path(tmp_path / "shards", "scene-0001"))
    assert entry.meta["missing_sweeps"] == [{k: v for k, v in expected[0].items() if k != "scene"}]
    lags = np.unique(entry.arrays["lidar"][1][entry.arrays["lidar_mask"][1], 4])
    lost_lag = 1e-6 * (key_sd["timestamp"] - lost["timestamp"])
    assert len(lags) == 2 and np.abs(lags - lost_lag).min() > 1e-3     # the key scan and the older sweep only


def test_sweeps_asked_of_a_dataroot_without_them_is_one_error_up_front(synth_root, tmp_path):
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.data.synth import SYNTH_VERSION

    cfg = load_config(PreprocessConfig, TINY, ["lidar_sweeps=2"])
    with pytest.raises(UserError, match=r"sweeps/LIDAR_TOP: lidar_sweeps = 2 needs the lidar sweeps"):
        preprocess_dataroot(synth_root, SYNTH_VERSION, tmp_path / "out", cfg, num_workers=0, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("original, size, fmt", [((1600, 900), (224, 128), "JPEG"),    # DCT 1/4, then resize
                                                 ((1600, 900), (112, 64), "JPEG"),     # DCT 1/8: 113 rows for 112.5
                                                 ((1600, 900), (200, 113), "JPEG"),    # DCT 1/8 is already the size
                                                 ((800, 450), (320, 180), "PNG")])     # no DCT scaling
def test_a_known_pixel_lands_where_the_scaled_intrinsics_say(tmp_path, original, size, fmt):
    """Bright spots at known sub-pixel positions of a test pattern, decoded and resized as preprocessing does: the
    centroid of each lands where the shard's intrinsics put the ray through it (half-pixel convention)."""
    from PIL import Image

    from drivejepa.data.frames import load_image, scale_intrinsics

    W, H = original
    K = np.array([[0.8 * W, 0.0, W / 2 + 3.3], [0.0, 0.8 * W, H / 2 - 7.6], [0.0, 0.0, 1.0]])
    spots = np.array([[0.1 * W + 0.3, 0.15 * H + 0.8], [0.88 * W + 0.4, 0.85 * H + 0.2], [W / 2 + 0.4, H / 2 + 0.3],
                      [0.3 * W, 0.8 * H]])
    sigma = 2.0 * W / size[0]
    yy, xx = np.mgrid[0:H, 0:W]
    pattern = sum(np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * sigma ** 2)) for u, v in spots)
    img = Image.fromarray(np.repeat((255 * pattern)[..., None], 3, axis=2).astype(np.uint8))
    path = tmp_path / f"pattern.{fmt.lower()}"
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 98} if fmt == "JPEG" else {}))
    path.write_bytes(buf.getvalue())

    out, got_original = load_image(str(path), size)
    assert got_original == original and out.shape == (size[1], size[0], 3)
    k = scale_intrinsics(K, original, size)
    gray = out.astype(np.float64).mean(axis=2)
    for u, v in spots:
        ray = np.linalg.solve(K, [u, v, 1.0])
        expected = (k @ ray)[:2] / (k @ ray)[2]
        x0, y0 = np.round(expected).astype(int)
        win = gray[max(0, y0 - 6):y0 + 7, max(0, x0 - 6):x0 + 7]
        win = np.clip(win - np.median(gray), 0, None)
        wy, wx = np.mgrid[max(0, y0 - 6):y0 + 7, max(0, x0 - 6):x0 + 7][:, :win.shape[0], :win.shape[1]]
        centroid = np.array([(wx * win).sum(), (wy * win).sum()]) / win.sum()
        assert np.abs(centroid - expected).max() < 0.1, (u, v, centroid, expected)
