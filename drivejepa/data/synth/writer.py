"""Write a synthetic world as a nuScenes dataroot: one scene per task, scenes in parallel, tables last.

Each scene is built and rendered from its own seeded random streams, so a parallel run writes the same bytes as a
serial one. Worker processes write the sensor files (each atomically) and hand their table records back; the parent
writes the 13 tables into a temporary folder and renames it to ``<out>/<version>`` as the very last step, so a
dataroot whose tables exist is complete. A marker file ``<out>/.drivejepa-synth.json`` says the folder is a synth
output (safe to rewrite) and, once complete, holds the run's parameters and totals.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from drivejepa.config import ALL_CAMERAS, ALL_RADARS
from drivejepa.errors import UserError
from drivejepa.io import atomic_write_json

log = logging.getLogger(__name__)

SYNTH_VERSION = "v1.0-synth"
DEFAULT_IMAGE_SIZE = (800, 450)
MARKER = ".drivejepa-synth.json"
START_US = 1_533_081_600_000_000          # 2018-08-01T00:00:00Z
KEY_PERIOD_US = 500_000                   # key frames at 2 Hz
SWEEP_PERIOD_US = {"lidar": 50_000, "camera": 83_333, "radar": 76_923}   # 20, 12, 13 Hz
ANNOTATION_RANGE = 60.0                   # metres from the ego
SENSOR_MARGIN_S = 0.05                    # the world moves this long before the first and after the last key frame
OWN_PATHS = ("samples", "sweeps", "maps")


@dataclasses.dataclass(frozen=True)
class SceneJob:
    number: int
    seed: int
    samples: int
    image_size: tuple[int, int]
    cameras: tuple[str, ...]
    sweeps: bool
    out: str
    branches: int = 0               # futures per branch point, the parent's included (0: no branches)
    branch_points: int = 1          # branch points per scene
    branch_frames: int = 8          # key frames each branch runs past its branch point


def scene_start_us(number: int) -> int:
    """Time stamp (us) of the first key frame of scene ``number`` (scenes are an hour apart)."""
    return START_US + (int(number) - 1) * 3_600_000_000


def _sensors(cameras: Sequence[str]) -> list[tuple[str, str]]:
    return [(c, "camera") for c in cameras] + [(r, "radar") for r in ALL_RADARS] + [("LIDAR_TOP", "lidar")]


def _frame_times(samples: int, period_us: int, sweeps: bool) -> list[tuple[int, int, bool]]:
    """(offset from the scene start in us, sample index it belongs to, is key frame), in time order."""
    out = []
    for i in range(samples):
        if sweeps and i > 0:                  # sweeps between key frames i-1 and i belong to sample i
            k = 1
            while k * period_us < KEY_PERIOD_US - period_us / 2:
                out.append(((i - 1) * KEY_PERIOD_US + k * period_us, i, False))
                k += 1
        out.append((i * KEY_PERIOD_US, i, True))
    return out


def _write_file(path: Path, data: bytes) -> None:
    """Write under a temporary name and rename, so no partial sensor file is ever visible. Unlike
    drivejepa.io.atomic_write_bytes there is no fsync per file (thousands of fsyncs dominate the run time on a busy
    disk); write_world calls os.sync() once before the tables, which are what make the dataroot complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _count_in_box(ann: dict, pose: dict, cs: dict, points: np.ndarray, tree=None) -> int:
    """Points [3, N] (sensor frame) inside the annotation box, computed exactly as the devkit does it
    (``get_sample_data`` moves the box into the sensor frame, then ``points_in_box``). ``tree`` is an optional
    cKDTree over the points to skip the far ones (the per-point test is unchanged)."""
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import points_in_box
    from pyquaternion import Quaternion

    if points.shape[1] == 0:
        return 0
    box = Box(ann["translation"], ann["size"], Quaternion(ann["rotation"]))
    box.translate(-np.array(pose["translation"]))
    box.rotate(Quaternion(pose["rotation"]).inverse)
    box.translate(-np.array(cs["translation"]))
    box.rotate(Quaternion(cs["rotation"]).inverse)
    r = float(np.linalg.norm(box.wlh)) / 2 + 0.2
    if tree is not None:
        near = np.array(tree.query_ball_point(box.center, r), dtype=np.int64)
    else:
        near = np.flatnonzero(np.sum((points.T - box.center) ** 2, axis=1) < r * r)
    if len(near) == 0:
        return 0
    return int(points_in_box(box, points[:, near]).sum())


