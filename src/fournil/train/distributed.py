"""Several processes, one model: ``torchrun --nproc_per_node=N -m fournil train ...``.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process then trains a replica on its share of every batch and
DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPUs). Only rank 0 validates and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """Each process of a multi-GPU run takes its own GPU."""
        if self.distributed and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a validation score, a clock), so all ranks decide alike."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.size
        return value


def join() -> World:
    """Join the process group torchrun describes, or run alone."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():  # share the cores between the processes on this machine
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return world


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
