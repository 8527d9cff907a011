"""Process helpers every command relies on: seeding, device choice, atomic files, logging levels."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from drivejepa.io import atomic_path, atomic_write_json
from drivejepa.runtime import seed_everything, select_device, setup_logging


def draw():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seed_everything_makes_python_numpy_and_torch_repeatable():
    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device("cuda")


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{partial")
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().startswith("{") and '"ok": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("verbosity, level", [(-1, logging.WARNING), (0, logging.INFO), (1, logging.DEBUG)])
def test_logging_levels(verbosity, level):
    setup_logging(verbosity)
    assert logging.getLogger("drivejepa").level == level


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    target = atomic_write_json(tmp_path / "report.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