def write_scene(job: SceneJob) -> dict:
    """Build, simulate and render one scene and its counterfactual branches; write their files; return their
    table records and totals."""
    from PIL import Image

    from drivejepa.data.synth import branches as cf
    from drivejepa.data.synth.sensors import SensorNoise
    from drivejepa.data.synth.tables import token
    from drivejepa.data.synth.scenarios import scenario
    from drivejepa.data.synth.world import place, simulate_scene

    t0 = time.time()
    out = Path(job.out)
    seed, n = job.seed, job.number
    duration = (job.samples - 1) * KEY_PERIOD_US / 1e6
    sim = simulate_scene(n, seed, duration, margin=SENSOR_MARGIN_S)
    plans, family, paths = cf.family(sim, job.samples, seed, job.branches, job.branch_points, job.branch_frames)
    worlds = place(sim, family, paths)
    for br, w in zip(plans, worlds[1:]):
        cf.finish(w, sim, br)
    world = worlds[0]

    def tok(*parts):
        return token(seed, *parts)

    stats = dict(files=0, bytes=0, lidar_points=[])
    tables: dict[str, list] = {k: [] for k in ("log", "scene", "map", "calibrated_sensor", "sample", "sample_data",
                                                "ego_pose", "sample_annotation", "instance")}
    map_token = tok("map", world.name)
    map_file = f"maps/{map_token}.png"
    buf = io.BytesIO()
    Image.fromarray(world.map_mask).save(buf, format="PNG", compress_level=6)
    _write_file(out / map_file, buf.getvalue())
    stats["files"] += 1
    stats["bytes"] += len(buf.getvalue())
    location = f"synth-{scenario(n)['layout'].split('_')[0]}"
    parent = _render_scene(job, world, job.samples, SensorNoise([seed, n, 2]), tok, tables, stats, location)
    logs = [parent["log"]]
    for br, w in zip(plans, worlds[1:]):
        r = _render_scene(job, w, br.frame + 1 + job.branch_frames, SensorNoise([seed, n, 6, br.frame, br.index]),
                          tok, tables, stats, location, reuse=(parent, br.frame))
        logs.append(r["log"])
    tables["map"].append(dict(token=map_token, log_tokens=logs, category="semantic_prior", filename=map_file))
    stats["seconds"] = time.time() - t0
    return dict(number=n, tables=tables, stats=stats, tags=world.tags,
                branches={w.name: w.tags for w in worlds[1:]})


