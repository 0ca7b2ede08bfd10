"""Process-group plumbing for ``torchrun``: who am I, and the few collectives the stages need.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op, so the
single-process path carries no distributed code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device_kind: str) -> DistInfo:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, *values: float) -> list[float]:
    """Sum scalars over ranks (float64 so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_array(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped CPU tensors from every rank, rank order."""
    if not info.enabled:
        return t
    out = [torch.empty_like(t) for _ in range(info.world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """True on every rank if any rank says True (used to stop all ranks together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_value(info: DistInfo, value: float) -> float:
    """Rank 0's ``value`` on every rank (a decision all ranks must share)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def broadcast_object(info: DistInfo, value):
    """Rank 0's picklable ``value`` on every rank (e.g. a measured choice that all ranks must follow)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
