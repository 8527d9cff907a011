"""The ``drivejepa`` command: every verb is listed and real, user mistakes are one clear line (exit code 2)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from drivejepa.cli import VERBS, main

EXPECTED_VERBS = {"synth", "preprocess", "train", "evaluate", "visualize", "plan", "drive", "bench", "demo"}


def drivejepa(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "drivejepa.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_help_lists_every_verb_of_the_pipeline():
    result = drivejepa("--help")
    assert result.returncode == 0
    for verb in EXPECTED_VERBS:
        assert verb in result.stdout
    assert set(VERBS) == EXPECTED_VERBS


@pytest.mark.parametrize("verb", sorted(EXPECTED_VERBS))
def test_every_verb_is_implemented(verb):
    module = importlib.import_module(VERBS[verb])
    assert module.HELP and callable(module.add_arguments) and callable(module.run)


def test_missing_dataroot_is_one_line_error(tmp_path, capsys):
    code = main(["preprocess", "--dataroot", str(tmp_path / "nowhere"), "--version", "v1.0-mini",
                 "--out", str(tmp_path / "shards")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "nowhere" in err[0]
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").glob("*.shard"))


def test_bad_config_override_is_one_line_error_naming_the_key(tmp_path, capsys, repo_root):
    code = main(["train", "--config", str(repo_root / "pipelines/train_smoke.yaml"), "--out", str(tmp_path / "run"),
                 "optim.lrr=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "optim.lrr" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_quiet_and_verbose_are_exclusive():
    result = drivejepa("synth", "--quiet", "--verbose", "--out", "x")
    assert result.returncode == 2 and "not allowed" in result.stderr