def _render_scene(job: SceneJob, world, samples: int, noise, tok, tables: dict, stats: dict, location: str,
                  reuse=None) -> dict:
    """Write the sensor files and records of one scene (``noise``: its readings' random streams, sensors.py).
    ``reuse`` = (the parent's result, branch frame) makes a counterfactual branch: every sample_data of key frames
    up to the branch frame points at the parent's file and repeats its ego pose (the bytes are the parent's), later
    ones are rendered from ``world`` at the parent's sensor times. Returns the scene's log token, its sensor times and
    its key-frame point clouds (for its branches)."""
    from scipy.spatial import cKDTree

    from drivejepa.data.synth import camera, lidar, radar, sensors
    from drivejepa.data.synth.tables import quaternion_yaw, visibility_token

    out = Path(job.out)
    name = world.name
    shared = -1 if reuse is None else reuse[1]
    base = None if reuse is None else reuse[0]

    def write(rel: str, data: bytes) -> None:
        _write_file(out / rel, data)
        stats["files"] += 1
        stats["bytes"] += len(data)

    log_token, scene_token = tok("log", name), tok("scene", name)
    logfile = f"synth-s{job.seed}-{name}"
    start = scene_start_us(job.number)
    sample_tokens = [tok("sample", name, i) for i in range(samples)]
    tables["log"].append(dict(token=log_token, logfile=logfile, vehicle="synth-ego", date_captured="2018-08-01",
                              location=location))
    tables["scene"].append(dict(token=scene_token, log_token=log_token, nbr_samples=samples,
                                first_sample_token=sample_tokens[0], last_sample_token=sample_tokens[-1], name=name,
                                description=", ".join(world.tags)))
    for i, st in enumerate(sample_tokens):
        tables["sample"].append(dict(token=st, timestamp=start + i * KEY_PERIOD_US,
                                     prev=sample_tokens[i - 1] if i > 0 else "",
                                     next=sample_tokens[i + 1] if i + 1 < samples else "",
                                     scene_token=scene_token))

    W, H = job.image_size
    calib: dict[str, dict] = {}
    for ch, modality in _sensors(job.cameras):
        tr, rot, intr = sensors.calibration(ch, (W, H))
        calib[ch] = dict(token=tok("calibrated_sensor", name, ch), sensor_token=tok("sensor", ch),
                         translation=tr, rotation=rot, camera_intrinsic=intr)
        tables["calibrated_sensor"].append(calib[ch])

    key_lidar: dict[int, tuple] = {}
    key_radar: dict[int, list] = {}
    written: dict[tuple, tuple] = {}                 # (channel, frame index) -> (offset, file, pose)
    renderer = camera.Renderer(world, W, H, noise.camera_bank()) if job.cameras else None
    dirs = lidar.sensor_directions()
    for ch, modality in _sensors(job.cameras):
        frames = _frame_times(samples, SWEEP_PERIOD_US[modality], job.sweeps)
        sd_tokens = [tok("sample_data", name, ch, off) for off, _, _ in frames]
        for j, (nominal, si, key) in enumerate(frames):
            off = nominal
            if base is not None:                # a branch fires its sensors when the parent's did
                off = base["written"][ch, j][0]
            elif modality == "camera":          # each camera fires at its own time around the lidar sweep
                off = sensors.camera_offset_us(job.seed, job.number, ch, nominal)
            ts = start + off
            t = off / 1e6
            if si <= shared:
                _, rel, parent_pose = base["written"][ch, j]
                pose = dict(parent_pose, token=tok("ego_pose", name, ch, off))
                tables["ego_pose"].append(pose)
                if key and modality == "lidar":
                    key_lidar[si] = base["key_lidar"][si]
                if key and modality == "radar" and si in base["key_radar"]:
                    key_radar.setdefault(si, []).extend(r for r in base["key_radar"][si] if r[1]["channel"] == ch)
            else:
                xy, yaw, _ = world.ego_pose(t)
                pose = sensors.pose_record(tok("ego_pose", name, ch, off), ts, xy, yaw)
                tables["ego_pose"].append(pose)
                ext = {"camera": ".jpg", "radar": ".pcd", "lidar": ".pcd.bin"}[modality]
                rel = f"{'samples' if key else 'sweeps'}/{ch}/{logfile}__{ch}__{ts}{ext}"
                data, rendered = sensors.render(world, ch, t, noise.reading(ch, nominal), renderer, dirs)
                write(rel, data)
                if modality == "radar":
                    pts = rendered
                    if key:
                        ok = (pts["invalid_state"] == 0) & (pts["dyn_prop"] < 7) & (pts["ambig_state"] == 3)
                        xyz = np.stack([pts["x"][ok], pts["y"][ok], pts["z"][ok]]).astype(np.float64)
                        o, psi, _ = radar.sensor_pose(world, t, ch)
                        gxy = o[:2, None] + np.array([[np.cos(psi), -np.sin(psi)],
                                                      [np.sin(psi), np.cos(psi)]]) @ xyz[:2]
                        key_radar.setdefault(si, []).append((pose, dict(calib[ch], channel=ch), xyz, gxy))
                elif modality == "lidar":
                    pts, _, vis = rendered
                    if key:
                        xyz = pts[:, :3].T
                        key_lidar[si] = (pose, calib[ch], xyz, vis, cKDTree(pts[:, :3].astype(np.float64)))
                        stats["lidar_points"].append(len(pts))
            written[ch, j] = (off, rel, pose)
            tables["sample_data"].append(dict(
                token=sd_tokens[j], sample_token=sample_tokens[si], ego_pose_token=pose["token"],
                calibrated_sensor_token=calib[ch]["token"], timestamp=ts,
                fileformat="jpg" if modality == "camera" else "pcd", is_key_frame=key,
                height=H if modality == "camera" else 0, width=W if modality == "camera" else 0, filename=rel,
                prev=sd_tokens[j - 1] if j > 0 else "", next=sd_tokens[j + 1] if j + 1 < len(frames) else ""))

    known = {} if base is None else {k: v for k, v in base["counts"].items() if k[0] <= shared}
    counts = _annotate(world, samples, tables, key_lidar, key_radar, sample_tokens, tok, visibility_token,
                       quaternion_yaw, known)
    return dict(log=log_token, written=written, key_lidar=key_lidar, key_radar=key_radar, counts=counts)


