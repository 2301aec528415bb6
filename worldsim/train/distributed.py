"""Multi-process training with torchrun (torch.distributed DDP); a no-op in a single process.

Launch: `torchrun --nproc_per_node=N -m worldsim.commands.train ...` (or
`python -m torch.distributed.run ...`). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT; `init_distributed` reads them. Backend: NCCL with one GPU per process on CUDA,
gloo on CPU (which is how the tests run DDP on a CPU-only machine).

Division of labour: every rank computes the loss on its own shard of windows (`WindowSampler`
with rank / world_size) and DDP averages the gradients, so all ranks hold identical weights.
Only rank 0 logs and writes checkpoints; it saves every rank's RNG states (gathered here) so a
resumed run continues each rank's random stream. A non-finite loss on any rank stops all ranks at
the same step (`all_finite`): a rank that stopped alone would leave the others hanging in the next
gradient all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        """True when a process group is up (world_size > 1)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> the local GPU if there is one, else the CPU; 'cuda' -> this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class TrainView:
    """The model as the loss function sees it: calls go through DDP (and torch.compile), attribute
    reads (`cfg`, `net`, `sigma_data`...) go to the bare model, which DDP does not forward."""

    def __init__(self, bare: nn.Module, call: nn.Module | Callable[..., Any]) -> None:
        self.bare = bare
        self.call = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bare, name)


def wrap_model(model: nn.Module, info: DistInfo, *, compile: bool = False) -> TrainView:
    """DDP around the bare model when there are several ranks, then torch.compile if asked.
    Keep the bare model for the optimizer, the EMA and checkpoints (wrapped names differ)."""
    call: Any = model
    if info.enabled:
        ids = [info.device.index] if info.device.type == "cuda" else None
        call = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if compile:
        call = torch.compile(call)
    return TrainView(model, call)


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a scalar over ranks (any NaN / inf on one rank makes the result non-finite)."""
    value = value.detach().float().reshape(1).clone()
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value[0]


def all_finite(value: torch.Tensor, info: DistInfo) -> bool:
    """True iff `value` is finite on every rank; every rank gets the same answer."""
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=value.device)
    if info.enabled:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0.0)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (in memory only; nothing is written)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's obj on every rank (e.g. the outcome of a step only rank 0 performed)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
