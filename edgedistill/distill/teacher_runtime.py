"""The teacher in the fastest runtime this device offers, chosen once by measurement.

The teacher is frozen and only its logits are used, so any runtime that gives the same logits may stand in
for it: a candidate is kept when its logits on a random batch differ from the plain eager teacher's by at most
``PARITY_ATOL`` times the largest eager |logit| when that exceeds 1 (fp32, max |Δ|; :mod:`edgedistill.base.parity`),
and the fastest kept candidate at the training batch size wins. Candidates:

* ``torch``: eval mode, conv + BN folded where the module can be traced (``torch.fx``), inference mode, in the
  memory layout (NCHW or channels_last) that measures faster (a runtime the recipe names runs in NCHW, so that
  nothing about it depends on a timing);
* ``onnxruntime``: the teacher's own ONNX file, or the teacher exported to ONNX once (``teacher.onnx`` in the
  run folder), in ONNX Runtime with the process's torch thread count — on the CPU only, unless the teacher
  exists only as ONNX;
* ``compile``: ``torch.compile`` of the folded module (in ``auto`` on CUDA only: on the CPU its minute of
  compilation rarely pays for a frozen network that ONNX Runtime already runs well).

The choice is a record (:func:`choose_runtime` returns it; the teacher stage writes it into ``teacher.json``)
from which :func:`build_runtime` rebuilds the same runtime without measuring again.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgedistill.base.devices import synchronizer
from edgedistill.base.errors import InputError, first_line
from edgedistill.base.parity import describe, tolerance, within
from edgedistill.base.timing import interleaved
from edgedistill.models.teachers import OnnxTeacher

PARITY_ATOL = 1e-4
WARMUP, REPEATS = 1, 5  # untimed calls after the parity call, and timed rounds


@dataclass(frozen=True)
class Measured:
    """One candidate's figures: median seconds per batch, max |logit − eager logit|, or why it was not usable."""

    name: str
    channels_last: bool
    seconds: float | None = None
    max_abs_diff: float | None = None
    problem: str | None = None

    def usable(self, atol: float, logit_scale: float) -> bool:
        return self.problem is None and within(self.max_abs_diff, atol, logit_scale)

    def to_dict(self) -> dict:
        return {"runtime": self.name, "channels_last": self.channels_last, "ms_per_batch": None if self.seconds is None else 1e3 * self.seconds,
                "max_abs_diff": self.max_abs_diff, "problem": self.problem}


def pick(measured: list[Measured], logit_scale: float, atol: float = PARITY_ATOL) -> Measured:
    """The fastest candidate whose logits match the eager teacher's (largest |logit|: ``logit_scale``) within
    :func:`edgedistill.base.parity.tolerance`; InputError when none does."""
    usable = [m for m in measured if m.usable(atol, logit_scale)]
    if not usable:
        why = "; ".join(f"{m.name}: {m.problem or f'max |Δ| {m.max_abs_diff:.3g} > {describe(atol, logit_scale)}'}" for m in measured)
        raise InputError(f"teacher.runtime: no runtime reproduces the teacher's logits ({why})")
    return min(usable, key=lambda m: m.seconds)


def candidates(wanted: str, device: torch.device, onnx_only: bool) -> list[tuple[str, bool]]:
    """(runtime, channels_last) pairs to measure for ``teacher.runtime: wanted`` on ``device``."""
    if onnx_only:
        return [("onnxruntime", False)]
    if wanted != "auto":  # a named runtime is a fixed one, in NCHW: nothing about it depends on a timing
        return [(wanted, False)]
    names = ["torch", "compile"] if device.type == "cuda" else ["torch", "onnxruntime"]
    return [(n, cl) for n in names for cl in ((False, True) if n != "onnxruntime" else (False,))]


