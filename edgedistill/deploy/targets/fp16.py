"""fp16: ``student.onnx`` with fp16 weights and compute, float32 input and output → ``student.fp16.onnx``."""

from __future__ import annotations

from pathlib import Path

from edgedistill.deploy.targets._base import BuildContext, register
from edgedistill.base.console import quiet
from edgedistill.deploy.targets._onnx import OnnxTarget
from edgedistill.models.onnx_export import save_model

PRECISION_NOTE = "fp16 weights and compute; float32 input and output"


@register
class Fp16(OnnxTarget):
    """Half the size of fp32; fast where the CPU or accelerator computes in fp16 (ARM, GPUs), slow elsewhere."""

    name = "fp16"
    files = ("student.fp16.onnx",)
    requires = ("fp32",)
    precision = "fp16"
    max_drop_key = "max_fp16_drop"
    deploy_to = ("edge",)  # x86 servers have few fp16 kernels; ARM cores, NPUs and mobile GPUs compute in fp16

    def build(self, ctx: BuildContext) -> dict:
        return convert_fp16(ctx.file_of("fp32"), ctx.out_dir / self.files[0])

    def tolerance(self, cfg) -> float:
        return 0.05  # 11-bit mantissa on logits of O(1–10)


def convert_fp16(fp32_path, out_path) -> dict:
    """fp16 weights and compute, float32 input and output (``keep_io_types``).

    Uses ONNX Runtime's ``convert_float_to_float16`` (ships with onnxruntime). Ops without fp16
    support stay in fp32 behind Cast nodes (the converter's default block list). The converter appends
    its boundary Cast nodes at the end of the node list; ORT's own graph sort puts them in order.
    Metadata is kept.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    with quiet():
        half = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True, disable_shape_infer=False)
    OnnxModel.graph_topological_sort(half.graph)
    save_model(half, out_path, {"precision": PRECISION_NOTE})
    return {"keep_io_types": True}
