"""Driver side of preprocessing: the nuscenes-devkit database turned into light per-scene task descriptions.

Only the driver loads the devkit (trainval's database needs several GB). Each scene becomes a plain dict of file
paths, calibrations, ego poses and annotation arrays (a few hundred KB) that a Ray worker can process without the
database: see :mod:`drivejepa.data.frames` for the worker side.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from drivejepa.config import ALL_RADARS, PreprocessConfig
from drivejepa.data.drivable import map_crop
from drivejepa.data.frames import quaternion_matrix
from drivejepa.data.shards import category_to_class, parse_tags
from drivejepa.errors import UserError

log = logging.getLogger(__name__)

LIDAR = "LIDAR_TOP"
SYNTH_SPLIT_FILE = Path(__file__).resolve().parents[2] / "datasets" / "synthetic" / "splits.json"
# Extra named splits of real nuScenes beside the devkit's official ones (a validation split carved out of the official
# train split, so that best.pt is chosen on other scenes than the official val the numbers are reported on).
NUSCENES_SPLIT_FILE = Path(__file__).resolve().parents[2] / "datasets" / "nuscenes" / "splits.json"


def pose_matrix(record: dict) -> np.ndarray:
    """4x4 transform of a record with ``translation`` and ``rotation`` (an ego_pose or calibrated_sensor)."""
    m = np.eye(4)
    m[:3, :3] = quaternion_matrix(record["rotation"])
    m[:3, 3] = record["translation"]
    return m


def check_dataroot(dataroot: str | Path, version: str) -> Path:
    """One-line UserError unless ``dataroot/version`` holds a nuScenes database."""
    dataroot = Path(dataroot)
    if not dataroot.is_dir():
        raise UserError(f"{dataroot}: dataroot does not exist")
    if not (dataroot / version).is_dir():
        found = sorted(p.name for p in dataroot.iterdir() if p.is_dir() and (p / "scene.json").is_file())
        raise UserError(f"{dataroot / version}: version '{version}' not found in the dataroot "
                        f"(versions there: {', '.join(found) or 'none'})")
    return dataroot


def check_sweeps(dataroot: str | Path, cfg: PreprocessConfig) -> None:
    """One-line UserError when ``lidar_sweeps > 1`` asks for sweeps that this dataroot does not hold."""
    folder = Path(dataroot) / "sweeps" / LIDAR
    if cfg.lidar_sweeps > 1 and not (folder.is_dir() and any(folder.iterdir())):
        raise UserError(f"{folder}: lidar_sweeps = {cfg.lidar_sweeps} needs the lidar sweeps and this dataroot has "
                        "none (add nuScenes' sweeps/, write the synthetic world with --sweeps, or set lidar_sweeps=1)")


def load_nuscenes(dataroot: str | Path, version: str):
    """The devkit database, with devkit failures on broken tables turned into a UserError naming the version."""
    dataroot = check_dataroot(dataroot, version)
    from nuscenes.nuscenes import NuScenes

    try:
        return NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except (AssertionError, KeyError, ValueError, TypeError, AttributeError, IndexError, FileNotFoundError) as exc:
        raise UserError(f"{dataroot / version}: the devkit cannot load this database ({type(exc).__name__}: {exc})") \
            from exc


@functools.lru_cache(maxsize=None)
def split_table(version: str) -> dict[str, list[str]]:
    """Scene names of every known split: the synthetic split file for ``*-synth`` versions, else the devkit's
    official splits plus the named splits of ``datasets/nuscenes/splits.json``."""
    if version.endswith("-synth"):
        if not SYNTH_SPLIT_FILE.is_file():
            log.warning("%s not found: only the split 'all' is available", SYNTH_SPLIT_FILE)
            return {}
        return _read_split_file(SYNTH_SPLIT_FILE)
    from nuscenes.utils.splits import create_splits_scenes

    table = {k: list(v) for k, v in create_splits_scenes(verbose=False).items()}
    if NUSCENES_SPLIT_FILE.is_file():
        extra = _read_split_file(NUSCENES_SPLIT_FILE)
        clash = sorted(set(extra) & set(table))
        if clash:
            raise UserError(f"{NUSCENES_SPLIT_FILE}: split names {clash} are the devkit's official splits; choose "
                            "other names")
        table.update(extra)
    return table


def _read_split_file(path: Path) -> dict[str, list[str]]:
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise UserError(f"{path}: expected a mapping of split name -> list of scene names")
    return {str(k): [str(s) for s in v] for k, v in table.items()}


def select_scenes(nusc, version: str, split: Optional[str]) -> tuple[list[dict], dict[str, list[str]]]:
    """Scene records of ``split`` (None/"all" = every scene) and the splits that touch this dataroot."""
    names = {s["name"] for s in nusc.scene}
    splits = {k: sorted(v) for k, v in split_table(version).items() if names.intersection(v)}  # copies
    for name, parent in branch_parents(nusc).items():      # a counterfactual branch goes where its parent goes
        for members in splits.values():
            if parent in members and name not in members:
                members.append(name)
                members.sort()
    if split in (None, "", "all"):
        chosen = names
    elif split in splits:
        chosen = set(splits[split])
    else:
        raise UserError(f"{Path(nusc.dataroot) / version}: unknown split '{split}' for this dataroot "
                        f"(known: {', '.join(['all'] + sorted(splits))})")
    return sorted((s for s in nusc.scene if s["name"] in chosen), key=lambda s: s["name"]), splits


def branch_parents(nusc) -> dict[str, str]:
    """Scene name -> parent scene name of every counterfactual branch of the synthetic world in the database."""
    from drivejepa.data.synth.scenarios import branch_of

    out = {}
    for scene in nusc.scene:
        branch = branch_of(scene.get("description", ""))
        if branch is not None:
            out[scene["name"]] = branch["parent"]
    return out


def _sensor_entry(nusc, sd_token: str) -> dict:
    sd = nusc.get("sample_data", sd_token)
    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
    entry = {
        "path": str(Path(nusc.dataroot) / sd["filename"]),
        "sensor_to_ego": pose_matrix(cs),
        "ego_pose": pose_matrix(nusc.get("ego_pose", sd["ego_pose_token"])),
        "timestamp": int(sd["timestamp"]),
    }
    if cs.get("camera_intrinsic"):
        entry["intrinsic"] = np.asarray(cs["camera_intrinsic"], dtype=np.float64)
    return entry


def _lidar_entries(nusc, sd_token: str, sweeps: int) -> list[dict]:
    """The key-frame lidar and up to ``sweeps - 1`` previous sweeps, newest first."""
    entries = []
    token = sd_token
    while token and len(entries) < sweeps:
        entries.append(_sensor_entry(nusc, token))
        token = nusc.get("sample_data", token)["prev"]
    return entries


def _boxes(nusc, sample: dict) -> dict[str, np.ndarray]:
    """The sample's annotations of detection classes (global frame); the others are only counted. Velocities are
    the devkit's ``box_velocity``, NaN where it cannot estimate one (a single annotation, too long a gap)."""
    centers, sizes, rotations, velocities, labels = [], [], [], [], []
    other = 0
    for ann_token in sample["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        label = category_to_class(ann["category_name"])
        if label is None:
            other += 1
            continue
        centers.append(ann["translation"])
        sizes.append(ann["size"])
        rotations.append(ann["rotation"])
        velocities.append(nusc.box_velocity(ann_token)[:2])
        labels.append(label)
    return {
        "dropped_category": other,
        "center": np.asarray(centers, dtype=np.float64).reshape(-1, 3),
        "size": np.asarray(sizes, dtype=np.float64).reshape(-1, 3),
        "rotation": np.asarray(rotations, dtype=np.float64).reshape(-1, 4),
        "velocity": np.asarray(velocities, dtype=np.float64).reshape(-1, 2),
        "label": np.asarray(labels, dtype=np.int64),
    }


def _frame_task(nusc, sample: dict, cfg: PreprocessConfig) -> dict:
    data = sample["data"]
    lidar = _lidar_entries(nusc, data[LIDAR], cfg.lidar_sweeps) if LIDAR in data else None
    cameras = {ch: _sensor_entry(nusc, data[ch]) if ch in data else None for ch in cfg.cameras}
    radars = {ch: _sensor_entry(nusc, data[ch]) if ch in data else None for ch in ALL_RADARS}
    if lidar:
        ego_pose = lidar[0]["ego_pose"]
    else:  # no lidar in this dataroot: the pose of any other channel of the sample
        any_entry = _sensor_entry(nusc, next(iter(data.values())))
        ego_pose = any_entry["ego_pose"]
    return {"sample": sample["token"], "timestamp": int(sample["timestamp"]), "ego_pose": ego_pose,
            "lidar": lidar, "cameras": cameras, "radars": radars, "boxes": _boxes(nusc, sample)}


def scene_task(nusc, scene: dict, cfg: PreprocessConfig) -> dict[str, Any]:
    """Everything a worker needs to build one scene's shard, in plain Python and numpy values.

    A sample whose table entries are inconsistent (a dangling token, a missing record) is listed in ``bad_frames``
    with the reason instead of failing the scene."""
    frames, bad = [], []
    token = scene["first_sample_token"]
    index = 0
    while token:
        try:
            sample = nusc.get("sample", token)
        except KeyError as exc:
            bad.append({"index": index, "sample": token, "path": "sample.json", "reason": f"missing sample {exc}"})
            break
        try:
            frame = _frame_task(nusc, sample, cfg)
        except (KeyError, StopIteration, ValueError, TypeError) as exc:
            bad.append({"index": index, "sample": token, "path": "tables",
                        "reason": f"inconsistent table entry: {type(exc).__name__}: {exc}"})
            frame = None
        frames.append(frame)
        token = sample["next"]
        index += 1
    present = {ch for f in frames if f for ch, e in list(f["cameras"].items()) + list(f["radars"].items()) if e}
    poses = [f["ego_pose"] for f in frames if f]
    present |= {LIDAR for f in frames if f and f["lidar"]}
    requested = list(cfg.cameras) + [LIDAR] + list(ALL_RADARS)
    return {
        "scene": scene["name"],
        "token": scene["token"],
        "description": scene.get("description", ""),
        "tags": parse_tags(scene.get("description", "")),
        "frames": frames,
        "bad_frames": bad,
        "channels_absent": [ch for ch in requested if ch not in present],
        "drivable_map": map_crop(scene_map(nusc, scene), poses, cfg.drivable_range),
    }


def scene_map(nusc, scene: dict) -> np.ndarray:
    """The basic map mask (uint8 [H, W], 255 = drivable surface and sidewalks, 0.1 m a pixel) of the scene's log:
    the devkit's ``MapMask`` of its ``map`` record (which caches the last map it read)."""
    log_record = nusc.get("log", scene["log_token"])
    return nusc.get("map", log_record["map_token"])["mask"].mask()
