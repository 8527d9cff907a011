"""The same training on a Ray cluster: Ray Train's TorchTrainer starts one worker per device and the process group;
each worker runs :func:`drivejepa.training.trainer.train`, which joins that group (gloo on CPU, NCCL on GPU).

Paths (shards, run directory) must be on storage every node mounts at the same path; rank 0 writes the run
directory exactly as a torchrun or single-process run does, so ``--resume auto`` works across launchers."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from drivejepa.config import TrainConfig, config_to_dict, from_dict

log = logging.getLogger(__name__)


def _worker(config: dict) -> None:
    import ray.train

    from drivejepa.runtime import setup_logging
    from drivejepa.training.trainer import train

    context = ray.train.get_context()
    setup_logging(0 if context.get_world_rank() == 0 else -1)
    cfg = from_dict(TrainConfig, config["train_config"], "ray_train config")
    summary = train(cfg, config["run_dir"], resume=config["resume"], progress=False,
                    allow_other_shards=config["allow_other_shards"])
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})


def train_on_ray(cfg: TrainConfig, run_dir: str | Path, *, num_workers: int, use_gpu: bool = False,
                 cpus_per_worker: float = 1.0, resume: Optional[str] = None, address: Optional[str] = None,
                 allow_other_shards: bool = False) -> dict:
    """Run ``train`` on ``num_workers`` Ray workers (one GPU each with ``use_gpu``); returns the run's summary
    (RUN/summary.json, written by rank 0).

    ``address='auto'`` joins a running cluster; without it a local Ray instance is started (or the one already
    running in this process is used)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from drivejepa.runtime import init_ray

    run_dir = Path(run_dir).resolve()
    if cfg.data.shards:
        cfg.data.shards = str(Path(cfg.data.shards).resolve())
    init_ray(address=address)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"train_config": config_to_dict(cfg), "run_dir": str(run_dir), "resume": resume,
                           "allow_other_shards": allow_other_shards},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir / "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads((run_dir / "summary.json").read_text())
