"""Where training runs and in what precision: the device a recipe's ``device`` names, the AMP policy for it, the
settings that need no measurement there, and how to wait for it before reading a clock."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from edgedistill.base.distributed import DistInfo
from edgedistill.base.errors import InputError


def select_device(spec: str, dist: DistInfo = DistInfo()) -> torch.device:
    """``auto`` → CUDA when present; under torchrun each rank takes its local GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device: '{spec}' was asked for but torch sees no CUDA device (use device: auto or cpu)")
        index = int(spec.split(":")[1]) if ":" in spec else dist.local_rank
        if index >= torch.cuda.device_count():
            raise InputError(f"device: '{spec}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What a timing waits on before it reads the clock: the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def preset(value: bool | str, device: torch.device) -> dict | None:
    """A ``channels_last`` / ``compile`` setting that needs no measurement, as ``{"use", "why"}``: as the recipe fixes
    it, or on for ``auto`` on CUDA (both pay there for mobile networks); None for ``auto`` on the CPU, which the plan
    measures. The one place that gives ``auto`` a meaning."""
    if value != "auto":
        return {"use": bool(value), "why": "set by the recipe"}
    return {"use": True, "why": "CUDA"} if device.type == "cuda" else None


@dataclass(frozen=True)
class Precision:
    """AMP policy: bf16 where the GPU supports it, else fp16 with a gradient scaler; fp32 on CPU."""

    dtype: torch.dtype | None
    device_type: str

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> "Precision":
        if not amp or device.type != "cuda":
            return cls(None, device.type)
        return cls(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16, device.type)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else nullcontext()

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