def choose_runtime(net: nn.Module, *, wanted: str, device: torch.device, batch: int, image_size: int, onnx_path: Path | None,
                   export_to: Path, clock: Callable[[], float] = time.perf_counter) -> tuple[nn.Module, dict]:
    """Measure the candidates on one random batch of the training batch size; return the fastest faithful
    runtime and its record (see :func:`build_runtime`). ``onnx_path``: the teacher's own ONNX file, if it is one
    (then ``net`` already runs it); ``export_to``: where a torch teacher's ONNX export goes when it is a candidate."""
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = net(x).float()
    t_start = clock()
    listed, problems, modules, diffs = candidates(wanted, device, onnx_only=onnx_path is not None), {}, {}, {}
    for name, cl in listed:
        record = {"runtime": name, "channels_last": cl, "onnx": str(onnx_path or export_to) if name == "onnxruntime" else None,
                  "teacher_file": onnx_path is not None}
        try:
            if name == "onnxruntime" and onnx_path is None:
                _export_teacher(net, export_to, image_size)
            module = build_runtime(net, record, device)
            with torch.no_grad():  # the first call compiles what compiles lazily: a failure there rules the runtime out too
                diffs[(name, cl)] = float((module(x).float() - reference).abs().max())
        except Exception as e:  # noqa: BLE001 - a runtime that cannot run this teacher (export, compile) is not a candidate
            problems[(name, cl)] = first_line(e, 200)
            continue
        modules[(name, cl)] = (module, record)
    with torch.no_grad():  # in turns, so that a stall of the machine does not favour one runtime
        seconds = interleaved({k: (lambda m=m: m(x)) for k, (m, _) in modules.items()}, rounds=REPEATS, warmup=WARMUP,
                              clock=clock, sync=synchronizer(device))
    measured = [Measured(n, cl, problem=problems[(n, cl)]) if (n, cl) in problems else
                Measured(n, cl, statistics.median(seconds[(n, cl)]), diffs[(n, cl)])
                for n, cl in listed]
    logit_scale = float(reference.abs().max())
    best = pick(measured, logit_scale)
    module, record = modules[(best.name, best.channels_last)]
    record = {**record, "batch": batch, "device": str(device), "parity_atol": PARITY_ATOL, "logit_scale": logit_scale,
              "parity_tolerance": tolerance(PARITY_ATOL, logit_scale),
              "candidates": [m.to_dict() for m in measured], "choice_seconds": round(clock() - t_start, 2)}
    return module, record


def build_runtime(net: nn.Module, record: dict, device: torch.device) -> nn.Module:
    """The runtime a record names, around ``net`` (the frozen eager teacher on ``device``)."""
    name, cl = record["runtime"], bool(record.get("channels_last"))
    if name == "onnxruntime":
        if record.get("teacher_file"):  # the teacher is an ONNX file: ``net`` already runs it in ONNX Runtime
            return net
        path = Path(record["onnx"])
        if not path.is_file():
            raise InputError(f"{path}: the teacher's ONNX export is missing (re-run 'edgedistill teacher')")
        return OnnxTeacher(path, threads=torch.get_num_threads())
    fast = Frozen(_folded(net), cl).to(device)
    if name == "compile":
        fast.compile()
    return fast


class Frozen(nn.Module):
    """The eager teacher under ``inference_mode`` in one memory layout.

    Its output is cloned out of inference mode: the loss saves the teacher's logits for the backward pass,
    which an inference tensor may not be."""

    def __init__(self, net: nn.Module, channels_last: bool):
        super().__init__()
        self.net, self.channels_last = net, channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.net(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        return out.clone()


def _folded(net: nn.Module) -> nn.Module:
    """A copy of the eval-mode teacher with every conv → BN pair folded into one conv, where ``torch.fx`` can
    trace it (TorchScript and exported programs cannot be: they are used as they are)."""
    from torch.fx.experimental.optimization import fuse

    if isinstance(net, torch.jit.ScriptModule) or not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
        return net
    try:
        return fuse(copy.deepcopy(net).eval())
    except Exception:  # noqa: BLE001 - an untraceable forward (data-dependent control flow) runs unfolded
        return net


def _export_teacher(net: nn.Module, path: Path, image_size: int) -> None:
    from edgedistill.models.onnx_export import export_onnx

    try:
        export_onnx(net, path, image_size=image_size, metadata={"edgedistill_role": "teacher"})
    except InputError as e:
        raise InputError(f"the teacher cannot be exported to ONNX Runtime ({first_line(e, 200)})") from None
