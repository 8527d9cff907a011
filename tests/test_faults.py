"""Fault injection, data side: corrupt shards, concurrent preprocess jobs, full disks, read-only outputs, bad tables
and bad config values. Each test asserts what the user sees (exit code, one line naming the file or key) and what
is kept. The training side (signals, resume, checkpoints, NaN) is in test_faults_training.py."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drivejepa.cli import main
from drivejepa.config import ConfigError, PreprocessConfig, TrainConfig, load_config
from drivejepa.data.shards import (MANIFEST, load_manifest, read_shard, readable_scenes, scenes_in_split,
                                   shard_path, write_shard)
from drivejepa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests/data/preprocess_tiny.yaml"


def copy_shards(shard_dir: Path, dest: Path) -> Path:
    shutil.copytree(shard_dir, dest)
    return dest


def error_line(capsys) -> str:
    """The one error line of a failed command (warnings logged before it may precede it; no traceback)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if " WARNING " not in line]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("drivejepa "), err
    return lines[0]


def data_offset(path: Path, key: str) -> int:
    """Byte offset in the file of array ``key`` (from the shard's own header)."""
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16:16 + length])
    start = (16 + length + 63) // 64 * 64
    return start + header["arrays"][key]["offset"]


def rewrite(path: Path, meta_change=None, array_change=None) -> None:
    """Write the shard again with valid checksums, after changing its meta or arrays (what another drivejepa
    version or configuration would have written)."""
    shard = read_shard(path)
    meta = dict(shard.meta)
    arrays = {k: np.array(v) for k, v in shard.arrays.items()}
    if meta_change:
        meta_change(meta)
    if array_change:
        array_change(arrays)
    del shard
    write_shard(path, meta, arrays)


# ------------------------------------------------------------------------------------------------ corrupt shards
def _flip_image_bytes(path: Path) -> None:
    offset = data_offset(path, "images") + 1000
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(4)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in byte))


