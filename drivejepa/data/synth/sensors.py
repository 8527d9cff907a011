"""One sensor reading of the synthetic world: when it fires, its calibration and pose records, its noise, its bytes.

The writer (a logged scene) and the closed-loop simulator (drivejepa/driving) render every reading through here, so
a reading depends only on the world, the channel and its time. Each reading draws its noise from a random stream of
its own, seeded by the scene, the channel and the reading's nominal time, never from a stream shared with other
channels or frames: a simulator that renders only the readings a model consumes, in time order, gets the bytes the
writer wrote for them in channel order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from drivejepa.config import ALL_CAMERAS, ALL_RADARS

LIDAR = "LIDAR_TOP"
SENSOR_CHANNELS = tuple(ALL_CAMERAS) + tuple(ALL_RADARS) + (LIDAR,)     # fixed codes of the noise streams


def modality(channel: str) -> str:
    """'camera', 'radar' or 'lidar'."""
    if channel in ALL_CAMERAS:
        return "camera"
    if channel in ALL_RADARS:
        return "radar"
    if channel == LIDAR:
        return "lidar"
    raise ValueError(f"unknown sensor channel {channel!r}")


class SensorNoise:
    """The random streams of one scene's readings (``entropy``: the scene's seed words)."""

    def __init__(self, entropy: Sequence[int]):
        self.entropy = [int(v) for v in entropy]

    def reading(self, channel: str, nominal_us: int) -> np.random.Generator:
        """The stream of the reading of ``channel`` at nominal offset ``nominal_us`` from the scene start."""
        return np.random.default_rng(np.random.SeedSequence(
            self.entropy + [SENSOR_CHANNELS.index(channel), int(nominal_us)]))

    def camera_bank(self) -> np.random.Generator:
        """The stream of the cameras' noise bank (camera.Renderer), drawn once per scene."""
        return np.random.default_rng(np.random.SeedSequence(self.entropy + [len(SENSOR_CHANNELS)]))


def camera_offset_us(seed: int, number: int, channel: str, nominal_us: int) -> int:
    """When camera ``channel`` fires for the frame at ``nominal_us`` (the lidar's time, from the scene start): its
    mount's trigger offset plus a seeded jitter of its own (camera.TRIGGER_JITTER_US)."""
    from drivejepa.data.synth import camera

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(number), 3, SENSOR_CHANNELS.index(channel),
                                                        int(nominal_us)]))
    jitter = int(rng.integers(-camera.TRIGGER_JITTER_US, camera.TRIGGER_JITTER_US + 1))
    return int(nominal_us) + camera.trigger_offset_us(channel) + jitter


def calibration(channel: str, image_size: tuple[int, int]) -> tuple[list, list, list]:
    """(translation, rotation quaternion [w, x, y, z], camera intrinsic) of a calibrated_sensor record."""
    from drivejepa.data.synth import camera, lidar, radar
    from drivejepa.data.synth.tables import quaternion_matrix, quaternion_yaw

    kind = modality(channel)
    if kind == "camera":
        tr, rot = camera.CAMERAS[channel][0], quaternion_matrix(camera.rotation(channel))
        intrinsic = camera.intrinsics(channel, *image_size).tolist()
    elif kind == "radar":
        tr, rot, intrinsic = radar.RADARS[channel][0], quaternion_yaw(np.radians(radar.RADARS[channel][1])), []
    else:
        tr, rot, intrinsic = lidar.TRANSLATION, quaternion_yaw(lidar.YAW), []
    return [float(v) for v in tr], rot, intrinsic


def pose_record(tok: str, ts: int, xy, yaw: float) -> dict:
    """The ego_pose record of the ego at (xy, yaw), as the writer stores it (translation rounded to microns)."""
    from drivejepa.data.synth.tables import quaternion_yaw

    return dict(token=tok, timestamp=ts, rotation=quaternion_yaw(yaw),
                translation=[round(float(xy[0]), 6), round(float(xy[1]), 6), 0.0])


def render(world, channel: str, t: float, rng: np.random.Generator, renderer=None,
           directions: Optional[np.ndarray] = None):
    """The file bytes of one reading at scene time ``t`` and what was rendered: a camera's image, the radar's
    structured points, the lidar's (points, point agent, visibility). ``renderer`` (camera.Renderer) and
    ``directions`` (lidar.sensor_directions()) are the scene's precomputations."""
    from drivejepa.data.synth import camera, lidar, radar

    kind = modality(channel)
    if kind == "camera":
        img = renderer.render(channel, t, rng)
        return camera.encode_jpeg(img), img
    if kind == "radar":
        pts = radar.scan(world, t, channel, rng)
        return radar.encode_pcd(pts), pts
    scan = lidar.scan(world, t, rng, lidar.sensor_directions() if directions is None else directions)
    return scan[0].tobytes(), scan
