"""The synthetic world is a real nuScenes dataroot: the devkit loads it and its own tools agree with it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pyquaternion import Quaternion

from drivejepa.config import ALL_CAMERAS, ALL_RADARS
from drivejepa.data.synth import SYNTH_VERSION, read_summary, write_world
from drivejepa.data.synth.materials import MATERIALS, VEHICLE
from drivejepa.data.synth.scenarios import TAG_VOCABULARY
from drivejepa.data.synth.world import build_world

CHANNELS = ALL_CAMERAS + ALL_RADARS + ["LIDAR_TOP"]


@pytest.fixture(scope="module")
def nusc(synth_root):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(SYNTH_VERSION, str(synth_root), verbose=False)


@pytest.fixture(scope="module")
def ten_worlds():
    """The demo world's ten scenes, simulated (not rendered) for 40 key frames."""
    return [build_world(n, 0, 19.5) for n in range(1, 11)]


def _scene_samples(nusc, scene):
    out, token = [], scene["first_sample_token"]
    while token:
        s = nusc.get("sample", token)
        out.append(s)
        token = s["next"]
    return out


def _scene(nusc, *, without=(), having=()):
    for scene in nusc.scene:
        tags = [t.strip() for t in scene["description"].split(",")]
        if not set(without) & set(tags) and set(having) <= set(tags):
            return scene
    raise AssertionError(f"no scene with {having} and without {without}")


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".drivejepa-synth.json"}


# ---------------------------------------------------------------------------------------------------------------------
# Structure: tables, chains, files
# ---------------------------------------------------------------------------------------------------------------------
def test_devkit_loads_every_table_and_file(nusc, synth_root):
    assert [s["name"] for s in nusc.scene] == ["scene-0001", "scene-0002", "scene-0003", "scene-0004"]
    assert len(nusc.sample) == 4 * 12
    for scene in nusc.scene:
        samples = _scene_samples(nusc, scene)
        assert len(samples) == scene["nbr_samples"] == 12
        assert np.all(np.diff([s["timestamp"] for s in samples]) == 500_000)       # 2 Hz key frames
        for s in samples:
            assert sorted(s["data"]) == sorted(CHANNELS)
    for sd in nusc.sample_data:
        assert (synth_root / sd["filename"]).is_file()
        assert nusc.get("ego_pose", sd["ego_pose_token"])["timestamp"] == sd["timestamp"]
        if sd["next"]:
            nxt = nusc.get("sample_data", sd["next"])
            assert nxt["prev"] == sd["token"] and nxt["channel"] == sd["channel"] and nxt["timestamp"] > sd["timestamp"]
        assert (sd["width"], sd["height"]) == ((320, 180) if sd["sensor_modality"] == "camera" else (0, 0))
    for inst in nusc.instance:
        chain, token = [], inst["first_annotation_token"]
        while token:
            chain.append(token)
            token = nusc.get("sample_annotation", token)["next"]
        assert len(chain) == inst["nbr_annotations"] and chain[-1] == inst["last_annotation_token"]
    cats = {c["name"] for c in nusc.category}
    used = {a["category_name"] for a in nusc.sample_annotation}
    assert used <= cats and {"vehicle.car", "human.pedestrian.adult"} <= used
    tokens = [r["token"] for t in nusc.table_names for r in getattr(nusc, t) if t != "visibility"]
    assert len(set(tokens)) == len(tokens) and all(len(t) == 32 for t in tokens)


def test_ego_drives_on_the_map_mask(nusc):
    for scene in nusc.scene:
        log = nusc.get("log", scene["log_token"])
        mask = nusc.get("map", log["map_token"])["mask"]
        poses = [nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"])
                 for s in _scene_samples(nusc, scene)]
        x, y = np.array([p["translation"][:2] for p in poses]).T
        assert mask.is_on_mask(x, y).all(), scene["name"]


