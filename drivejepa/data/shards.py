"""The training shard format: one file per scene, a JSON header plus raw arrays read back as memory maps.

Layout of ``<scene>.shard``::

    b"DJSHARD\\0"  | uint64 little-endian header length | JSON header | zero padding | arrays, each 64-byte aligned

The header holds the scene's metadata (``meta``) and, under ``"arrays"``, each array's dtype, shape and offset
from the start of the data section. :func:`read_shard` maps the file once and gives numpy views of it, so reading a
window of frames touches only those pages (no copy, no unpickling). Shards are written to a temporary name and
renamed (``drivejepa.io.atomic_path``): a reader never sees a partial file.

Integrity (this module owns it): the header carries a CRC-32 of itself and one of every array. :func:`read_shard`
checks the header against the schema (every array of :data:`ARRAY_DTYPES` present with its dtype, byte counts that
fit the shapes, leading axes equal to the frame and camera counts) and verifies the array checksums the first time a
process reads the file. :func:`check_scene` also compares the shard's preprocessing-config hash with the manifest's,
and :func:`readable_scenes` is how training, evaluation and visualisation name and skip a corrupt shard alike.

``manifest.json`` beside the shards lists every complete scene with its frame count, tags, skipped key frames and the
splits it belongs to; together with the schema version and the preprocessing config hash it tells a rerun what is
complete and what is stale.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from drivejepa.errors import UserError
from drivejepa.io import atomic_path, atomic_write_json, file_lock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: lidar time lag, per-frame camera poses and timestamps, box velocity mask; 3: drivable grid
MAGIC = b"DJSHARD\0"
ALIGN = 64
SHARD_SUFFIX = ".shard"
MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"

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
    "drivable": np.bool_,
}
# What each lidar point holds, in this order.
LIDAR_CHANNELS = ("x", "y", "z", "intensity", "time_lag")
# Arrays with one row per camera, not per frame.
PER_CAMERA = ("cam_intrinsics",)

# What the encoder reads: the sensors with their masks, and the camera calibration that lifts images into the grid.
SENSOR_KEYS = ("images", "image_mask", "cam_intrinsics", "cam_to_key_ego", "lidar", "lidar_mask", "radar", "radar_mask")


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
        layout[key] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": int(arr.nbytes),
                       "crc32": _crc(arr)}
        offset = _align(offset + arr.nbytes)
    body = {"meta": meta, "arrays": layout}
    header = json.dumps({**body, "header_crc32": _header_crc(body)}, sort_keys=True, separators=(",", ":")).encode()
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


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _header_crc(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _read_header(fh, path: Path, size: int) -> tuple[dict, int]:
    """The JSON header, checked to be whole and to carry checksums, and where the data section starts."""
    head = fh.read(len(MAGIC) + 8)
    if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
        raise UserError(f"{path}: not a drivejepa shard (bad magic bytes)")
    (length,) = struct.unpack("<Q", head[len(MAGIC):])
    if length > size - len(head):
        raise UserError(f"{path}: corrupt shard header (header length {length} but the file has {size} bytes)")
    raw = fh.read(length)
    if len(raw) != length:
        raise UserError(f"{path}: truncated shard header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: corrupt shard header ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict) \
            or not isinstance(header.get("arrays"), dict):
        raise UserError(f"{path}: corrupt shard header (no 'meta' and 'arrays' mappings)")
    if "header_crc32" not in header:
        raise UserError(f"{path}: shard has no checksums (written before drivejepa checked shard integrity); "
                        "preprocess again")
    return header, _align(len(MAGIC) + 8 + length)


def _check_header_crc(path: Path, header: dict) -> None:
    if header["header_crc32"] != _header_crc({"meta": header["meta"], "arrays": header["arrays"]}):
        raise UserError(f"{path}: corrupt shard header (its checksum does not match: edited or damaged)")


def read_shard_meta(path: str | Path) -> dict:
    """Only the JSON header's ``meta`` (cheap: no array is mapped); the header's own checksum is verified."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: shard file not found")
    with open(path, "rb") as fh:
        header, _ = _read_header(fh, path, os.fstat(fh.fileno()).st_size)
    _check_header_crc(path, header)
    return header["meta"]


