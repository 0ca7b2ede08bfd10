"""fp32: the PyTorch student as one self-contained ONNX file, ``student.onnx`` (the reference variant every other
target is compared with). How it is exported: :mod:`edgedistill.models.onnx_export`."""

from __future__ import annotations

from edgedistill.deploy.targets._base import BuildContext, register
from edgedistill.deploy.targets._onnx import OnnxTarget
from edgedistill.models.onnx_export import INPUT_NAME, NORMALIZATION_NOTE, OUTPUT_NAME, export_onnx


@register
class Fp32(OnnxTarget):
    name = "fp32"
    files = ("student.onnx",)
    packages = ("torch", "onnx", "onnxruntime")
    deploy_to = ("server", "edge")  # the reference: every ONNX Runtime build runs it

    def build(self, ctx: BuildContext) -> dict:
        info = export_onnx(ctx.model, ctx.out_dir / self.files[0], image_size=ctx.image_size, opset=ctx.cfg.opset,
                           metadata=ctx.metadata)
        ctx.summary.update({  # export.json's top level: the contract every ONNX file shares
            "exporter": info["exporter"],
            "opset": info["opset"],
            "input": {"name": INPUT_NAME, "shape": info["input_shape"], "dtype": "float32", "normalization": NORMALIZATION_NOTE},
            "output": {"name": OUTPUT_NAME, "shape": info["output_shape"]},
        })
        return info
