"""Session fixtures shared by the test suite: one Ray instance, one small synthetic world, its shards, one run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BRANCH_FRAMES = 5               # key frames each branch of the `branch_root` world runs past its branch point
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """The suite's models are tiny: a second intra-op thread gains nothing and, beside Ray workers and spawned
    training processes on a 2-core machine, mostly waits at barriers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from drivejepa.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from drivejepa.data.synth import write_world

    out = tmp_path_factory.mktemp("world") / "nuscenes"
    write_world(out, scenes=4, samples_per_scene=12, seed=0, image_size=(320, 180), workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, synth_root, ray_session) -> Path:
    from drivejepa.config import PreprocessConfig, load_config
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.data.synth import SYNTH_VERSION

    cfg = load_config(PreprocessConfig, REPO / "tests/data/preprocess_tiny.yaml")
    out = tmp_path_factory.mktemp("shards")
    preprocess_dataroot(synth_root, SYNTH_VERSION, out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, shard_dir) -> Path:
    from drivejepa.config import TrainConfig, load_config
    from drivejepa.training.trainer import train

    cfg = load_config(TrainConfig, REPO / "pipelines/train_smoke.yaml", [f"data.shards={shard_dir}"])
    run = tmp_path_factory.mktemp("run")
    train(cfg, run, progress=False)
    return run


@pytest.fixture(scope="session")
def branch_root(tmp_path_factory) -> Path:
    """Scenes 1-4 (left turn, highway, right turn with pedestrians, queue at a red light), each with one branch
    point of up to 5 futures (as many as the traffic lets differ within 2.5 s)."""
    from drivejepa.data.synth import write_world

    out = tmp_path_factory.mktemp("branches") / "nuscenes"
    write_world(out, scenes=4, samples_per_scene=12, seed=0, image_size=(96, 54), cameras=["CAM_FRONT"], workers=1,
                progress=False, branches=5, branch_points=1, branch_frames=BRANCH_FRAMES)
    return out


@pytest.fixture(scope="session")
def branch_shards(tmp_path_factory, branch_root, ray_session) -> Path:
    """Every scene of ``branch_root``, branches included, preprocessed like ``shard_dir`` (same config, so the
    ``smoke_run`` checkpoint reads them)."""
    from drivejepa.config import PreprocessConfig, load_config
    from drivejepa.data.preprocess import preprocess_dataroot
    from drivejepa.data.synth import SYNTH_VERSION

    cfg = load_config(PreprocessConfig, REPO / "tests/data/preprocess_tiny.yaml")
    out = tmp_path_factory.mktemp("branch_shards")
    preprocess_dataroot(branch_root, SYNTH_VERSION, out, cfg, progress=False)
    return out
