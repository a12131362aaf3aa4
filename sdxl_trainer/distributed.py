"""Process-group setup from the launcher's environment (torchrun or accelerate launch), or a single process.

NCCL on GPUs (with gloo alongside for CPU tensors), gloo on CPU. Without a launcher the trainer still
runs: a one-process group over an in-memory store, so FSDP2 and torch.distributed.checkpoint work the same.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    device: torch.device
    backend: str

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(timeout_minutes: float = 60.0, use_gpu: bool | None = None) -> DistInfo:
    """Join (or create) the default process group and pick this process's device."""
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    # torchrun sets LOCAL_WORLD_SIZE and GROUP_RANK; accelerate launch goes through torchrun as well.
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    node_rank = _env_int("GROUP_RANK", rank // max(local_world_size, 1))
    if world_size % local_world_size:
        raise RuntimeError(f"WORLD_SIZE {world_size} is not a multiple of LOCAL_WORLD_SIZE {local_world_size}")
    num_nodes = world_size // local_world_size
    if use_gpu:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ and world_size >= 1 and "RANK" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # plain `python sdxl_fsdp_train.py`: one process, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, local_world_size, node_rank, num_nodes, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather_floats(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Gather a small vector from every rank: returns (world_size, len(values)) on `device`."""
    local = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    local = local.to(device=device, dtype=torch.float64)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.stack(out)


def broadcast_object(obj: object, src: int = 0) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same_on_all_ranks(value: str, what: str) -> None:
    """Raise on every rank if ranks disagree about a string (e.g. a hash of the item order)."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"ranks disagree about {what}: {gathered}")