# ---------------------------------------------------------------------------------------------------------------------
# Lidar
# ---------------------------------------------------------------------------------------------------------------------
def test_points_in_annotated_boxes_match_num_lidar_pts(nusc):
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import points_in_box

    checked = with_points = 0
    for sample in nusc.sample:
        path, boxes, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        pc = LidarPointCloud.from_file(path)
        for box in boxes:
            ann = nusc.get("sample_annotation", box.token)
            assert points_in_box(box, pc.points[:3]).sum() == ann["num_lidar_pts"], ann["token"]
            checked += 1
            with_points += ann["num_lidar_pts"] > 0
    assert checked > 500 and with_points > 0.8 * checked


def test_lidar_scan_is_a_realistic_32_beam_sweep(nusc, synth_root):
    scene = _scene(nusc, without=("rain",))
    for sample in _scene_samples(nusc, scene)[::4]:
        raw = np.fromfile(synth_root / nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["filename"],
                          dtype=np.float32).reshape(-1, 5)
        assert 20_000 <= len(raw) <= 35_000
        assert set(np.unique(raw[:, 4]).astype(int)) <= set(range(32)) and len(np.unique(raw[:, 4])) >= 20
        assert raw[:, 3].min() >= 0 and raw[:, 3].max() <= 255
        assert np.hypot(raw[:, 0], raw[:, 1]).max() <= 81.0


def test_lidar_sees_the_ego_roof_around_the_sensor(nusc, synth_root):
    """Real scans hold returns off the ego's own body within the devkit's remove_close(1.0) square (23% of a
    v1.0-mini scan); so do these: a large share, on the roof below the sensor, with vehicle intensities. (Frames
    with another agent's box within 3 m of the ego are left out: the simulation lets a car overlap the ego.)"""
    vehicle = MATERIALS[VEHICLE].intensity
    checked = 0
    for sample in nusc.sample:
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        ego = nusc.get("ego_pose", lidar["ego_pose_token"])["translation"]
        if any(np.hypot(*np.subtract(nusc.get("sample_annotation", a)["translation"], ego)[:2]) < 3.0
               for a in sample["anns"]):
            continue
        raw = np.fromfile(synth_root / lidar["filename"], dtype=np.float32).reshape(-1, 5)
        close = (np.abs(raw[:, 0]) < 1.0) & (np.abs(raw[:, 1]) < 1.0)
        assert 0.1 < close.mean() < 0.45
        assert np.abs(np.median(raw[close, 2]) + 0.3) < 0.05
        assert vehicle[0] <= raw[close, 3].min() and raw[close, 3].max() <= vehicle[1]
        checked += 1
    assert checked > 0.8 * len(nusc.sample)


def test_cameras_fire_around_the_lidar_each_with_its_own_ego_pose(nusc):
    """As in nuScenes: each camera's key-frame sample_data has its own time stamp, up to ~32 ms from the lidar's
    (the sample's), and its own ego pose: where the moving ego was at that time."""
    fast = 0
    for scene in nusc.scene:
        samples = _scene_samples(nusc, scene)
        for prev, sample in zip(samples, samples[1:]):
            lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            lidar_pose = nusc.get("ego_pose", lidar["ego_pose_token"])
            before = nusc.get("ego_pose", nusc.get("sample_data", prev["data"]["LIDAR_TOP"])["ego_pose_token"])
            speed = np.hypot(*np.subtract(lidar_pose["translation"], before["translation"])[:2]) / 0.5
            assert lidar["timestamp"] == sample["timestamp"] == lidar_pose["timestamp"]
            offsets = []
            for ch in ALL_CAMERAS:
                sd = nusc.get("sample_data", sample["data"][ch])
                pose = nusc.get("ego_pose", sd["ego_pose_token"])
                offset = sd["timestamp"] - lidar["timestamp"]
                assert pose["timestamp"] == sd["timestamp"] and abs(offset) <= 40_000
                moved = np.hypot(*np.subtract(pose["translation"], lidar_pose["translation"])[:2])
                assert abs(moved - speed * abs(offset) * 1e-6) < 0.05 + 0.2 * speed * abs(offset) * 1e-6
                fast += moved > 0.3
                offsets.append(offset)
            assert len(set(offsets)) == len(ALL_CAMERAS) and min(offsets) < -25_000 and max(offsets) > 5_000
    assert fast > 0


