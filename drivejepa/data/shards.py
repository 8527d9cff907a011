"""The training shard format: one file per scene, a JSON header plus raw arrays read back as memory maps.

Layout of ``<scene>.shard``::

    b"DJSHARD\\0"  | uint64 little-endian header length | JSON header | zero padding | arrays, each 64-byte aligned

The header holds the scene's metadata (``meta``) and, under ``"arrays"``, each array's dtype, shape and offset
from the start of the data section. :func:`read_shard` maps the file once and gives numpy views of it, so reading a
window of frames touches only those pages (no copy, no unpickling). Shards are written to a temporary name and
renamed (``drivejepa.io.atomic_path``): a reader never sees a partial file.

``manifest.json`` beside the shards lists every complete scene with its frame count, tags, skipped key frames and the
splits it belongs to; together with the schema version and the preprocessing config hash it tells a rerun what is
complete and what is stale.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np

from drivejepa.errors import UserError
from drivejepa.io import atomic_path, atomic_write_json

SCHEMA_VERSION = 2  # 2: lidar time lag, per-frame camera poses and timestamps, box velocity mask
MAGIC = b"DJSHARD\0"
ALIGN = 64
SHARD_SUFFIX = ".shard"
MANIFEST = "manifest.json"

CLASSES = ["car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
           "traffic_cone", "barrier"]

# nuScenes category -> detection class (the mapping of the nuScenes detection benchmark); others are dropped.
CATEGORY_TO_CLASS = {
    "vehicle.car": "car",
    "vehicle.truck": "truck",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.trailer": "trailer",
    "vehicle.construction": "construction_vehicle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "vehicle.motorcycle": "motorcycle",
    "vehicle.bicycle": "bicycle",
    "movable_object.trafficcone": "traffic_cone",
    "movable_object.barrier": "barrier",
}

# Arrays every shard holds, with their dtype (shapes in ARCHITECTURE.md, "The shard schema").
ARRAY_DTYPES = {
    "images": np.uint8,
    "image_mask": np.bool_,
    "lidar": np.float32,
    "lidar_mask": np.bool_,
    "radar": np.float32,
    "radar_mask": np.bool_,
    "actions": np.float32,
    "action_valid": np.bool_,
    "ego_pose": np.float64,
    "timestamps": np.int64,
    "boxes": np.float32,
    "box_labels": np.int64,
    "box_mask": np.bool_,
    "box_velocity_valid": np.bool_,
    "cam_intrinsics": np.float32,
    "cam_to_key_ego": np.float32,
    "cam_timestamps": np.int64,
}
# What each lidar point holds, in this order.
LIDAR_CHANNELS = ("x", "y", "z", "intensity", "time_lag")
# Arrays with one row per camera, not per frame.
PER_CAMERA = ("cam_intrinsics",)

SENSOR_KEYS = ("images", "image_mask", "lidar", "lidar_mask", "radar", "radar_mask")  # what the encoder reads


def camera_positions(shard_cameras: list[str], cameras: list[str], source) -> list[int]:
    """Positions of ``cameras`` in a shard's camera axis (``shard_cameras``, its header's order); a camera the shard
    lacks is a UserError naming ``source`` (the shard) and what to do."""
    missing = [c for c in cameras if c not in shard_cameras]
    if missing:
        raise UserError(f"{source}: shard lacks cameras {missing} (it holds {list(shard_cameras)}); preprocess with "
                        "them, or train with data.cameras set to the cameras it has")
    return [list(shard_cameras).index(c) for c in cameras]


def category_to_class(category: str) -> Optional[int]:
    """Index into :data:`CLASSES` of a nuScenes category name, or None when the category is not a detection class."""
    name = CATEGORY_TO_CLASS.get(category)
    return None if name is None else CLASSES.index(name)


def parse_tags(description: str) -> list[str]:
    """A scene description's comma-separated tags, lower-case and stripped, empty ones dropped, order kept."""
    tags = []
    for part in (description or "").split(","):
        tag = " ".join(part.strip().lower().split())
        if tag and tag not in tags:
            tags.append(tag)
    return tags


