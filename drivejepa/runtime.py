"""Process set-up shared by every command: logging, seeding, device choice, Ray start-up."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Optional

import numpy as np

log = logging.getLogger("drivejepa")


def setup_logging(verbosity: int = 0) -> None:
    """verbosity -1 = --quiet (warnings only), 0 = info, 1 = --verbose (debug)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("drivejepa").setLevel(level)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, then restore the setting. Small models (probes, heads,
    decoders) fit faster on one: on a shared machine extra threads only fight for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def select_device(name: str = "auto"):
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' was requested but CUDA is not available on this machine")
    return device


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a torchrun rendezvous or a local Ray head)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Start a local Ray instance once per process, or join a cluster with ``address='auto'``."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