def _annotate(world, samples, tables, key_lidar, key_radar, sample_tokens, tok, visibility_token, quaternion_yaw,
              known: dict) -> dict:
    """sample_annotation for every agent near the ego with at least one lidar or radar return; instance chains.
    ``known``: (key frame, agent) -> (lidar, radar) point counts already counted; returns every count."""
    counts: dict = {}
    name = world.name
    cat_tokens = {}
    attr = lambda a: tok("attribute", a)  # noqa: E731
    chains: dict[int, list] = {}
    for i in range(samples):
        t = i * KEY_PERIOD_US / 1e6
        xy, yaw, vel, active = world.state(t)
        e = world.ego_index
        pose, cs, lpts, vis, tree = key_lidar[i]
        for a, agent in enumerate(world.agents):
            if a == e or not active[a] or np.hypot(*(xy[a] - xy[e])) > ANNOTATION_RANGE:
                continue
            w, l, h = agent["size"]
            ann = dict(token=tok("sample_annotation", name, a, i), sample_token=sample_tokens[i],
                       instance_token=tok("instance", name, a), visibility_token="1", attribute_tokens=[],
                       translation=[round(float(xy[a, 0]), 4), round(float(xy[a, 1]), 4), round(h / 2, 4)],
                       size=[float(w), float(l), float(h)], rotation=quaternion_yaw(float(yaw[a])),
                       prev="", next="", num_lidar_pts=0, num_radar_pts=0)
            if (i, a) in known:                 # a branch's shared key frame: the parent's own points and boxes
                ann["num_lidar_pts"], ann["num_radar_pts"] = known[i, a]
            else:
                ann["num_lidar_pts"] = _count_in_box(ann, pose, cs, lpts, tree)
                reach = np.hypot(w, l) / 2 + 1.0
                for rpose, rcs, rpts, gxy in key_radar.get(i, []):
                    if gxy.shape[1] and np.min(np.hypot(gxy[0] - xy[a, 0], gxy[1] - xy[a, 1])) < reach:
                        ann["num_radar_pts"] += _count_in_box(ann, rpose, rcs, rpts)
            counts[i, a] = ann["num_lidar_pts"], ann["num_radar_pts"]
            if ann["num_lidar_pts"] + ann["num_radar_pts"] == 0:
                continue
            ann["visibility_token"] = visibility_token(vis.get(a, 0.0))
            speed = float(np.hypot(*vel[a]))
            kind = agent["kind"]
            if kind == "pedestrian":
                ann["attribute_tokens"] = [attr("pedestrian.moving" if speed > 0.2 else "pedestrian.standing")]
            elif kind == "bicycle":
                ann["attribute_tokens"] = [attr("cycle.with_rider")]
            elif kind in ("car", "truck", "bus"):
                state = "parked" if agent["parked"] else "moving" if speed > 0.3 else "stopped"
                ann["attribute_tokens"] = [attr(f"vehicle.{state}")]
            chains.setdefault(a, []).append(ann)
            tables["sample_annotation"].append(ann)
            cat_tokens[a] = tok("category", agent["category"])
    for a in sorted(chains):
        anns = chains[a]
        for k, ann in enumerate(anns):
            ann["prev"] = anns[k - 1]["token"] if k > 0 else ""
            ann["next"] = anns[k + 1]["token"] if k + 1 < len(anns) else ""
        tables["instance"].append(dict(token=tok("instance", name, a), category_token=cat_tokens[a],
                                       nbr_annotations=len(anns), first_annotation_token=anns[0]["token"],
                                       last_annotation_token=anns[-1]["token"]))
    return counts


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def is_synth_output(out: Path) -> bool:
    return (Path(out) / MARKER).is_file()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not a previous synth output, unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_synth_output(out) and not overwrite:
        raise UserError(f"{out}: folder is not empty and was not written by `drivejepa synth`; "
                        "choose an empty folder or pass --overwrite")


