"""Any nuScenes dataroot -> one shard per scene, in parallel with Ray plain tasks.

The driver loads the devkit database once and sends each Ray task a light scene description
(:mod:`drivejepa.data.nuscenes_tasks`); the task reads the scene's files and writes the shard itself
(:mod:`drivejepa.data.frames`), so only a small report travels back. On a cluster the dataroot and the output
directory must be on storage every node sees.

Resuming: after every finished scene the manifest is rewritten atomically. A rerun keeps a shard whose header has
the current schema version and config hash (even one finished just before a kill, before the manifest caught up),
rewrites stale ones, and removes temporary files a killed run left behind (only those of dead processes: a
concurrent job's are left alone). Nothing partial is ever visible.

Concurrent jobs on one ``--out`` (other splits or the same one): every manifest update happens under a file lock and
merges what is on disk (scenes and splits of the same config) with this job's scenes, so no scene is lost.
A full disk, a read-only directory or a permission error stops the job with the path (``io.is_resource_error``);
it is never recorded as a skipped scene.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional

from drivejepa.config import PreprocessConfig, config_hash, config_to_dict
from drivejepa.data.shards import (SCHEMA_VERSION, empty_manifest, read_shard, read_shard_meta, shard_path,
                                   update_manifest)
from drivejepa.errors import UserError
from drivejepa.io import is_resource_error, named_os_error, remove_stale_temps

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PreprocessSummary:
    out: Path
    scenes: int = 0                     # scenes selected
    written: int = 0                    # shards written by this run
    reused: int = 0                     # complete shards kept from an earlier run
    frames: int = 0                     # key frames in the selected scenes' shards
    frames_written: int = 0             # key frames processed by this run
    skipped_frames: list[dict] = dataclasses.field(default_factory=list)   # scene, sample, path, reason
    missing_sweeps: list[dict] = dataclasses.field(default_factory=list)   # scene, index, sample, path, reason
    skipped_scenes: list[dict] = dataclasses.field(default_factory=list)   # scene, reason
    seconds: float = 0.0
    peak_worker_rss_mb: float = 0.0
    worker_cpu_seconds: float = 0.0     # CPU time the scene tasks used (independent of other load on the machine)
    driver_cpu_seconds: float = 0.0     # CPU time of this process (database, task descriptions, manifest)

    @property
    def frames_per_second(self) -> float:
        return self.frames_written / self.seconds if self.seconds > 0 else 0.0

    def format(self, max_lines: int = 15) -> str:
        lines = [
            f"preprocess -> {self.out}",
            f"  scenes      {self.scenes} selected: {self.written} written, {self.reused} already complete, "
            f"{len(self.skipped_scenes)} skipped",
            f"  key frames  {self.frames} in shards ({self.frames_written} processed now), "
            f"{len(self.skipped_frames)} skipped",
            f"  time        {self.seconds:.1f} s, {self.frames_per_second:.1f} key frames/s, "
            f"peak worker memory {self.peak_worker_rss_mb:.0f} MB",
        ]
        problems = [f"  skipped scene {s['scene']}: {s['reason']}" for s in self.skipped_scenes]
        problems += [f"  skipped {s['scene']} frame {s['index']}: {s['path']}: {s['reason']}"
                     for s in self.skipped_frames]
        problems += [f"  left out a lidar sweep of {s['scene']} frame {s['index']}: {s['path']}: {s['reason']}"
                     for s in self.missing_sweeps]
        lines += problems[:max_lines]
        if len(problems) > max_lines:
            lines.append(f"  ... and {len(problems) - max_lines} more (see {self.out / 'manifest.json'})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["frames_per_second"] = self.frames_per_second
        return d


def _manifest_entry(meta: dict, path: Path) -> dict:
    return {"file": path.name, "token": meta["token"], "frames": len(meta["frame_indices"]),
            "num_samples": meta["num_samples"], "description": meta["description"], "tags": meta["tags"],
            "channels_absent": meta["channels_absent"], "skipped": meta["skipped"],
            "missing_sweeps": meta["missing_sweeps"], "boxes_dropped": meta["boxes_dropped"]}


def _complete(path: Path, chash: str) -> Optional[dict]:
    """The header meta of a complete, current shard at ``path``; None if absent, unreadable or stale."""
    if not path.is_file():
        return None
    try:
        meta = read_shard(path).meta  # header, sizes and array checksums: a truncated or damaged file fails here
    except (UserError, OSError, KeyError, ValueError):
        return None
    if meta.get("schema_version") != SCHEMA_VERSION or meta.get("config_hash") != chash:
        return None
    return meta


def _merge(current: Optional[dict], base: dict, out: Path, mine: dict, removed: set, chash: str, recheck: bool) -> dict:
    """The manifest to write: ``base`` (this job's config and splits) with the scenes and splits of the manifest on
    disk (written by an earlier or a concurrent job), this job's ``mine`` entries on top and ``removed`` dropped.
    A scene listed on disk is kept when it was made with the same config (with ``recheck``: when its shard is
    complete and current)."""
    manifest = {**base, "splits": {k: list(v) for k, v in base["splits"].items()}, "scenes": {}}
    if current is not None:
        same = current.get("config_hash") == chash and current.get("schema_version") == SCHEMA_VERSION
        for name, entry in current.get("scenes", {}).items():
            if (same and not recheck) or _complete(shard_path(out, name), chash) is not None:
                manifest["scenes"][name] = entry
        if same:
            for split, names in current.get("splits", {}).items():
                manifest["splits"][split] = sorted(set(manifest["splits"].get(split, [])) | set(names))
    manifest["scenes"].update(mine)
    for name in removed:
        manifest["scenes"].pop(name, None)
    return manifest


def preprocess_dataroot(dataroot, version: str, out, cfg: PreprocessConfig, *, split: Optional[str] = None,
                        num_workers: Optional[int] = None, address: Optional[str] = None, overwrite: bool = False,
                        progress: bool = True) -> PreprocessSummary:
    """Write ``out/<scene>.shard`` for every scene of ``split`` and ``out/manifest.json``.

    ``num_workers`` bounds how many scenes are processed at once (default: the CPUs Ray has); ``address="auto"``
    joins a running Ray cluster. ``overwrite`` rewrites shards that are complete and current."""
    from tqdm import tqdm

    from drivejepa.data.nuscenes_tasks import check_dataroot, check_sweeps, load_nuscenes, scene_task, select_scenes

    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    chash = config_hash(cfg)
    check_sweeps(check_dataroot(dataroot, version), cfg)
    nusc = load_nuscenes(dataroot, version)
    scenes, splits = select_scenes(nusc, version, split)
    _check_cameras(nusc, cfg, dataroot)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise named_os_error(exc, out) from exc
    remove_stale_temps(out)  # left by a killed run; never visible under a final name

    base = empty_manifest(config_to_dict(cfg), chash, str(Path(dataroot).resolve()), version)
    base["splits"] = splits
    mine: dict[str, dict] = {}
    removed: set[str] = set()
    summary = PreprocessSummary(out=out, scenes=len(scenes))
    todo = []
    for scene in scenes:
        path = shard_path(out, scene["name"])
        meta = None if overwrite else _complete(path, chash)
        if meta is None:
            todo.append(scene)
        else:
            mine[scene["name"]] = _manifest_entry(meta, path)
            summary.reused += 1
            summary.skipped_frames += [{"scene": scene["name"], **s} for s in meta["skipped"]]
            summary.missing_sweeps += [{"scene": scene["name"], **s} for s in meta["missing_sweeps"]]
    selected = {s["name"] for s in scenes}
    # Scenes listed by an earlier or concurrent job outside this selection stay listed while their shard is current.
    manifest = update_manifest(out, lambda current: _merge(current, base, out, mine, removed, chash, recheck=True))

    bar = tqdm(total=len(scenes), initial=summary.reused, desc="preprocess", unit="scene", disable=not progress)

    def finish(report: dict) -> None:
        nonlocal manifest
        name = report["scene"]
        for s in report["skipped"]:
            summary.skipped_frames.append({"scene": name, **s})
        summary.missing_sweeps += [{"scene": name, **s} for s in report.get("missing_sweeps", [])]
        summary.peak_worker_rss_mb = max(summary.peak_worker_rss_mb, report["peak_rss_mb"])
        summary.worker_cpu_seconds += report["cpu_seconds"]
        summary.frames_written += report["frames"]
        if report["written"]:
            path = shard_path(out, name)
            mine[name] = _manifest_entry(read_shard_meta(path), path)
            summary.written += 1
        else:
            mine.pop(name, None)
            removed.add(name)
            shard_path(out, name).unlink(missing_ok=True)
            reason = report.get("error", "no key frame could be read")
            summary.skipped_scenes.append({"scene": name, "reason": reason})
        manifest = update_manifest(out, lambda current: _merge(current, base, out, mine, removed, chash, recheck=False))
        bar.update(1)

    if todo:
        if num_workers == 0:
            from drivejepa.data.frames import build_scene

            for scene in todo:
                finish(build_scene(scene_task(nusc, scene, cfg), cfg, chash, str(shard_path(out, scene["name"]))))
        else:
            _run_ray(nusc, todo, cfg, chash, out, num_workers, address, finish)
    bar.close()
    summary.frames = sum(e["frames"] for n, e in manifest["scenes"].items() if n in selected)
    summary.seconds = time.perf_counter() - start
    summary.driver_cpu_seconds = time.process_time() - cpu_start
    return summary


def _check_cameras(nusc, cfg: PreprocessConfig, dataroot) -> None:
    """Every configured camera must be a sensor channel of this database (config.py checks the devkit's names)."""
    channels = {s["channel"] for s in nusc.sensor}
    missing = [c for c in cfg.cameras if c not in channels]
    if missing:
        raise UserError(f"cameras: {missing} are not sensor channels of {dataroot} (it has "
                        f"{sorted(c for c in channels if c.startswith('CAM'))})")


def _run_ray(nusc, todo, cfg, chash, out, num_workers, address, finish) -> None:
    """Plain Ray tasks (no actors: nothing to deadlock on, see ray#44687), at most ``num_workers`` in flight."""
    import ray

    from drivejepa.data.frames import build_scene
    from drivejepa.data.nuscenes_tasks import scene_task
    from drivejepa.runtime import init_ray

    init_ray(address=address, num_cpus=None)
    limit = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=1, max_retries=2)(build_scene)
    cfg_ref = ray.put(cfg)
    pending: dict = {}
    queue = list(todo)

    def refill() -> None:
        while queue and len(pending) < limit:
            scene = queue.pop(0)
            ref = remote.remote(scene_task(nusc, scene, cfg), cfg_ref, chash, str(shard_path(out, scene["name"])))
            pending[ref] = scene["name"]

    refill()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        # The freed worker gets its next scene before the driver records this one (manifest merge under a lock,
        # header read), so it does not wait for the driver's serial work.
        refill()
        try:
            report = ray.get(done[0])
        except ray.exceptions.RayError as exc:  # a crashed worker costs its scene, not the run
            cause = getattr(exc, "cause", None)
            if is_resource_error(cause):  # ... but a full disk or a read-only output stops the job
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise named_os_error(cause, shard_path(out, name)) from None
            log.error("scene %s failed: %s", name, exc)
            report = {"scene": name, "frames": 0, "skipped": [], "written": False, "peak_rss_mb": 0.0,
                      "cpu_seconds": 0.0, "error": str(exc).strip().splitlines()[-1][:300]}
        finish(report)