def _check_layout(path: Path, header: dict, data_start: int, size: int) -> dict[str, tuple[np.dtype, list, int, int]]:
    """Every array's (dtype, shape, start, end) after checking the header against the schema."""
    layout = {}
    for key, spec in header["arrays"].items():
        try:
            dtype = np.dtype(spec["dtype"])
            shape = [int(n) for n in spec["shape"]]
            start, nbytes = data_start + int(spec["offset"]), int(spec["nbytes"])
            int(spec["crc32"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: corrupt shard header (array '{key}': {exc!r})") from exc
        expected = ARRAY_DTYPES.get(key)
        if expected is not None and dtype != np.dtype(expected):
            raise UserError(f"{path}: array '{key}' has dtype {dtype}, the shard schema says {np.dtype(expected)}")
        if min(shape, default=0) < 0 or nbytes != int(np.prod(shape)) * dtype.itemsize or start < data_start:
            raise UserError(f"{path}: corrupt shard header (array '{key}': shape {shape} of {dtype} is not "
                            f"{nbytes} bytes at offset {spec['offset']})")
        if start + nbytes > size:
            raise UserError(f"{path}: truncated shard (array '{key}' ends at byte {start + nbytes}, file has {size})")
        layout[key] = (dtype, shape, start, start + nbytes)
    missing = sorted(set(ARRAY_DTYPES) - set(layout))
    if missing:
        raise UserError(f"{path}: shard lacks arrays {missing}")
    meta = header["meta"]
    frames = len(meta["frame_indices"]) if isinstance(meta.get("frame_indices"), list) else layout["timestamps"][1][0]
    cameras = len(meta["cameras"]) if isinstance(meta.get("cameras"), list) else None
    for key, (_, shape, _, _) in layout.items():
        lead, what = (cameras, "cameras") if key in PER_CAMERA else (frames, "frames")
        if lead is not None and (not shape or shape[0] != lead):
            raise UserError(f"{path}: array '{key}' has shape {shape}, but the header lists {lead} {what}")
    return layout


# Shards whose array checksums this process has verified: (path, inode, size, mtime) -> True.
_VERIFIED: set[tuple] = set()


def read_shard(path: str | Path, *, verify: bool = True) -> Shard:
    """Map a shard file; every array is a read-only view into one ``np.memmap`` (zero copy).

    The header is always checked against the schema; with ``verify`` the array checksums are checked the first
    time this process (or the one it was forked from) reads the file. A problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: shard file not found")
    with open(path, "rb") as fh:
        stat = os.fstat(fh.fileno())
        header, data_start = _read_header(fh, path, stat.st_size)
    size = stat.st_size
    layout = _check_layout(path, header, data_start, size)
    _check_header_crc(path, header)
    # One mapping of the whole file; plain ndarray views of it index faster than np.memmap slices.
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    data = mm.view(np.ndarray)
    arrays = {key: data[start:end].view(dtype).reshape(shape) for key, (dtype, shape, start, end) in layout.items()}
    identity = (str(path.resolve()), stat.st_ino, size, stat.st_mtime_ns)
    if verify and identity not in _VERIFIED:
        for key, (_, _, start, end) in layout.items():
            if zlib.crc32(data[start:end]) != int(header["arrays"][key]["crc32"]):
                raise UserError(f"{path}: array '{key}' fails its checksum (the file is corrupt); preprocess this "
                                "scene again")
        _VERIFIED.add(identity)
    return Shard(path=path, meta=header["meta"], arrays=arrays)


def check_scene(shard_dir: str | Path, scene: str, manifest: Optional[dict] = None) -> Shard:
    """The verified shard of ``scene``, also checked to come from the manifest's preprocessing config."""
    manifest = load_manifest(shard_dir) if manifest is None else manifest
    shard = read_shard(shard_path(shard_dir, scene))
    made_with, listed = shard.meta.get("config_hash"), manifest.get("config_hash")
    if made_with != listed:
        raise UserError(f"{shard.path}: made with preprocess config {made_with}, the manifest's is {listed} (a shard "
                        "of another preprocessing mixed in); preprocess this directory again")
    return shard


def readable_scenes(shard_dir: str | Path, scenes: list[str], what: str = "") -> tuple[list[str], list[dict]]:
    """(scenes whose shard passes :func:`check_scene`, [{scene, path, reason}] for the others, each logged)."""
    manifest = load_manifest(shard_dir)
    good, skipped = [], []
    for scene in scenes:
        try:
            check_scene(shard_dir, scene, manifest)
        except (UserError, OSError) as exc:
            log.warning("skipping %sscene %s: %s", f"{what} " if what else "", scene, exc)
            skipped.append({"scene": scene, "path": str(shard_path(shard_dir, scene)), "reason": str(exc)})
            continue
        good.append(scene)
    return good, skipped


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
    if not isinstance(manifest, dict) or not isinstance(manifest.get("scenes"), dict) \
            or not isinstance(manifest.get("splits", {}), dict) \
            or not all(isinstance(v, list) for v in manifest.get("splits", {}).values()):
        raise UserError(f"{path}: not a shard manifest (expected a mapping with 'scenes' and 'splits' of lists)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: shard schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; "
                        "preprocess again")
    return manifest


def write_manifest(shard_dir: str | Path, manifest: dict) -> Path:
    """Write the manifest atomically with scenes sorted by name, so equal contents give equal bytes."""
    manifest = dict(manifest)
    manifest["scenes"] = {k: manifest["scenes"][k] for k in sorted(manifest["scenes"])}
    return atomic_write_json(Path(shard_dir) / MANIFEST, manifest)


@contextlib.contextmanager
def manifest_lock(shard_dir: str | Path) -> Iterator[None]:
    """Held while a job reads, merges and rewrites the manifest, so concurrent preprocess jobs lose no scene."""
    with file_lock(Path(shard_dir) / MANIFEST_LOCK):
        yield


def update_manifest(shard_dir: str | Path, change: Callable[[Optional[dict]], dict]) -> dict:
    """Under :func:`manifest_lock`: ``change(manifest on disk, or None)`` -> the manifest to write; returns it."""
    path = Path(shard_dir) / MANIFEST
    with manifest_lock(shard_dir):
        try:
            current = json.loads(path.read_text())
            current = current if isinstance(current, dict) and isinstance(current.get("scenes"), dict) else None
        except (OSError, ValueError):
            current = None
        manifest = change(current)
        write_manifest(shard_dir, manifest)
    return manifest


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


def factual_scenes(manifest: dict, scenes: list[str]) -> list[str]:
    """``scenes`` without the counterfactual branch scenes (``drivejepa synth --branches``) of a loaded
    ``manifest``: a branch repeats its parent's key frames up to the branch frame, so the factual scenes are the ones
    that are each a drive of its own."""
    from drivejepa.data.synth.scenarios import branch_of

    described = manifest["scenes"]
    return [s for s in scenes if branch_of(described.get(s, {}).get("description", "")) is None]


def empty_manifest(config: dict[str, Any], config_hash: str, dataroot: str, version: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "config_hash": config_hash, "config": config, "dataroot": dataroot,
            "version": version, "splits": {}, "scenes": {}}