def _validate_branches(branches, branch_points, branch_frames, samples_per_scene) -> None:
    from drivejepa.data.synth.branches import MAX_BRANCHES, MIN_PAST_FRAMES

    if int(branches) == 0:
        return
    if not 2 <= int(branches) <= MAX_BRANCHES:
        raise UserError(f"branches: futures per branch point must be 0 (none) or 2..{MAX_BRANCHES} (the scene's own "
                        f"future included), got {branches}")
    if int(branch_points) < 1:
        raise UserError(f"branch_points: must be at least 1, got {branch_points}")
    if int(branch_frames) < 1:
        raise UserError(f"branch_frames: must be at least 1, got {branch_frames}")
    if int(samples_per_scene) < MIN_PAST_FRAMES + 1 + int(branch_frames):
        raise UserError(f"branch_frames: {branch_frames} key frames after a branch point need at least "
                        f"{MIN_PAST_FRAMES + 1 + int(branch_frames)} samples_per_scene, got {samples_per_scene}")


def _validate(scenes, samples_per_scene, image_size, cameras, workers) -> tuple:
    if int(scenes) < 1:
        raise UserError(f"scenes: must be at least 1, got {scenes}")
    if int(samples_per_scene) < 2:
        raise UserError(f"samples_per_scene: must be at least 2, got {samples_per_scene}")
    try:
        w, h = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise UserError(f"image_size: must be (width, height), got {image_size!r}") from None
    if w < 16 or h < 16 or w > 4000 or h > 4000:
        raise UserError(f"image_size: {w}x{h} is out of range (16..4000 pixels a side)")
    unknown = [c for c in cameras if c not in ALL_CAMERAS]
    if unknown:
        raise UserError(f"cameras: unknown channel(s) {unknown}; valid: {ALL_CAMERAS}")
    if workers is not None and int(workers) < 1:
        raise UserError(f"workers: must be at least 1, got {workers}")
    ordered = tuple(c for c in ALL_CAMERAS if c in set(cameras))
    return (w, h), ordered


