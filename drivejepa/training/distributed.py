"""Data-parallel plumbing: process-group start-up from torchrun's (or Ray Train's) environment, the sampler, reductions.

One code path for one CPU and many GPUs: without ``WORLD_SIZE`` in the environment the run is a single process
and every collective below is a no-op. Only rank 0 logs and writes checkpoints (``DistInfo.is_main``)."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from drivejepa.runtime import select_device

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False                          # True when this process started the group (and must end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join the process group described by the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT; Ray Train starts the group itself). NCCL on CUDA, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(rank, world, local_rank, _device_for(device_name, local_rank), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=select_device(device_name))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _device_for(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    log.debug("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    return DistInfo(rank, world, local_rank, device, owns_group=True)


def _device_for(name: str, local_rank: int) -> torch.device:
    device = select_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose order is a pure function of (seed, epoch) and which can start part-way through.

    ``set_position(epoch, skip)`` selects the epoch's permutation and drops this rank's first ``skip`` indices, so a
    run resumed from a checkpoint taken after k batches sees exactly the batches an uninterrupted run would.

    With ``sibling_batch`` (this rank's batch size, at least 2) the order is made of whole batches
    (``data.dataset.sibling_batches`` over ``dataset.sibling_groups()``), so that windows sharing a context arrive
    in one batch; the batches go to the ranks in turn, the list repeated from its start to give each rank as many.
    """

    def __init__(self, dataset, info: DistInfo, *, shuffle: bool, seed: int, drop_last: bool = False,
                 sibling_batch: int = 0):
        super().__init__(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0
        self.sibling_batch = sibling_batch
        if sibling_batch:
            self.groups = dataset.sibling_groups()
            count = len(self._batches(0))
            self.num_samples = -(-count // self.num_replicas) * sibling_batch
            self.total_size = self.num_samples * self.num_replicas

    def _batches(self, epoch: int) -> list[list[int]]:
        import numpy as np

        from drivejepa.data.dataset import sibling_batches

        rng = np.random.default_rng([self.seed, epoch])
        return sibling_batches(self.groups, len(self.dataset), self.sibling_batch, rng)

    def set_position(self, epoch: int, skip: int = 0) -> None:
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        if self.sibling_batch:
            batches = self._batches(self.epoch)
            per_rank = self.num_samples // self.sibling_batch
            mine = [batches[(self.rank + r * self.num_replicas) % len(batches)] for r in range(per_rank)]
            indices = [i for b in mine for i in b]
        else:
            indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place and returned); identity in a single process."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` holds on every rank (used so that all ranks skip a non-finite step together)."""
    if not info.distributed:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() == 0.0


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (in rank order); ``[obj]`` in a single process."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
