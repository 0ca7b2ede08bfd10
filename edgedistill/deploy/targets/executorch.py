"""executorch / executorch_int8: the student as an ExecuTorch program lowered to XNNPACK → ``student.pte``,
``student.int8.pte`` (the runtime PyTorch-based Android and iOS apps ship). Needs ``pip install 'edgedistill[executorch]'``.

Path: ``torch.export`` at batch 1 → ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` →
``to_executorch()``; int8 first goes through PT2E with ``XNNPACKQuantizer`` (see :mod:`._xnnpack`). The program's
``forward`` takes one float32 (1, 3, H, W) tensor, RGB in [0, 1], and returns float32 logits (int8 included:
XNNPACK quantises inside). Operators XNNPACK does not take run in ExecuTorch's portable kernels; the info in
export.json counts the XNNPACK partitions and names the rest.

Metadata: one constant method per key of the run's metadata (``class_names``, ``input_size``, ``preprocessing``…),
each returning its string, ExecuTorch's own place for model constants (``Program.load_method(key).execute([])``,
``Module.execute(key)`` on the phone).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from edgedistill.deploy.targets._base import BuildContext, register
from edgedistill.deploy.targets._xnnpack import XNNPACK_MAX_REQUANTIZATION, Batch1Runner, XnnpackTarget, example, file_metadata

if TYPE_CHECKING:
    from torch import nn

METHOD = "forward"


@register
class ExecuTorch(XnnpackTarget):
    """The runtime of PyTorch-based Android / iOS apps (XNNPACK on ARM and x86), batch 1; gated on parity with PyTorch."""

    name = "executorch"
    files = ("student.pte",)
    packages = ("torch", "executorch.version")  # executorch is a namespace package: its version lives in .version
    extra = "executorch"
    format_name = "ExecuTorch program"
    runtime_name = "ExecuTorch"

    def convert(self, ctx: BuildContext, net: "nn.Module", quantizer, settings: dict) -> tuple[bytes, dict]:
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        # forward's one input and one output are positional: the ONNX tensor names would name nothing here
        meta = file_metadata(ctx.metadata, drop=("input_name", "output_name"), **({"quantization": settings} if settings else {}))
        with torch.no_grad():
            program = torch.export.export(net, (example(ctx.image_size),))
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=meta)
        lowering = _lowering(edge.exported_program(METHOD).graph_module)
        return edge.to_executorch().buffer, {"method": METHOD, "metadata_methods": sorted(meta), **lowering}

    def open(self, path: Path, threads: int) -> Batch1Runner:
        return open_program(path, threads)


@register
class ExecuTorchInt8(ExecuTorch):
    """A quarter of the fp32 size in ExecuTorch (static int8 on XNNPACK); ARM cores with int8 dot-product instructions
    run it faster than fp32, whatever an x86 machine measures."""

    name = "executorch_int8"
    files = ("student.int8.pte",)
    packages = ("torch", "torchao", "executorch.version")
    precision = "int8"
    weight_grid = (-127, 127)  # the PT2E quantizer's symmetric int8 weights
    max_drop_key = "max_int8_drop"
    quantizer_name = "XNNPACKQuantizer"
    max_requantization = XNNPACK_MAX_REQUANTIZATION  # beyond it, the program does not load

    def quantizer(self, per_channel: bool = True, qat: bool = False):
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat))

    def tolerance(self, cfg) -> float:
        return 2.0  # as ONNX int8: logits of O(10) move by ~0.5, at worst ~2; the gate is on top-1


def _lowering(graph_module) -> dict:
    """How many XNNPACK partitions the program has, and the operators left to the portable kernels."""
    calls = [n for n in graph_module.graph.nodes if n.op == "call_function"]
    names = [getattr(n.target, "__name__", str(n.target)) for n in calls]
    rest = Counter(x for x in names if x not in ("executorch_call_delegate", "getitem"))
    return {"xnnpack_partitions": names.count("executorch_call_delegate"), "not_delegated": dict(sorted(rest.items()))}


def open_program(path, threads: int) -> Batch1Runner:
    """A runner over the program's ``forward`` in the ExecuTorch runtime, on ``threads`` XNNPACK threads."""
    import torch
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    # The pybindings' one threadpool (what XNNPACK runs on) is process-wide; it defaults to every core.
    _unsafe_reset_threadpool(int(threads))
    method = Runtime.get().load_program(Path(path)).load_method(METHOD)
    shape = method.metadata.input_tensor_meta(0).sizes()

    def run_one(x1):
        return method.execute([torch.from_numpy(x1)])[0].numpy().copy()  # the output lives in the program's planned memory

    return Batch1Runner(shape, run_one)


def read_metadata(path) -> dict[str, str]:
    """The metadata a ``.pte`` file carries: every constant method that returns one string."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    out = {}
    for name in sorted(program.method_names - {METHOD}):
        value = program.load_method(name).execute([])
        if len(value) == 1 and isinstance(value[0], str):
            out[name] = value[0]
    return out
