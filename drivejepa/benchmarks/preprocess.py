"""Preprocessing throughput: the Ray pipeline against a naive sequential devkit loop doing the same work.

The baseline is what most nuScenes tools do: per key frame ``get_sample_data``, a full PIL decode then resize of each
camera, ``LidarPointCloud.from_file`` / ``RadarPointCloud.from_file`` moved to the ego frame, cropped and sampled,
the boxes from the devkit. Both sides include loading the database. Worlds are synthetic with realistic 1600x900
JPEGs (so DCT-scaled decoding matters), generated once under ``--work`` and reused. Reported: key frames per second
of the baseline and of the pipeline with 1 and 2 workers (ratio, scaling) and the peak memory of a worker on worlds
of two sizes.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("--work", default="/tmp/drivejepa-bench/preprocess", help="where worlds and shards go")
    parser.add_argument("--config", default=str(REPO / "pipelines/preprocess.yaml"), help="preprocessing YAML")
    parser.add_argument("--scenes", type=int, nargs=2, default=[2, 8], metavar=("SMALL", "LARGE"),
                        help="scenes in the two worlds (throughput is measured on the large one)")
    parser.add_argument("--samples", type=int, default=40,
                        help="key frames per scene (40: the large world takes seconds, so fixed costs do not hide "
                             "the scaling)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[1600, 900], metavar=("W", "H"))


def _world(work: Path, scenes: int, samples: int, image_size) -> Path:
    from drivejepa.data.synth import write_world

    root = work / f"world_{scenes}x{samples}_{image_size[0]}x{image_size[1]}"
    done = root / ".complete"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_world(root, scenes=scenes, samples_per_scene=samples, seed=0, image_size=tuple(image_size),
                    progress=False)
        done.write_text("ok\n")
    return root


def naive_devkit_loop(dataroot: Path, version: str, cfg) -> dict:
    """The sequential baseline: same outputs per key frame, computed the usual way through the devkit."""
    import numpy as np
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.data_classes import LidarPointCloud, RadarPointCloud
    from PIL import Image
    from pyquaternion import Quaternion

    from drivejepa.config import ALL_RADARS

    start, cpu_start = time.perf_counter(), time.process_time()
    nusc = NuScenes(version, str(dataroot), verbose=False)
    rng = np.random.default_rng(cfg.seed)
    frames = 0

    def to_ego(pc, sd_token):
        cs = nusc.get("calibrated_sensor", nusc.get("sample_data", sd_token)["calibrated_sensor_token"])
        pc.rotate(Quaternion(cs["rotation"]).rotation_matrix)
        pc.translate(np.array(cs["translation"]))
        return pc.points.T

    for scene in nusc.scene:
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            for cam in cfg.cameras:
                path, _, _ = nusc.get_sample_data(sample["data"][cam])
                np.asarray(Image.open(path).convert("RGB").resize(tuple(cfg.image_size), Image.BILINEAR))
            lidar_token = sample["data"]["LIDAR_TOP"]
            path, boxes, _ = nusc.get_sample_data(lidar_token)
            pts = to_ego(LidarPointCloud.from_file(path), lidar_token)
            r = cfg.lidar_range
            pts = pts[(np.abs(pts[:, 0]) <= r) & (np.abs(pts[:, 1]) <= r)]
            if len(pts) > cfg.lidar_points:
                pts = pts[rng.choice(len(pts), cfg.lidar_points, replace=False)]
            for radar in ALL_RADARS:
                if radar in sample["data"]:
                    rpath, _, _ = nusc.get_sample_data(sample["data"][radar])
                    to_ego(RadarPointCloud.from_file(rpath), sample["data"][radar])
            for box in boxes:
                nusc.box_velocity(box.token)
            frames += 1
            token = sample["next"]
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {"frames": frames, "seconds": seconds, "frames_per_second": frames / seconds,
            "cpu_ms_per_frame": 1e3 * cpu / frames}


def _pipeline(dataroot: Path, version: str, out: Path, cfg, workers: int) -> dict:
    from drivejepa.data.preprocess import preprocess_dataroot

    s = preprocess_dataroot(dataroot, version, out, cfg, num_workers=workers, overwrite=True, progress=False)
    if s.skipped_frames or s.skipped_scenes:
        raise RuntimeError(f"benchmark world has unreadable frames: {s.format()}")
    cpu = s.worker_cpu_seconds + s.driver_cpu_seconds
    return {"frames": s.frames_written, "seconds": s.seconds, "frames_per_second": s.frames_per_second,
            "cpu_ms_per_frame": 1e3 * cpu / s.frames_written, "peak_worker_rss_mb": s.peak_worker_rss_mb}


def run(args) -> dict:
    from drivejepa.config import PreprocessConfig, load_config
    from drivejepa.data.synth import SYNTH_VERSION
    from drivejepa.runtime import init_ray

    cfg = load_config(PreprocessConfig, args.config)
    work = Path(args.work)
    small_n, large_n = args.scenes
    print(f"generating worlds ({small_n} and {large_n} scenes x {args.samples} key frames, "
          f"{args.image_size[0]}x{args.image_size[1]} JPEGs) under {work} ...", flush=True)
    small = _world(work, small_n, args.samples, args.image_size)
    large = _world(work, large_n, args.samples, args.image_size)

    t0 = time.perf_counter()
    init_ray(num_cpus=None)
    ray_start = time.perf_counter() - t0
    # warm-up: Ray worker processes and the page cache, so neither side pays for them in the timing
    _pipeline(small, SYNTH_VERSION, work / "shards_warmup", cfg, 2)
    naive_devkit_loop(small, SYNTH_VERSION, cfg)

    load_before = os.getloadavg()
    baseline = naive_devkit_loop(large, SYNTH_VERSION, cfg)
    one = _pipeline(large, SYNTH_VERSION, work / "shards_large_1", cfg, 1)
    two = _pipeline(large, SYNTH_VERSION, work / "shards_large_2", cfg, 2)
    small_run = _pipeline(small, SYNTH_VERSION, work / "shards_small_2", cfg, 2)

    result = {
        "config": str(args.config),
        "cameras": list(cfg.cameras),
        "image_size_in": list(args.image_size),
        "image_size_out": list(cfg.image_size),
        "worlds": {"small": {"scenes": small_n, "key_frames": small_run["frames"]},
                   "large": {"scenes": large_n, "key_frames": two["frames"]}},
        "ray_start_seconds": ray_start,
        "cpus": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "baseline_naive_devkit": baseline,
        "pipeline_1_worker": one,
        "pipeline_2_workers": two,
        "pipeline_small_2_workers": small_run,
        "speedup_vs_baseline": two["frames_per_second"] / baseline["frames_per_second"],
        "speedup_1_worker_vs_baseline": one["frames_per_second"] / baseline["frames_per_second"],
        "scaling_1_to_2_workers": two["frames_per_second"] / one["frames_per_second"],
        "cpu_speedup_vs_baseline": baseline["cpu_ms_per_frame"] / two["cpu_ms_per_frame"],
        "peak_worker_rss_mb": {"small": small_run["peak_worker_rss_mb"], "large": two["peak_worker_rss_mb"]},
        "targets": {"speedup_vs_baseline": 3.0, "scaling_1_to_2_workers": 1.7},
    }
    rows = [("naive devkit loop (1 process)", baseline),
            ("drivejepa preprocess, 1 worker", one),
            ("drivejepa preprocess, 2 workers", two)]
    print(f"\npreprocess benchmark: {large_n} scenes, {two['frames']} key frames, cameras {','.join(cfg.cameras)} "
          f"{args.image_size[0]}x{args.image_size[1]} -> {cfg.image_size[0]}x{cfg.image_size[1]}")
    print(f"{'':34s} {'seconds':>8s} {'key frames/s':>13s} {'vs naive':>9s} {'CPU ms/frame':>13s}")
    for name, r in rows:
        print(f"{name:34s} {r['seconds']:8.2f} {r['frames_per_second']:13.2f} "
              f"{r['frames_per_second'] / baseline['frames_per_second']:8.2f}x {r['cpu_ms_per_frame']:13.1f}")
    print(f"scaling 1 -> 2 workers: {result['scaling_1_to_2_workers']:.2f}x (target >= 1.7x); "
          f"speed-up vs naive: {result['speedup_vs_baseline']:.2f}x (target >= 3x)")
    print(f"CPU time per key frame: {result['cpu_speedup_vs_baseline']:.2f}x less than naive "
          f"(unaffected by other load; load average {load_before[0]:.1f} on {os.cpu_count()} CPUs during the run)")
    print(f"peak worker memory: {small_run['peak_worker_rss_mb']:.0f} MB ({small_n} scenes) vs "
          f"{two['peak_worker_rss_mb']:.0f} MB ({large_n} scenes); Ray start-up {ray_start:.1f} s (not timed)")
    return result