def _edit_header(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert old in raw and len(old) == len(new)
    path.write_bytes(raw.replace(old, new, 1))


def _bad_length(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:16] = (10 ** 12).to_bytes(8, "little")
    path.write_bytes(bytes(raw))


def _bad_header_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[16:24] = b"\xff\xfe{[{[\x00\x01"
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "flipped array bytes": (_flip_image_bytes, "fails its checksum"),
    "edited dtype": (lambda p: _edit_header(p, b'"dtype":"|u1"', b'"dtype":"|i1"'), "dtype int8"),
    "edited shape": (lambda p: _edit_header(p, b'"shape":[12,', b'"shape":[13,'), "corrupt shard header"),
    "bad header length": (_bad_length, "header length"),
    "bad header bytes": (_bad_header_bytes, "corrupt shard header"),
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[:-5000]), "truncated"),
    "another preprocess config": (lambda p: rewrite(p, lambda m: m.update(config_hash="0123456789abcdef")),
                                  "made with preprocess config 0123456789abcdef"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_corrupt_shard_is_named_and_skipped_with_the_reason(shard_dir, tmp_path, name):
    shards = copy_shards(shard_dir, tmp_path / "shards")
    scene = scenes_in_split(shards, "val")[0]
    path = shard_path(shards, scene)
    corrupt, reason = CORRUPTIONS[name]
    if name == "edited shape" and b'"shape":[12,' not in path.read_bytes():
        pytest.skip("scene does not have 12 frames")
    corrupt(path)
    good, skipped = readable_scenes(shards, scenes_in_split(shards, None))
    assert scene not in good and len(good) == len(scenes_in_split(shards, None)) - 1
    assert [s["scene"] for s in skipped] == [scene]
    assert str(path) in skipped[0]["reason"] and reason in skipped[0]["reason"], skipped[0]["reason"]
    assert "\n" not in skipped[0]["reason"]


def test_an_edited_dtype_is_refused_even_with_a_matching_header_checksum(shard_dir, tmp_path):
    shards = copy_shards(shard_dir, tmp_path / "shards")
    path = shard_path(shards, scenes_in_split(shards, None)[0])
    rewrite(path, array_change=lambda a: a.update(actions=a["actions"].astype(np.float64)))
    with pytest.raises(UserError, match=r"array 'actions' has dtype float64, the shard schema says float32"):
        read_shard(path)


def test_training_evaluation_and_visualisation_skip_the_same_corrupt_shard(shard_dir, tmp_path):
    from drivejepa.evaluation.runner import plan_jobs
    from drivejepa.training.trainer import windows_datasets
    from drivejepa.visualization.decoder_training import split_scenes

    shards = copy_shards(shard_dir, tmp_path / "shards")
    train_scenes = scenes_in_split(shards, "train")
    bad = train_scenes[0]
    _flip_image_bytes(shard_path(shards, bad))
    cfg = load_config(TrainConfig, REPO / "pipelines/train_smoke.yaml", [f"data.shards={shards}"])

    train_ds, _, skipped = windows_datasets(cfg)
    assert train_ds.scenes == train_scenes[1:]
    assert [s["scene"] for s in skipped] == [bad] and "fails its checksum" in skipped[0]["reason"]

    jobs, plan = plan_jobs(shards, train_scenes, scenes_in_split(shards, "val"), 2, 2, 0)
    assert [s["scene"] for s in plan["skipped"]] == [bad] and "fails its checksum" in plan["skipped"][0]["reason"]
    assert bad not in {j.scene for j in jobs}

    train, _ = split_scenes(shards, cfg)
    assert train == train_scenes[1:]


# ------------------------------------------------------------------------------------------------ preprocess jobs
def _preprocess_cmd(synth_root, out, *extra) -> list[str]:
    from drivejepa.data.synth import SYNTH_VERSION

    return [sys.executable, "-m", "drivejepa.cli", "preprocess", "-q", "--dataroot", str(synth_root), "--version",
            SYNTH_VERSION, "--out", str(out), "--config", str(TINY), "--num-workers", "0", *extra]


def test_two_concurrent_preprocess_jobs_on_one_output_keep_every_scene(synth_root, tmp_path):
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    jobs = [subprocess.Popen(_preprocess_cmd(synth_root, out, "--split", split), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for split in ("train", "val")]
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [r[1][-2000:] for r in results]
    manifest = load_manifest(out)
    every = sorted(set(scenes_in_split(out, "train")) | set(scenes_in_split(out, "val")))
    assert sorted(manifest["scenes"]) == every and len(every) == 4
    assert all(shard_path(out, s).is_file() for s in every)
    assert not list(out.glob(".*.tmp"))


def test_cleanup_removes_only_the_temporary_files_of_dead_writers(tmp_path):
    from drivejepa.io import _host, remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mine = tmp_path / f".scene-0001.shard.{_host()}-{os.getpid()}.abc123.tmp"
    gone = tmp_path / f".scene-0002.shard.{_host()}-{dead.stdout.strip()}.def456.tmp"
    other_host = tmp_path / ".scene-0003.shard.otherhost-1.ghi789.tmp"
    for p in (mine, gone, other_host):
        p.write_bytes(b"partial")
    assert remove_stale_temps(tmp_path) == [gone]
    assert mine.exists() and other_host.exists() and not gone.exists()


@contextlib.contextmanager
def _full_disk(monkeypatch):
    """Every shard write fails the way a full disk fails: the data went to the temporary file, ENOSPC at the end."""
    from drivejepa.data import shards as shards_mod
    from drivejepa.io import atomic_path

    @contextlib.contextmanager
    def full(path):
        with atomic_path(path) as tmp:
            yield tmp
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(shards_mod, "atomic_path", full)
        yield


def test_a_full_disk_stops_preprocessing_with_the_path_and_a_rerun_completes(synth_root, tmp_path, capsys,
                                                                            monkeypatch):
    from drivejepa.data.synth import SYNTH_VERSION

    out = tmp_path / "shards"
    argv = ["preprocess", "-q", "--dataroot", str(synth_root), "--version", SYNTH_VERSION, "--out", str(out),
            "--config", str(TINY), "--num-workers", "0", "--split", "val"]
    with _full_disk(monkeypatch):
        assert main(argv) == 2
    line = error_line(capsys)
    assert "No space left on device" in line and f"{out}/scene-" in line and ".shard" in line
    assert not list(out.glob("*.shard")) and not list(out.glob(".*.tmp"))
    assert load_manifest(out)["scenes"] == {}
    assert main(argv) == 0
    assert sorted(load_manifest(out)["scenes"]) == scenes_in_split(out, "val")


def test_a_read_only_output_is_one_line_naming_the_directory(synth_root, tmp_path, capsys, monkeypatch):
    from drivejepa.data.synth import SYNTH_VERSION
    from drivejepa.io import tempfile as io_tempfile

    out = tmp_path / "readonly"
    out.mkdir()

    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(io_tempfile, "mkstemp", refuse)
    assert main(["preprocess", "-q", "--dataroot", str(synth_root), "--version", SYNTH_VERSION, "--out", str(out),
                 "--config", str(TINY), "--num-workers", "0"]) == 2
    assert error_line(capsys) == f"drivejepa preprocess: error: {out}: Read-only file system"


def test_an_output_below_a_file_is_one_line(synth_root, tmp_path, capsys):
    from drivejepa.data.synth import SYNTH_VERSION

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "shards"
    assert main(["preprocess", "-q", "--dataroot", str(synth_root), "--version", SYNTH_VERSION, "--out", str(out),
                 "--config", str(TINY), "--num-workers", "0"]) == 2
    line = error_line(capsys)
    assert str(out) in line and "Not a directory" in line


def test_a_table_of_the_wrong_shape_is_one_line(synth_root, tmp_path, capsys):
    from drivejepa.data.synth import SYNTH_VERSION

    root = tmp_path / "root"
    root.mkdir()
    for entry in synth_root.iterdir():
        if entry.name != SYNTH_VERSION:
            (root / entry.name).symlink_to(entry)
    shutil.copytree(synth_root / SYNTH_VERSION, root / SYNTH_VERSION)
    (root / SYNTH_VERSION / "sensor.json").write_text(json.dumps({"token": "a", "channel": "CAM_FRONT"}))
    assert main(["preprocess", "-q", "--dataroot", str(root), "--version", SYNTH_VERSION, "--out",
                 str(tmp_path / "out"), "--num-workers", "0"]) == 2
    line = error_line(capsys)
    assert str(root / SYNTH_VERSION) in line and "cannot load this database" in line


def test_a_manifest_of_the_wrong_shape_is_one_line(shard_dir, tmp_path):
    shards = copy_shards(shard_dir, tmp_path / "shards")
    (shards / MANIFEST).write_text(json.dumps({"schema_version": 1, "scenes": ["scene-0001"]}))
    with pytest.raises(UserError, match="not a shard manifest"):
        load_manifest(shards)


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"),
    ("data.horizon=0", "data.horizon"),
    ("data.num_workers=-1", "data.num_workers"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.epochs=0", "optim.epochs"),
    ("model.latent_dim=0", "model.latent_dim"),
    ("model.fusion_heads=3", "model.fusion_heads"),
    ("data.cameras=[CAM_BOGUS]", "data.cameras"),
])
def test_out_of_range_training_values_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(TrainConfig, REPO / "pipelines/train_smoke.yaml", ["model.size=custom", override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, key", [("image_size=[0,0]", "image_size"), ("radar_points=-1", "radar_points"),
                                           ("cameras=[CAM_BOGUS]", "cameras"), ("lidar_points=0", "lidar_points")])
def test_out_of_range_preprocess_values_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(PreprocessConfig, TINY, [override])


def test_a_bogus_camera_is_refused_before_any_image_is_written(synth_root, tmp_path, capsys):
    from drivejepa.data.synth import SYNTH_VERSION

    out = tmp_path / "out"
    assert main(["preprocess", "-q", "--dataroot", str(synth_root), "--version", SYNTH_VERSION, "--out", str(out),
                 "--num-workers", "0", "cameras=[CAM_BOGUS]"]) == 2
    assert "CAM_BOGUS" in error_line(capsys) and not out.exists()


def test_a_camera_the_dataroot_lacks_is_refused(synth_root):
    from drivejepa.data.preprocess import _check_cameras

    class Database:
        sensor = [{"channel": "CAM_FRONT"}, {"channel": "LIDAR_TOP"}]

    with pytest.raises(UserError, match=r"\['CAM_BACK'\] are not sensor channels of /data"):
        _check_cameras(Database(), PreprocessConfig(cameras=["CAM_FRONT", "CAM_BACK"]), "/data")


def test_an_explicit_field_that_contradicts_the_size_preset_is_an_error_and_unset_ones_are_filled():
    with pytest.raises(ConfigError, match=r"model.latent_dim = 256 conflicts with model.size = 'tiny'"):
        load_config(TrainConfig, None, ["model.size=tiny", "model.latent_dim=256"])
    cfg = load_config(TrainConfig, None, ["model.size=tiny", "model.latent_dim=16"])
    from drivejepa.config import SIZE_PRESETS, resolve_model_config

    assert resolve_model_config(cfg.model).lidar_widths == SIZE_PRESETS["tiny"]["lidar_widths"]


def test_a_rerun_of_preprocessing_rewrites_a_corrupt_shard(synth_root, tmp_path, capsys):
    from drivejepa.data.synth import SYNTH_VERSION

    out = tmp_path / "shards"
    argv = ["preprocess", "-q", "--dataroot", str(synth_root), "--version", SYNTH_VERSION, "--out", str(out),
            "--config", str(TINY), "--num-workers", "0", "--split", "val"]
    assert main(argv) == 0
    path = shard_path(out, scenes_in_split(out, "val")[0])
    good = path.read_bytes()
    _flip_image_bytes(path)
    assert main(argv) == 0
    assert path.read_bytes() == good
    assert "1 written, 0 already complete" in capsys.readouterr().out
