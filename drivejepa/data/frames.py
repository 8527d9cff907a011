"""Worker side of preprocessing: one scene's task description -> one shard file, without the devkit database.

Images are decoded at reduced size where the format allows (JPEG DCT scaling through ``PIL.Image.draft``: a
1600x900 frame decoded at 1/4 or 1/8 scale costs a fraction of a full decode), point clouds are read straight from
their files (lidar ``.pcd.bin``, radar binary ``.pcd``), moved into the key frame's ego coordinates, cropped and
sampled to fixed counts. Every sensor reading is placed with its own ego pose, as the devkit does: the key frame's
ego frame is the lidar's (at the lidar's time stamp), and each camera gets its own transform into it at the camera's
capture time. A key frame with an unreadable key-frame file is skipped and reported with the path and the reason; an
unreadable older lidar sweep drops only that sweep, also reported. A channel that the scene does not have at all is
recorded as absent with all-False masks.
"""
from __future__ import annotations

import math
import resource
import time
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from drivejepa.config import ALL_RADARS, PreprocessConfig
from drivejepa.data.drivable import drivable_grid
from drivejepa.data.shards import LIDAR_CHANNELS, SCHEMA_VERSION, write_shard

LIDAR_DIMS = 5  # x, y, z, intensity, ring
# Why an annotated box is not in a shard: not a detection class, outside box_range, beyond the nearest max_boxes.
BOX_DROP_REASONS = ("category", "out_of_range", "past_max_boxes")
RADAR_FILTERS = {"invalid_state": (0,), "dyn_prop": tuple(range(7)), "ambig_state": (3,)}  # the devkit's defaults
_PCD_TYPES = {("F", 2): "f2", ("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4",
              ("I", 8): "i8", ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


class FrameError(Exception):
    """A file of a key frame that cannot be used; ``path`` and ``reason`` go into the run's report."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _read_bytes(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FrameError(path, "missing file") from None
    except OSError as exc:
        raise FrameError(path, f"unreadable ({exc.strerror or exc})") from None
    if not data:
        raise FrameError(path, "empty file (0 bytes)")
    return data


# ----------------------------------------------------------------------------------------------------------------
# File readers
# ----------------------------------------------------------------------------------------------------------------
def load_image(path: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image straight to about ``size`` (W, H) with JPEG draft mode, then resize exactly.

    Returns the uint8 [H, W, 3] array and the original (width, height) for scaling the intrinsics
    (:func:`scale_intrinsics`). The whole original image maps onto the whole output, pixel centres by the half-pixel
    rule: DCT scaling averages blocks of 2, 4 or 8 pixels, and where the original is not a whole number of blocks
    (900 rows at 1/8 decode to 113) the resize reads only the box the original covers (112.5 rows), as
    ``Image.thumbnail`` does; no crop."""
    import io

    from PIL import Image, UnidentifiedImageError

    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            original = img.size
            drafted = img.draft("RGB", (int(size[0]), int(size[1])))
            rgb = img.convert("RGB")
            box = tuple(drafted[1]) if drafted else (0, 0, *rgb.size)
            if rgb.size != tuple(size) or box != (0, 0, *rgb.size):
                rgb = rgb.resize(tuple(size), Image.BILINEAR, box=box)
            return np.asarray(rgb, dtype=np.uint8), original
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise FrameError(path, f"corrupt image ({exc})") from None


def read_lidar(path: str) -> np.ndarray:
    """[N, 5] float32 points (x, y, z, intensity, ring) in the sensor frame from a nuScenes ``.pcd.bin``."""
    data = _read_bytes(path)
    if len(data) % (4 * LIDAR_DIMS):
        raise FrameError(path, f"truncated or corrupt lidar ({len(data)} bytes is not a whole number of "
                               f"{LIDAR_DIMS}-float points)")
    points = np.frombuffer(data, dtype="<f4").reshape(-1, LIDAR_DIMS)
    if not np.isfinite(points).all() or np.abs(points[:, :3]).max() > 1e4:
        raise FrameError(path, "corrupt lidar (non-finite or impossible coordinates)")
    return points


def read_radar(path: str) -> dict[str, np.ndarray]:
    """Columns of a binary radar ``.pcd`` after the devkit's default filters (valid, unambiguous returns)."""
    data = _read_bytes(path)
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise FrameError(path, "corrupt radar pcd (header without a DATA line)")
        try:
            line = data[pos:end].decode("ascii").strip()
        except UnicodeDecodeError:
            raise FrameError(path, "corrupt radar pcd (binary bytes in the header)") from None
        pos = end + 1
        if line and not line.startswith("#"):
            key, *values = line.split()
            header[key] = values
            if key == "DATA":
                break
    try:
        if header["DATA"] != ["binary"]:
            raise FrameError(path, f"unsupported radar pcd encoding DATA {' '.join(header['DATA'])}")
        fields, sizes, types = header["FIELDS"], [int(s) for s in header["SIZE"]], header["TYPE"]
        count = int(header["WIDTH"][0]) * int(header["HEIGHT"][0])
        dtype = np.dtype([(f, "<" + _PCD_TYPES[(t, s)]) for f, t, s in zip(fields, types, sizes)])
    except (KeyError, IndexError, ValueError) as exc:
        raise FrameError(path, f"corrupt radar pcd header ({exc})") from None
    if len(data) - pos < count * dtype.itemsize:
        raise FrameError(path, f"truncated radar pcd ({len(data) - pos} data bytes for {count} points of "
                               f"{dtype.itemsize} bytes)")
    records = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
    needed = ("x", "y", "z", "rcs", "vx_comp", "vy_comp", *RADAR_FILTERS)
    missing = [f for f in needed if f not in fields]
    if missing:
        raise FrameError(path, f"radar pcd lacks fields {missing}")
    keep = np.ones(count, dtype=bool)
    for field, allowed in RADAR_FILTERS.items():
        keep &= np.isin(records[field], allowed)
    records = records[keep]
    cols = {f: records[f].astype(np.float64) for f in ("x", "y", "z", "rcs", "vx_comp", "vy_comp")}
    if not all(np.isfinite(v).all() for v in cols.values()):
        raise FrameError(path, "corrupt radar pcd (non-finite values)")
    return cols


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------
def quaternion_matrix(q) -> np.ndarray:
    """3x3 rotation matrix of a (w, x, y, z) quaternion (normalised first, as pyquaternion does)."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rigid_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rotation + translation (exact and much cheaper than a general inverse)."""
    inv = np.eye(4)
    inv[:3, :3] = m[:3, :3].T
    inv[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return inv


def scale_intrinsics(k: np.ndarray, original: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """3x3 intrinsics of an image of ``original`` (W, H) resized to ``size``: the content of pixel u lands at
    (u + 0.5) * s - 0.5 (pixel centres at integer coordinates, s = new / old width), so fx' = fx * sx and
    cx' = (cx + 0.5) * sx - 0.5; likewise along y."""
    sx, sy = size[0] / original[0], size[1] / original[1]
    scale = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return scale @ np.asarray(k, dtype=np.float64)


def sensor_to_key_ego(entry: dict, key_pose: np.ndarray) -> np.ndarray:
    """4x4 from a sensor reading (its own ego pose and calibration) to the key frame's ego coordinates."""
    return rigid_inverse(key_pose) @ entry["ego_pose"] @ entry["sensor_to_ego"]


def relative_motion(pose_a: np.ndarray, pose_b: np.ndarray) -> tuple[float, float, float]:
    """(dx, dy, dyaw) of ``pose_b`` in ``pose_a``'s ego coordinates."""
    rel = rigid_inverse(pose_a) @ pose_b
    return float(rel[0, 3]), float(rel[1, 3]), math.atan2(rel[1, 0], rel[0, 0])


def action_from_motion(motion, dt):
    """The action of a motion: ``[..., 3]`` (dx, dy, dyaw over ``dt`` seconds, in the start ego frame) ->
    ``[..., 5]`` (dx, dy, dyaw, speed, yaw_rate), speed the chord length over dt and yaw_rate dyaw over dt. The one
    definition: shards (training data), counterfactual rendering and the planner (drivejepa/planning/motion.py)
    build their actions with it. A numpy motion gives float32 numpy; a torch tensor gives a tensor of its dtype and
    device (the planner builds thousands of candidates at once on the GPU)."""
    if type(motion).__module__.startswith("torch"):
        import torch

        dt = torch.as_tensor(dt, dtype=motion.dtype, device=motion.device)[..., None]
        speed = torch.hypot(motion[..., 0:1], motion[..., 1:2]) / dt
        return torch.cat([motion[..., :3], speed, motion[..., 2:3] / dt], dim=-1)
    motion = np.asarray(motion, dtype=np.float64)
    dt = np.asarray(dt, dtype=np.float64)[..., None]
    speed = np.hypot(motion[..., 0:1], motion[..., 1:2]) / dt
    return np.concatenate([motion[..., :3], speed, motion[..., 2:3] / dt], axis=-1).astype(np.float32)


def compute_actions(poses: list[Optional[np.ndarray]], timestamps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per key frame (dx, dy, dyaw, speed, yaw_rate) to the next key frame; invalid (zeros) where there is none."""
    n = len(poses)
    actions = np.zeros((n, 5), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    for i in range(n - 1):
        if poses[i] is None or poses[i + 1] is None:
            continue
        dt = (timestamps[i + 1] - timestamps[i]) * 1e-6
        if dt <= 0:
            continue
        actions[i] = action_from_motion(relative_motion(poses[i], poses[i + 1]), dt)
        valid[i] = True
    return actions, valid


def _rng(cfg: PreprocessConfig, sample: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, zlib.crc32(sample.encode()), stream])


def _fixed_count(values: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Subsample (seeded, order kept) or zero-pad ``values`` [K, D] to ``count`` rows, with the validity mask."""
    if len(values) > count:
        values = values[np.sort(rng.choice(len(values), count, replace=False))]
    out = np.zeros((count, values.shape[1]), dtype=np.float32)
    out[: len(values)] = values
    mask = np.zeros(count, dtype=bool)
    mask[: len(values)] = True
    return out, mask


def remove_close(points: np.ndarray, radius: float) -> np.ndarray:
    """Points [N, D] (sensor frame) without those with both |x| and |y| below ``radius``: the devkit's
    ``LidarPointCloud.remove_close`` (a square around the sensor, which holds the returns off the ego's own body)."""
    close = (np.abs(points[:, 0]) < radius) & (np.abs(points[:, 1]) < radius)
    return points[~close]


def lidar_frame(entries: list[dict], key_pose: np.ndarray, cfg: PreprocessConfig, sample: str):
    """Key-frame lidar plus previous sweeps in the key ego frame, the devkit's ``from_file_multisweep`` way: each
    sweep loses its near-sensor returns (:func:`remove_close`, sensor frame) before it is moved, and each point
    carries its sweep's time lag behind the key scan, 1e-6 * (key time stamp - sweep time stamp) seconds. An older
    sweep that cannot be read is left out. Cropped and sampled: ([N, 5] x, y, z, intensity, time_lag, [N] mask,
    [{path, reason}] of the sweeps left out)."""
    clouds, missing = [], []
    for k, entry in enumerate(entries):
        try:
            pts = read_lidar(entry["path"])
        except FrameError as exc:
            if k == 0:
                raise
            missing.append({"path": exc.path, "reason": exc.reason})
            continue
        pts = remove_close(pts, cfg.lidar_min_distance)
        m = sensor_to_key_ego(entry, key_pose)
        xyz = pts[:, :3].astype(np.float64) @ m[:3, :3].T + m[:3, 3]
        lag = np.full((len(pts), 1), 1e-6 * (entries[0]["timestamp"] - entry["timestamp"]))
        clouds.append(np.concatenate([xyz, pts[:, 3:4].astype(np.float64), lag], axis=1))
    cloud = np.concatenate(clouds)
    r, (zlo, zhi) = cfg.lidar_range, cfg.lidar_z_range
    keep = (np.abs(cloud[:, 0]) <= r) & (np.abs(cloud[:, 1]) <= r) & (cloud[:, 2] >= zlo) & (cloud[:, 2] <= zhi)
    return (*_fixed_count(cloud[keep], cfg.lidar_points, _rng(cfg, sample, 0)), missing)


def radar_frame(entries: dict[str, Optional[dict]], key_pose: np.ndarray, cfg: PreprocessConfig, sample: str):
    """All radars merged in the key ego frame: ([M, 6] x, y, z, rcs, vx_comp, vy_comp, [M] mask)."""
    merged = []
    for channel in ALL_RADARS:
        entry = entries.get(channel)
        if entry is None:
            continue
        cols = read_radar(entry["path"])
        m = sensor_to_key_ego(entry, key_pose)
        xyz = np.stack([cols["x"], cols["y"], cols["z"]], axis=1) @ m[:3, :3].T + m[:3, 3]
        vel = np.stack([cols["vx_comp"], cols["vy_comp"], np.zeros_like(cols["x"])], axis=1) @ m[:3, :3].T
        merged.append(np.concatenate([xyz, cols["rcs"][:, None], vel[:, :2]], axis=1))
    points = np.concatenate(merged) if merged else np.zeros((0, 6))
    return _fixed_count(points, cfg.radar_points, _rng(cfg, sample, 1))


def boxes_frame(boxes: dict[str, np.ndarray], key_pose: np.ndarray, cfg: PreprocessConfig):
    """Annotated boxes in the key ego frame, nearest first within ``box_range``: ([K, 9], [K] labels, [K] velocity
    known, {reason: boxes dropped}). A velocity the devkit cannot estimate (NaN) is stored as 0 with its flag False."""
    rot_t = key_pose[:3, :3].T
    center = (boxes["center"] - key_pose[:3, 3]) @ rot_t.T
    yaw = np.array([math.atan2(r[1, 0], r[0, 0]) for r in (rot_t @ quaternion_matrix(q) for q in boxes["rotation"])])
    known = np.isfinite(boxes["velocity"]).all(axis=1)
    vel3 = np.concatenate([np.where(known[:, None], boxes["velocity"], 0.0), np.zeros((len(center), 1))], axis=1)
    vel = vel3 @ rot_t.T
    out = np.concatenate([center, boxes["size"], yaw.reshape(-1, 1), vel[:, :2]], axis=1).reshape(-1, 9)
    keep = (np.abs(out[:, 0]) <= cfg.box_range) & (np.abs(out[:, 1]) <= cfg.box_range)
    order = np.argsort(np.hypot(out[:, 0], out[:, 1])[keep], kind="stable")
    dropped = {"category": int(boxes["dropped_category"]), "out_of_range": int((~keep).sum()),
               "past_max_boxes": max(0, len(order) - cfg.max_boxes)}
    order = order[: cfg.max_boxes]
    return out[keep][order].astype(np.float32), boxes["label"][keep][order], known[keep][order], dropped


# ----------------------------------------------------------------------------------------------------------------
# One scene
# ----------------------------------------------------------------------------------------------------------------
def process_frame(frame: dict, cfg: PreprocessConfig, calib: dict) -> dict:
    """One key frame's task (its readings' paths, poses and calibrations, its boxes) -> its shard arrays. The one
    path from sensor files to what a model sees: preprocessing and the closed-loop simulator (drivejepa/driving)
    both call it. ``calib`` collects each camera's scaled intrinsics on first sight."""
    key_pose = frame["ego_pose"]
    w, h = cfg.image_size
    images = np.zeros((len(cfg.cameras), h, w, 3), dtype=np.uint8)
    image_mask = np.zeros(len(cfg.cameras), dtype=bool)
    cam_to_key_ego = np.tile(np.eye(4), (len(cfg.cameras), 1, 1))
    cam_timestamps = np.zeros(len(cfg.cameras), dtype=np.int64)
    for c, channel in enumerate(cfg.cameras):
        entry = frame["cameras"].get(channel)
        if entry is None:
            continue
        images[c], original = load_image(entry["path"], (w, h))
        image_mask[c] = True
        cam_to_key_ego[c] = sensor_to_key_ego(entry, key_pose)
        cam_timestamps[c] = entry["timestamp"]
        if channel not in calib:
            calib[channel] = scale_intrinsics(entry["intrinsic"], original, (w, h))
    if frame["lidar"]:
        lidar, lidar_mask, missing_sweeps = lidar_frame(frame["lidar"], key_pose, cfg, frame["sample"])
    else:
        lidar = np.zeros((cfg.lidar_points, len(LIDAR_CHANNELS)), np.float32)
        lidar_mask = np.zeros(cfg.lidar_points, bool)
        missing_sweeps = []
    radar, radar_mask = radar_frame(frame["radars"], key_pose, cfg, frame["sample"])
    boxes, labels, velocity_valid, dropped = boxes_frame(frame["boxes"], key_pose, cfg)
    return {"images": images, "image_mask": image_mask, "cam_to_key_ego": cam_to_key_ego,
            "cam_timestamps": cam_timestamps, "lidar": lidar, "lidar_mask": lidar_mask, "radar": radar,
            "radar_mask": radar_mask, "boxes": boxes, "labels": labels, "velocity_valid": velocity_valid,
            "boxes_dropped": dropped, "missing_sweeps": missing_sweeps}


def _reset_peak_memory() -> None:
    """Reset the process's peak resident set (Linux ``clear_refs``) so the next reading is this scene's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_scene(task: dict, cfg: PreprocessConfig, config_hash: str, out_path: str) -> dict:
    """Process one scene task and write its shard; returns a small report (kept frames, skipped, peak memory).

    Runs in a Ray worker: it touches only the files named in ``task``. ``peak_rss_mb`` is the worker process's peak
    resident memory while processing this scene (Ray reuses worker processes, so it is reset first)."""
    _reset_peak_memory()
    cpu_start = time.process_time()
    skipped = list(task["bad_frames"])
    calib: dict = {}
    kept: list[tuple[int, dict]] = []
    for index, frame in enumerate(task["frames"]):
        if frame is None:
            continue
        try:
            kept.append((index, process_frame(frame, cfg, calib)))
        except FrameError as exc:
            skipped.append({"index": index, "sample": frame["sample"], "path": exc.path, "reason": exc.reason})
    skipped.sort(key=lambda s: s["index"])
    missing_sweeps = [{"index": i, "sample": task["frames"][i]["sample"], **m} for i, p in kept
                      for m in p["missing_sweeps"]]
    boxes_dropped = {reason: sum(p["boxes_dropped"][reason] for _, p in kept) for reason in BOX_DROP_REASONS}
    report = {"scene": task["scene"], "frames": len(kept), "skipped": skipped, "missing_sweeps": missing_sweeps,
              "written": False, "peak_rss_mb": _peak_memory_mb(), "cpu_seconds": time.process_time() - cpu_start}
    if not kept:
        return report
    frames = task["frames"]
    poses = [f["ego_pose"] if f else None for f in frames]
    stamps = [f["timestamp"] if f else 0 for f in frames]
    actions, action_valid = compute_actions(poses, stamps)
    idx = [i for i, _ in kept]
    n_boxes = max(len(p["labels"]) for _, p in kept)
    t = len(kept)
    boxes = np.zeros((t, n_boxes, 9), np.float32)
    box_labels = np.zeros((t, n_boxes), np.int64)
    box_mask = np.zeros((t, n_boxes), bool)
    velocity_valid = np.zeros((t, n_boxes), bool)
    for j, (_, p) in enumerate(kept):
        k = len(p["labels"])
        boxes[j, :k], box_labels[j, :k], box_mask[j, :k] = p["boxes"], p["labels"], True
        velocity_valid[j, :k] = p["velocity_valid"]
    n_cam = len(cfg.cameras)
    intrinsics = np.zeros((n_cam, 3, 3), np.float32)
    for c, channel in enumerate(cfg.cameras):
        if channel in calib:
            intrinsics[c] = calib[channel]
    arrays = {
        "images": np.stack([p["images"] for _, p in kept]),
        "image_mask": np.stack([p["image_mask"] for _, p in kept]),
        "lidar": np.stack([p["lidar"] for _, p in kept]),
        "lidar_mask": np.stack([p["lidar_mask"] for _, p in kept]),
        "radar": np.stack([p["radar"] for _, p in kept]),
        "radar_mask": np.stack([p["radar_mask"] for _, p in kept]),
        "actions": actions[idx],
        "action_valid": action_valid[idx],
        "ego_pose": np.stack([poses[i] for i in idx]).astype(np.float64),
        "timestamps": np.array([stamps[i] for i in idx], dtype=np.int64),
        "boxes": boxes,
        "box_labels": box_labels,
        "box_mask": box_mask,
        "box_velocity_valid": velocity_valid,
        "cam_intrinsics": intrinsics,
        "cam_to_key_ego": np.stack([p["cam_to_key_ego"] for _, p in kept]).astype(np.float32),
        "cam_timestamps": np.stack([p["cam_timestamps"] for _, p in kept]),
        "drivable": np.stack([drivable_grid(task["drivable_map"], poses[i], cfg.drivable_size, cfg.drivable_range)
                              for i in idx]),
    }
    meta = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash,
        "scene": task["scene"],
        "token": task["token"],
        "description": task["description"],
        "tags": task["tags"],
        "cameras": list(cfg.cameras),
        "channels_absent": task["channels_absent"],
        "sample_tokens": [frames[i]["sample"] for i in idx],
        "frame_indices": idx,
        "num_samples": len(frames),
        "skipped": skipped,
        "missing_sweeps": missing_sweeps,
        "boxes_dropped": boxes_dropped,
    }
    write_shard(out_path, meta, arrays)
    report["written"] = True
    report["peak_rss_mb"] = _peak_memory_mb()
    report["cpu_seconds"] = time.process_time() - cpu_start
    return report