def test_rain_gives_fewer_and_noisier_lidar_returns():
    from drivejepa.data.synth import lidar

    world = build_world(3, 0, 2.0)
    dirs = lidar.sensor_directions()
    counts, spread = {}, {}
    for weather in ("day", "rain"):
        world.weather = weather
        pts, agent, _ = lidar.scan(world, 1.0, np.random.default_rng(0), dirs)
        counts[weather] = len(pts)
        ground = (np.abs(pts[:, 2] + 1.84) < 0.3) & (agent < 0) & (pts[:, 2] < -1.0)
        r = np.linalg.norm(pts[ground, :3], axis=1)
        true_range = 1.84 / (-pts[ground, 2] / r)                    # along the same ray, to the ground plane
        err = r - true_range
        spread[weather] = float(np.median(np.abs(err - np.median(err))))
    assert counts["rain"] < 0.85 * counts["day"]
    assert spread["rain"] > 1.5 * spread["day"]


# ---------------------------------------------------------------------------------------------------------------------
# Cameras: lidar points land on the surface they hit; night and rain
# ---------------------------------------------------------------------------------------------------------------------
def _material_of_intensity(intensity: np.ndarray) -> np.ndarray:
    out = np.zeros(len(intensity), dtype=np.int64)
    for m, mat in MATERIALS.items():
        lo, hi = mat.intensity
        out[(intensity >= lo) & (intensity <= hi)] = m
    return out


def _material_of_colour(rgb: np.ndarray) -> np.ndarray:
    """Nearest material colour, allowing each face's shading factor (0.55-1.0)."""
    best = np.full(len(rgb), np.inf)
    out = np.zeros(len(rgb), dtype=np.int64)
    rgb = rgb.astype(np.float64)
    for m, mat in MATERIALS.items():
        for c in mat.colours:
            c = np.array(c, dtype=np.float64)
            s = np.clip(rgb @ c / (c @ c), 0.5, 1.05)
            err = np.linalg.norm(rgb - s[:, None] * c, axis=1)
            better = err < best
            best[better], out[better] = err[better], m
    return out


def test_lidar_points_project_onto_pixels_of_the_surface_they_hit(nusc, synth_root):
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.geometry_utils import view_points

    scene = _scene(nusc, without=("night", "rain"))
    agree = total = on_agents = agents_agree = 0
    for sample in _scene_samples(nusc, scene)[::3]:
        lidar_token = sample["data"]["LIDAR_TOP"]
        pc = LidarPointCloud.from_file(nusc.get_sample_data_path(lidar_token))
        intensity = pc.points[3].copy()
        lsd = nusc.get("sample_data", lidar_token)
        for cam in ALL_CAMERAS:
            cam_token = sample["data"][cam]
            uv, depth, image = nusc.explorer.map_pointcloud_to_image(lidar_token, cam_token)
            # the same transform chain the devkit used, to recover which point each pixel belongs to
            csd = nusc.get("sample_data", cam_token)
            p = LidarPointCloud(pc.points.copy())
            for rec, inverse in ((nusc.get("calibrated_sensor", lsd["calibrated_sensor_token"]), False),
                                 (nusc.get("ego_pose", lsd["ego_pose_token"]), False),
                                 (nusc.get("ego_pose", csd["ego_pose_token"]), True),
                                 (nusc.get("calibrated_sensor", csd["calibrated_sensor_token"]), True)):
                if inverse:
                    p.translate(-np.array(rec["translation"]))
                    p.rotate(Quaternion(rec["rotation"]).rotation_matrix.T)
                else:
                    p.rotate(Quaternion(rec["rotation"]).rotation_matrix)
                    p.translate(np.array(rec["translation"]))
            mine = view_points(p.points[:3], np.array(nusc.get("calibrated_sensor", csd["calibrated_sensor_token"])
                                                        ["camera_intrinsic"]), normalize=True)
            keep = ((p.points[2] > 1.0) & (mine[0] > 1) & (mine[0] < image.size[0] - 1) & (mine[1] > 1)
                    & (mine[1] < image.size[1] - 1))
            assert np.allclose(mine[:2, keep], uv[:2])
            pixels = np.asarray(image)[uv[1].astype(int), uv[0].astype(int)]
            want = _material_of_intensity(intensity[keep])
            got = _material_of_colour(pixels)
            agree += int((want == got).sum())
            total += len(want)
            agent = np.isin(want, list(MATERIALS)) & (want >= 5) & (want != 8)    # bodies, not ground or poles
            on_agents += int(agent.sum())
            agents_agree += int((want == got)[agent].sum())
    assert total > 20_000
    assert agree / total > 0.9, f"{agree}/{total} projected lidar points land on their surface's colour"
    assert on_agents > 2_000 and agents_agree / on_agents > 0.8


