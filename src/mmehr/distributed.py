"""Processes and threads: one place for torchrun's environment, the process group and torch threads.

Training and evaluation both run unchanged in one process or under `torchrun --nproc-per-node N`
(NCCL on GPUs, gloo on CPU); rank 0 writes outputs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place under torchrun (all defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        """Read RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun sets them."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        )

    @classmethod
    def setup(cls, use_cuda: bool, timeout_hours: float | None = None) -> Distributed:
        """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL with CUDA, else gloo."""
        d = cls.from_env()
        if d.enabled and not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(d.local_rank)
            timeout = datetime.timedelta(hours=timeout_hours) if timeout_hours else None
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        return d

    def all_sum(self, values: list[float], device: torch.device | str) -> list[float]:
        """Sum a few numbers over every process (identity in a single process)."""
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if self.enabled:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def set_threads(threads: int | None, local_world_size: int = 1) -> int:
    """Torch threads of this process: `threads` if > 0, else OMP_NUM_THREADS if set, else this process's
    share of the cores it may run on (cores / processes on this node). Returns the number set."""
    if not threads or threads <= 0:
        if os.environ.get("OMP_NUM_THREADS"):
            threads = int(os.environ["OMP_NUM_THREADS"])
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(1, cores // max(local_world_size, 1))
    torch.set_num_threads(threads)
    return threads