@dataclasses.dataclass
class Shard:
    """One scene read back: ``meta`` is the JSON header, ``arrays`` read-only views of the mapped file."""
    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]

    @property
    def frames(self) -> int:
        return int(self.arrays["timestamps"].shape[0])


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def write_shard(path: str | Path, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write one shard atomically. ``meta`` must be JSON-serialisable; array order and bytes are deterministic."""
    layout = {}
    offset = 0
    contiguous = {}
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        contiguous[key] = arr
        layout[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": int(arr.nbytes)}
        offset = _align(offset + arr.nbytes)
    header = json.dumps({"meta": meta, "arrays": layout}, sort_keys=True, separators=(",", ":")).encode()
    data_start = _align(len(MAGIC) + 8 + len(header))
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            fh.write(b"\0" * (data_start - fh.tell()))
            for key in sorted(contiguous):
                arr = contiguous[key]
                pad = data_start + layout[key]["offset"] - fh.tell()
                fh.write(b"\0" * pad)
                fh.write(arr.tobytes())
            fh.write(b"\0" * (data_start + offset - fh.tell()))
    return path


def _read_header(fh, path: Path) -> tuple[dict, int]:
    head = fh.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
        raise UserError(f"{path}: not a drivejepa shard (bad magic bytes)")
    (length,) = struct.unpack("<Q", head[len(MAGIC):])
    raw = fh.read(length)
    if len(raw) != length:
        raise UserError(f"{path}: truncated shard header")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt shard header ({exc})") from exc
    return header, _align(len(MAGIC) + 8 + length)


def read_shard_meta(path: str | Path) -> dict:
    """Only the JSON header's ``meta`` (cheap: no array is mapped)."""
    path = Path(path)
    with open(path, "rb") as fh:
        header, _ = _read_header(fh, path)
    return header["meta"]


def read_shard(path: str | Path) -> Shard:
    """Map a shard file; every array is a read-only view into one ``np.memmap`` (zero copy)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: shard file not found")
    with open(path, "rb") as fh:
        header, data_start = _read_header(fh, path)
    size = path.stat().st_size
    # One mapping of the whole file; plain ndarray views of it index faster than np.memmap slices.
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    data = mm.view(np.ndarray)
    arrays = {}
    for key, spec in header["arrays"].items():
        start = data_start + spec["offset"]
        end = start + spec["nbytes"]
        if end > size:
            raise UserError(f"{path}: truncated shard (array '{key}' ends at byte {end}, file has {size})")
        arrays[key] = data[start:end].view(np.dtype(spec["dtype"])).reshape(spec["shape"])
    missing = sorted(set(ARRAY_DTYPES) - set(arrays))
    if missing:
        raise UserError(f"{path}: shard lacks arrays {missing}")
    return Shard(path=path, meta=header["meta"], arrays=arrays)


# ----------------------------------------------------------------------------------------------------------------
# Manifest and splits
# ----------------------------------------------------------------------------------------------------------------
def shard_path(shard_dir: str | Path, scene: str) -> Path:
    return Path(shard_dir) / f"{scene}{SHARD_SUFFIX}"


def load_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard directory; UserError when there is none (not preprocessed) or it is corrupt."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no shard manifest (run `drivejepa preprocess --out {shard_dir}` first)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: corrupt manifest ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: shard schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; "
                        "preprocess again")
    return manifest


def write_manifest(shard_dir: str | Path, manifest: dict) -> Path:
    """Write the manifest atomically with scenes sorted by name, so equal contents give equal bytes."""
    manifest = dict(manifest)
    manifest["scenes"] = {k: manifest["scenes"][k] for k in sorted(manifest["scenes"])}
    return atomic_write_json(Path(shard_dir) / MANIFEST, manifest)


def scenes_in_split(shard_dir: str | Path, split: Optional[str] = None) -> list[str]:
    """Scene names of a shard directory in split ``split`` (None or "all": every scene), in name order.

    Splits are resolved when preprocessing (the synthetic split file or the devkit's official splits) and stored in
    the manifest, so a shard directory is self-contained."""
    manifest = load_manifest(shard_dir)
    scenes = sorted(manifest["scenes"])
    if split in (None, "", "all"):
        return scenes
    splits = manifest.get("splits", {})
    if split not in splits:
        raise UserError(f"{Path(shard_dir) / MANIFEST}: unknown split '{split}' "
                        f"(known: {', '.join(['all'] + sorted(splits))})")
    members = set(splits[split])
    return [s for s in scenes if s in members]


def empty_manifest(config: dict[str, Any], config_hash: str, dataroot: str, version: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "config_hash": config_hash, "config": config, "dataroot": dataroot,
            "version": version, "splits": {}, "scenes": {}}