def test_night_images_are_dark_and_rain_images_darker_and_noisier(nusc, synth_root):
    from PIL import Image

    from drivejepa.data.synth.camera import Renderer

    def brightness(scene):
        sample = _scene_samples(nusc, scene)[5]
        return np.asarray(Image.open(synth_root / nusc.get("sample_data", sample["data"]["CAM_FRONT"])["filename"])).mean()

    assert brightness(_scene(nusc, having=("night",))) < 0.35 * brightness(_scene(nusc, without=("night", "rain")))
    world = build_world(3, 0, 2.0)                      # the same view in each weather
    seen = {}
    for weather in ("day", "night", "rain"):
        world.weather = weather
        img = Renderer(world, 320, 180, np.random.default_rng(0)).render("CAM_FRONT", 1.0).astype(np.float64)
        seen[weather] = (img.mean(), np.abs(np.diff(img, axis=1)).mean())
    assert seen["night"][0] < 0.35 * seen["day"][0]
    assert seen["rain"][0] < 0.85 * seen["day"][0] and seen["rain"][1] > 1.5 * seen["day"][1]


# ---------------------------------------------------------------------------------------------------------------------
# Radar
# ---------------------------------------------------------------------------------------------------------------------
def test_radar_returns_pass_default_filters_and_move_with_their_agents(nusc):
    from nuscenes.utils.data_classes import RadarPointCloud
    from nuscenes.utils.geometry_utils import points_in_box

    on_agents = moving = agree = 0
    for sample in nusc.sample[::2]:
        for ch in ALL_RADARS:
            sd_token = sample["data"][ch]
            pc = RadarPointCloud.from_file(nusc.get_sample_data_path(sd_token))      # default filters
            if pc.nbr_points() == 0:
                continue
            sd = nusc.get("sample_data", sd_token)
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            to_global = Quaternion(pose["rotation"]).rotation_matrix @ Quaternion(cs["rotation"]).rotation_matrix
            _, boxes, _ = nusc.get_sample_data(sd_token)
            for box in boxes:
                inside = points_in_box(box, pc.points[:3])
                if not inside.any():
                    continue
                on_agents += int(inside.sum())
                truth = nusc.box_velocity(box.token)[:2]
                if not np.all(np.isfinite(truth)) or np.hypot(*truth) < 1.0:
                    continue
                v = to_global @ np.vstack([pc.points[8:10, inside], np.zeros(int(inside.sum()))])
                err = np.hypot(*(v[:2] - truth[:, None]))
                moving += len(err)
                agree += int((err < max(1.0, 0.15 * np.hypot(*truth))).sum())
    assert on_agents > 100
    assert moving > 30 and agree / moving > 0.9, f"{agree}/{moving}"
    assert any(a["num_radar_pts"] > 0 for a in nusc.sample_annotation)