def write_world(out, *, scenes: int = 30, samples_per_scene: int = 40, seed: int = 0,
                image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, cameras: Sequence[str] = ALL_CAMERAS,
                sweeps: bool = False, version: str = SYNTH_VERSION, workers: Optional[int] = None,
                progress: bool = True, overwrite: bool = False, branches: int = 0, branch_points: int = 1,
                branch_frames: int = 8) -> Path:
    """Write a synthetic nuScenes dataroot at ``out`` and return its path.

    ``branches`` = K > 0 adds counterfactual branches (branches.py): at ``branch_points`` seeded key frames of each
    scene, K - 1 more scenes that share the scene's key frames up to there and then run ``branch_frames`` key frames
    with another ego behaviour (the scene's own future is the K-th).

    ``out`` must be empty, missing or a previous synth output (``overwrite=True`` lifts that check). The result
    loads with ``NuScenes(version, out)``; the run's totals are in ``out/.drivejepa-synth.json``."""
    from tqdm import tqdm

    from drivejepa.data.synth.tables import TABLES, fixed_tables

    out = Path(out)
    size, cams = _validate(scenes, samples_per_scene, image_size, cameras, workers)
    _validate_branches(branches, branch_points, branch_frames, samples_per_scene)
    if not version or Path(version).name != version or version in (".", ".."):
        raise UserError(f"version: must be a plain folder name like {SYNTH_VERSION}, got {version!r}")
    check_output(out, overwrite)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    old_versions = []
    if is_synth_output(out):                   # a previous run may have used another version name
        try:
            old = str(json.loads((out / MARKER).read_text())["params"]["version"])
            if old and Path(old).name == old and old not in (".", ".."):
                old_versions.append(old)
        except (ValueError, KeyError, TypeError):
            pass
    params = dict(scenes=int(scenes), samples_per_scene=int(samples_per_scene), seed=int(seed),
                  image_size=list(size), cameras=list(cams), sweeps=bool(sweeps), version=version,
                  branches=int(branches), branch_points=int(branch_points), branch_frames=int(branch_frames))
    atomic_write_json(out / MARKER, dict(status="writing", params=params))
    for rel in (version, f".{version}.partial", *old_versions, *OWN_PATHS):
        if (out / rel).exists():
            shutil.rmtree(out / rel)

    jobs = [SceneJob(n, int(seed), int(samples_per_scene), size, cams, bool(sweeps), str(out), int(branches),
                     int(branch_points), int(branch_frames)) for n in range(1, int(scenes) + 1)]
    n_workers = min(int(workers or os.cpu_count() or 1), len(jobs))
    results: dict[int, dict] = {}
    bar = tqdm(total=len(jobs), desc="synth scenes", unit="scene", disable=not progress)
    if n_workers <= 1:
        for job in jobs:
            results[job.number] = write_scene(job)
            bar.update(1)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures = [pool.submit(write_scene, job) for job in jobs]
            for fut in as_completed(futures):
                r = fut.result()
                results[r["number"]] = r
                bar.update(1)
    bar.close()

    tables = fixed_tables(int(seed), _sensors(cams))
    for key in ("instance", "calibrated_sensor", "ego_pose", "log", "scene", "sample", "sample_data",
                "sample_annotation", "map"):
        tables[key] = [rec for n in sorted(results) for rec in results[n]["tables"][key]]
    os.sync()                                   # sensor files are on disk before the tables say they exist
    partial = out / f".{version}.partial"
    for name in TABLES:
        atomic_write_json(partial / f"{name}.json", tables[name])
    os.replace(partial, out / version)

    lidar_points = [p for n in sorted(results) for p in results[n]["stats"]["lidar_points"]]
    summary = dict(
        scenes=len(results), branch_scenes=sum(len(r["branches"]) for r in results.values()),
        key_frames=len(tables["sample"]), sample_data=len(tables["sample_data"]),
        annotations=len(tables["sample_annotation"]),
        files=sum(r["stats"]["files"] for r in results.values()) + len(TABLES),
        bytes=sum(r["stats"]["bytes"] for r in results.values())
        + sum((out / version / f"{t}.json").stat().st_size for t in TABLES),
        lidar_points_mean=float(np.mean(lidar_points)) if lidar_points else 0.0,
        lidar_points_min=int(min(lidar_points)) if lidar_points else 0,
        lidar_points_max=int(max(lidar_points)) if lidar_points else 0,
        seconds=round(time.time() - t0, 2), workers=n_workers,
        descriptions={name: ", ".join(tags) for n in sorted(results)
                      for name, tags in [(f"scene-{n:04d}", results[n]["tags"]), *results[n]["branches"].items()]},
    )
    atomic_write_json(out / MARKER, dict(status="complete", params=params, summary=summary))
    log.info("wrote %d scenes to %s in %.1f s", len(results), out, summary["seconds"])
    return out


def read_summary(out) -> dict:
    """The parameters and totals of a complete synth output (``{}`` if there is none)."""
    path = Path(out) / MARKER
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if data.get("status") == "complete" else {}
