"""What a driver sees at a key frame of the closed loop: the readings a model consumes, rendered from the ego's
current pose, turned into the shard's arrays by the code that preprocesses a dataroot.

Each key frame's readings are rendered and encoded as the writer writes them (data/synth/sensors.py: the same noise
streams, calibrations, pose records and trigger times), written to a scratch folder, and read back through
``frames.process_frame``, the function that builds every shard frame. So the closed-loop observation of a scene the
ego drives as logged is the shard frame of that scene, byte for byte, and any other drive is seen through the same
decoding, ego-frame conventions, cropping and seeded point sampling.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from drivejepa.config import ALL_RADARS, PreprocessConfig
from drivejepa.data.frames import process_frame
from drivejepa.data.nuscenes_tasks import pose_matrix
from drivejepa.data.shards import ARRAY_DTYPES
from drivejepa.data.synth import camera, lidar, sensors
from drivejepa.data.synth.tables import token
from drivejepa.data.synth.writer import KEY_PERIOD_US, SWEEP_PERIOD_US, scene_start_us

# The per-frame arrays of a shard that a closed-loop frame holds (boxes are annotations: no driver sees them).
FRAME_KEYS = ("images", "image_mask", "cam_to_key_ego", "cam_timestamps", "lidar", "lidar_mask", "radar",
              "radar_mask", "ego_pose", "timestamps")
EXTENSIONS = {"camera": ".jpg", "radar": ".pcd", "lidar": ".pcd.bin"}
_NO_BOXES = {"dropped_category": 0, "center": np.zeros((0, 3)), "size": np.zeros((0, 3)),
             "rotation": np.zeros((0, 4)), "velocity": np.zeros((0, 2)), "label": np.zeros(0, dtype=np.int64)}


class Observer:
    """Renders key frames of one closed-loop world for a preprocessing config (cameras, image size, points).

    ``world``: the closed-loop World (its agent arrays grow as the loop runs; a key frame can be rendered once the
    simulation has reached the step after it, when its last camera has fired). ``image_size``: the camera
    resolution the world is stored at (``drivejepa synth --image-size``), which preprocessing then resizes."""

    def __init__(self, world, number: int, seed: int, image_size: tuple[int, int], cfg: PreprocessConfig):
        self.world, self.number, self.seed, self.cfg = world, int(number), int(seed), cfg
        self.image_size = tuple(int(v) for v in image_size)
        self.noise = sensors.SensorNoise([self.seed, self.number, 2])
        self.renderer = camera.Renderer(world, *self.image_size, self.noise.camera_bank()) if cfg.cameras else None
        self.directions = lidar.sensor_directions()
        channels = list(cfg.cameras) + list(ALL_RADARS) + [sensors.LIDAR]
        self.calibration = {}
        for ch in channels:
            tr, rot, intrinsic = sensors.calibration(ch, self.image_size)
            self.calibration[ch] = (pose_matrix(dict(translation=tr, rotation=rot)), intrinsic)
        self.scaled_intrinsics: dict = {}            # process_frame's per-camera calibration, filled on first sight
        self._scratch = tempfile.TemporaryDirectory(prefix="drivejepa-drive-")
        self.scratch = Path(self._scratch.name)
        self._lidar_cache: dict[int, bytes] = {}     # nominal time -> bytes of the lidar readings still needed

    def close(self) -> None:
        self._scratch.cleanup()

    def _entry(self, channel: str, nominal_us: int, off_us: int, name: str) -> dict:
        """Render one reading, write it to the scratch folder and describe it as a preprocessing task entry."""
        kind = sensors.modality(channel)
        t = off_us / 1e6
        if kind == "lidar" and nominal_us in self._lidar_cache:
            data = self._lidar_cache[nominal_us]
        else:
            data, _ = sensors.render(self.world, channel, t, self.noise.reading(channel, nominal_us), self.renderer,
                                     self.directions)
            if kind == "lidar":
                self._lidar_cache[nominal_us] = data
        path = self.scratch / f"{name}{EXTENSIONS[kind]}"
        path.write_bytes(data)
        xy, yaw, _ = self.world.ego_pose(t)
        stamp = scene_start_us(self.number) + off_us
        record = sensors.pose_record("", stamp, xy, yaw)
        sensor_to_ego, intrinsic = self.calibration[channel]
        entry = {"path": str(path), "sensor_to_ego": sensor_to_ego, "ego_pose": pose_matrix(record),
                 "timestamp": stamp}
        if intrinsic:
            entry["intrinsic"] = np.asarray(intrinsic, dtype=np.float64)
        return entry

    def frame(self, index: int) -> dict:
        """The shard arrays (FRAME_KEYS, no leading axis) of key frame ``index`` of the scene."""
        nominal = int(index) * KEY_PERIOD_US
        last_step = self.world.start + (self.world.steps - 1) * 0.05
        if nominal / 1e6 + 0.012 > last_step + 1e-9:
            raise RuntimeError(f"key frame {index} rendered before the simulation reached its last camera")
        cameras = {ch: self._entry(ch, nominal, sensors.camera_offset_us(self.seed, self.number, ch, nominal), ch)
                   for ch in self.cfg.cameras}
        radars = {ch: self._entry(ch, nominal, nominal, ch) for ch in ALL_RADARS}
        sweeps = [nominal - k * SWEEP_PERIOD_US["lidar"] for k in range(self.cfg.lidar_sweeps)]
        sweeps = [s for s in sweeps if s >= 0]
        lidar_entries = [self._entry(sensors.LIDAR, s, s, f"{sensors.LIDAR}_{k}") for k, s in enumerate(sweeps)]
        self._lidar_cache = {s: self._lidar_cache[s] for s in sweeps}
        name = f"scene-{self.number:04d}"
        task = {"sample": token(self.seed, "sample", name, int(index)),
                "timestamp": scene_start_us(self.number) + nominal, "ego_pose": lidar_entries[0]["ego_pose"],
                "lidar": lidar_entries, "cameras": cameras, "radars": radars, "boxes": _NO_BOXES}
        arrays = process_frame(task, self.cfg, self.scaled_intrinsics)
        arrays["ego_pose"] = task["ego_pose"]
        arrays["timestamps"] = task["timestamp"]
        return {k: np.asarray(arrays[k], dtype=ARRAY_DTYPES[k]) for k in FRAME_KEYS}

    def intrinsics(self) -> np.ndarray:
        """[C, 3, 3] float32 camera intrinsics as the shard stores them (after a frame has been rendered)."""
        out = np.zeros((len(self.cfg.cameras), 3, 3), np.float32)
        for c, ch in enumerate(self.cfg.cameras):
            if ch in self.scaled_intrinsics:
                out[c] = self.scaled_intrinsics[ch]
        return out
