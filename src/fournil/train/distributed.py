"""Several processes, one model: ``torchrun --nproc_per_node=N -m fournil train ...``.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each process then trains a replica on its share of every batch and
DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPUs). Only rank 0 validates and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fournil.checkpoint import unique_state
from fournil.errors import FournilError


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
            gpus = torch.cuda.device_count()
            if self.local_rank >= gpus:
                raise FournilError(f"torchrun started more processes on this machine than it has GPUs ({gpus}): NCCL "
                                   f"needs a GPU per process; use --nproc_per_node={gpus}, or --device cpu to try it "
                                   f"on the CPU")
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


def shard(model: nn.Module) -> None:
    """FSDP: each block's weights, gradients and optimizer state are split across the processes and gathered only
    while that block computes, so a model too big for one device trains on several."""
    from torch.distributed.fsdp import fully_shard

    blocks = next(m for m in model.modules() if isinstance(m, nn.ModuleList))  # the repeated layers
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def tied_names(model: nn.Module) -> set[str]:
    """Second names of shared weights (an output layer tied to the embeddings): saved once, under the first."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def full_state(model: nn.Module, optimizer, sharded: bool) -> tuple[dict, dict]:
    """The whole model's and optimizer's state dicts. With FSDP every process must call this: the shards are
    gathered (to the CPU) from all of them."""
    if not sharded:
        return unique_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tied = tied_names(model)
    weights = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in tied}
    return weights, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer, weights: dict, optim: dict, sharded: bool) -> None:
    """Put back what ``full_state`` returned (read from a checkpoint): every process keeps its own shard."""
    if not sharded:
        model.load_state_dict(weights, strict=False)  # a tied weight comes under one of its names
        device = model.device
        optim["state"] = {pid: {k: v if k == "step" else v.to(device) for k, v in st.items()}
                          for pid, st in optim["state"].items()}
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)


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