# ---------------------------------------------------------------------------------------------------------------------
# Devkit tools
# ---------------------------------------------------------------------------------------------------------------------
def test_devkit_rendering_and_queries_work(nusc, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = nusc.sample[6]
    for ch in ("LIDAR_TOP", "RADAR_FRONT", "CAM_FRONT"):
        out = tmp_path / f"{ch}.png"
        nusc.render_sample_data(sample["data"][ch], out_path=str(out), verbose=False)
        plt.close("all")
        assert out.stat().st_size > 10_000
    path, boxes, intrinsic = nusc.get_sample_data(sample["data"]["CAM_FRONT"])
    assert Path(path).is_file() and intrinsic.shape == (3, 3) and boxes
    velocities = [nusc.box_velocity(t) for t in sample["anns"]]
    assert any(np.hypot(*v[:2]) > 1.0 for v in velocities if np.all(np.isfinite(v)))


def test_parked_cars_stay_and_pedestrians_walk(nusc):
    attr = {a["token"]: a["name"] for a in nusc.attribute}
    parked = {}
    for ann in nusc.sample_annotation:
        names = {attr[t] for t in ann["attribute_tokens"]}
        if "vehicle.parked" in names:
            parked.setdefault(ann["instance_token"], set()).add(tuple(ann["translation"]))
    assert parked and all(len(p) == 1 for p in parked.values())
    assert any(attr[t] == "pedestrian.moving" for a in nusc.sample_annotation for t in a["attribute_tokens"])


# ---------------------------------------------------------------------------------------------------------------------
# Behaviour and scene tags of the 10-scene demo world
# ---------------------------------------------------------------------------------------------------------------------
def test_every_tag_occurs_in_several_of_ten_scenes(ten_worlds):
    counts = {t: sum(t in w.tags for w in ten_worlds) for t in TAG_VOCABULARY}
    assert all(c >= 2 for c in counts.values()), counts


def test_ego_speeds_up_brakes_stops_and_turns(ten_worlds):
    stopped = turned = 0
    for w in ten_worlds:
        v = w.agent_speed[:, w.ego_index]
        assert v.max() - v.min() > 1.5, w.name                             # the action is never constant
        stopped += v.min() < 0.1 and v.max() > 3.0
        turned += "turn left" in w.tags or "turn right" in w.tags
        yaw = w.agent_yaw[:, w.ego_index]
        if "turn left" in w.tags:
            assert yaw[-1] - yaw[0] > np.radians(60)
        if "high speed" in w.tags:
            assert v.max() > 18.0
    assert stopped >= 3 and turned >= 4


def test_vehicles_brake_behind_others_and_pedestrians_cross(ten_worlds):
    w = next(w for w in ten_worlds if "congestion" in w.tags)
    cars = [i for i, a in enumerate(w.agents) if a["kind"] == "car" and not a["ego"] and not a["parked"]]
    v = w.agent_speed[:, cars]
    assert ((v.max(axis=0) > 3.0) & (v.min(axis=0) < 0.2)).sum() >= 3          # stop-and-go traffic
    w = next(w for w in ten_worlds if "turn right" in w.tags and "pedestrians" in w.tags)
    peds = [i for i, a in enumerate(w.agents) if a["kind"] == "pedestrian"]
    start, end = w.agent_xy[0, peds], w.agent_xy[-1, peds]
    assert (np.hypot(*(end - start).T) > 10.0).sum() >= 3


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, sweeps, output safety, split file
# ---------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_serial_or_parallel(tmp_path):
    kw = dict(scenes=2, samples_per_scene=3, image_size=(96, 54), cameras=["CAM_FRONT", "CAM_BACK"], progress=False)
    a = write_world(tmp_path / "a", seed=5, workers=1, **kw)
    b = write_world(tmp_path / "b", seed=5, workers=2, **kw)
    c = write_world(tmp_path / "c", seed=6, workers=1, **kw)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb and len(fa) > 50
    assert set(fa.values()).isdisjoint(set(fc.values()) - {fa[f"{SYNTH_VERSION}/visibility.json"]})


def test_sweeps_chain_between_key_frames_at_sensor_rates(tmp_path):
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud

    root = write_world(tmp_path / "w", scenes=1, samples_per_scene=3, image_size=(64, 36), cameras=["CAM_FRONT"],
                       sweeps=True, workers=1, progress=False)
    nusc = NuScenes(SYNTH_VERSION, str(root), verbose=False)
    per = {}
    for sd in nusc.sample_data:
        per.setdefault(sd["channel"], []).append(sd)
    expect = {"LIDAR_TOP": 3 + 2 * 9, "CAM_FRONT": 3 + 2 * 5, "RADAR_FRONT": 3 + 2 * 6}
    for ch, n in expect.items():
        recs = sorted(per[ch], key=lambda r: r["timestamp"])
        assert len(recs) == n
        assert [r["next"] for r in recs[:-1]] == [r["token"] for r in recs[1:]]
        for r in recs:
            assert r["filename"].startswith("samples/" if r["is_key_frame"] else "sweeps/")
            if not r["is_key_frame"]:                      # a sweep belongs to the next key frame
                assert nusc.get("sample", r["sample_token"])["timestamp"] > r["timestamp"]
    step = np.diff(sorted(r["timestamp"] for r in per["LIDAR_TOP"]))
    assert np.all(step == 50_000)
    sample = nusc.sample[-1]
    pc, times = LidarPointCloud.from_file_multisweep(nusc, sample, "LIDAR_TOP", "LIDAR_TOP", nsweeps=5)
    assert pc.nbr_points() > 4 * 20_000 and len(np.unique(times)) == 5
    sweep = nusc.get("sample_data", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["prev"])
    assert len(nusc.get_boxes(sweep["token"])) == len(sample["anns"])


def test_refuses_foreign_folder_and_never_leaves_a_loadable_half_world(tmp_path, monkeypatch, capsys):
    from drivejepa.cli import main
    from drivejepa.data.synth import writer

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    args = ["synth", "--scenes", "1", "--samples-per-scene", "2", "--image-size", "64x36", "--cameras", "CAM_FRONT",
            "--workers", "1", "-q"]
    assert main(args + ["--out", str(foreign)]) == 2
    assert "not empty" in capsys.readouterr().err and not (foreign / SYNTH_VERSION).exists()

    out = tmp_path / "world"
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "key frames" in printed and "seconds" in printed
    assert read_summary(out)["summary"]["key_frames"] == 2 and (out / SYNTH_VERSION / "sample.json").is_file()

    def crash(job):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "write_scene", crash)               # a rerun that dies half way
    with pytest.raises(RuntimeError):
        write_world(out, scenes=1, samples_per_scene=2, image_size=(64, 36), workers=1, progress=False)
    assert not (out / SYNTH_VERSION).exists() and read_summary(out) == {}
    assert json.loads((out / ".drivejepa-synth.json").read_text())["status"] == "writing"


def test_split_file_lists_200_scenes_with_every_fifth_in_val_and_in_test(repo_root):
    """val (n % 5 == 3) chooses best.pt, test (n % 5 == 0) gives the headline numbers; no scene is in two splits."""
    splits = json.loads((repo_root / "datasets/synthetic/splits.json").read_text())
    names = [f"scene-{n:04d}" for n in range(1, 201)]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == names
    assert splits["val"] == [f"scene-{n:04d}" for n in range(1, 201) if n % 5 == 3]
    assert splits["test"] == [f"scene-{n:04d}" for n in range(1, 201) if n % 5 == 0]
