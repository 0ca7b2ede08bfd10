"""litert / litert_int8: the student as a LiteRT (formerly TensorFlow Lite) flatbuffer → ``student.tflite``,
``student.int8.tflite`` (Google's on-device runtime; XNNPACK is its default CPU delegate). Needs
``pip install 'edgedistill[litert]'``.

Path: ``litert_torch.convert`` at batch 1, with the signature ``serving_default``: input ``input`` (float32
(1, 3, H, W), RGB in [0, 1], NCHW as in PyTorch) → output ``logits``. int8 goes through PT2E with litert-torch's
``PT2EQuantizer`` (see :mod:`._xnnpack`) and is converted fully quantised: its input and output tensors are int8,
``real = scale · (q − zero_point)`` with the tensor's quantisation parameters, which the runner applies (and the
app must too; the file's ``io_quantization`` metadata repeats them).

Metadata: one entry per key in the flatbuffer's ``Model.metadata`` (name → UTF-8 buffer), the container the converter
itself uses for ``min_runtime_version``; C++ reads them all with ``tflite::FlatBufferModel::ReadAllMetadata()``,
Python with :func:`read_metadata`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from edgedistill.deploy.targets._base import BuildContext, register
from edgedistill.deploy.targets._xnnpack import Batch1Runner, XnnpackTarget, example, file_metadata
from edgedistill.models.onnx_export import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

SIGNATURE = "serving_default"


@register
class LiteRT(XnnpackTarget):
    """Google's on-device runtime (LiteRT, formerly TFLite; XNNPACK on ARM and x86), batch 1; gated on parity with PyTorch."""

    name = "litert"
    files = ("student.tflite",)
    packages = ("torch", "litert_torch", "ai_edge_litert")
    extra = "litert"
    format_name = "LiteRT model"
    runtime_name = "LiteRT"

    def convert(self, ctx: BuildContext, net: "nn.Module", quantizer, settings: dict) -> tuple[bytes, dict]:
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        litert_torch.config.show_progress = False  # its progress lines go straight to the terminal
        quant_config = QuantConfig(pt2e_quantizer=quantizer) if quantizer is not None else None
        content = litert_torch.convert(_named(net), sample_kwargs={INPUT_NAME: example(ctx.image_size)},
                                       quant_config=quant_config).model_content()
        io = _io_quantization(content)
        extra = {"quantization": settings} if settings else {}
        if any(d["scale"] for d in io.values()):
            extra |= {"input_dtype": "int8", "io_quantization": io}
        return with_metadata(content, file_metadata(ctx.metadata, **extra)), {"signature": SIGNATURE, "io_quantization": io}

    def open(self, path: Path, threads: int) -> Batch1Runner:
        return open_model(path, threads)


@register
class LiteRTInt8(LiteRT):
    """A quarter of the fp32 size in LiteRT (static int8, int8 input and output); ARM cores with int8 dot-product
    instructions and NPUs run it faster than fp32, whatever an x86 machine measures."""

    name = "litert_int8"
    files = ("student.int8.tflite",)
    packages = ("torch", "torchao", "litert_torch", "ai_edge_litert")
    precision = "int8"
    weight_grid = (-127, 127)  # the PT2E quantizer's symmetric int8 weights
    max_drop_key = "max_int8_drop"
    quantizer_name = "litert_torch PT2EQuantizer"
    fold_quantize = False  # litert-torch's converter reads float weights behind their quantize op

    def quantizer(self, per_channel: bool = True, qat: bool = False):
        """None for ``qat``: litert-torch 0.10's QAT annotation hands torchao 0.18's pattern matcher a plain function
        where it takes a module, and fails on every convolution (QAT then simulates another target's scheme)."""
        if qat:
            return None
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config

        return PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))

    def tolerance(self, cfg) -> float:
        return 2.0  # as ONNX int8, plus the int8 output's step (the logits' range / 256)


def _named(net: "nn.Module") -> "nn.Module":
    """``net`` whose signature names its tensors as the ONNX files do: keyword ``input`` in, ``{"logits": …}`` out."""
    from torch import nn

    class Named(nn.Module):  # defined here: torch is imported only when a target is built
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, input):  # noqa: A002 - the keyword is the signature's input name
            return {OUTPUT_NAME: self.net(input)}

    return Named()


def _io_quantization(content: bytes) -> dict:
    """Scale and zero point of the input and output tensors (scale 0: float)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    out = {}
    for key, details in (("input", interpreter.get_input_details()[0]), ("output", interpreter.get_output_details()[0])):
        scale, zero_point = details["quantization"]
        out[key] = {"dtype": details["dtype"].__name__, "scale": float(scale), "zero_point": int(zero_point)}
    return out


def with_metadata(content: bytes, metadata: Mapping[str, str]) -> bytes:
    """``content`` with one ``Model.metadata`` entry per key (each pointing at a new buffer of the UTF-8 value)."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    model.metadata = model.metadata or []
    for key, value in metadata.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(str(value).encode(), dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = str(key), len(model.buffers) - 1
        model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(path) -> dict[str, str]:
    """Every ``Model.metadata`` entry of a ``.tflite`` file whose buffer is UTF-8 text (the converter's
    binary entries are left out)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(Path(path))
    out = {}
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        try:
            out[name] = bytes(model.buffers[entry.buffer].data).decode()
        except UnicodeDecodeError:
            continue
    return out


def open_model(path, threads: int) -> Batch1Runner:
    """A runner over the file in LiteRT's interpreter (XNNPACK delegate, ``threads`` threads); an int8 model's
    input is quantised and its output dequantised with the tensors' scale and zero point."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=int(threads))
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    (in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], out["quantization"]
    info = np.iinfo(inp["dtype"]) if in_scale else None

    def run_one(x1: "np.ndarray") -> "np.ndarray":
        if in_scale:
            x1 = np.clip(np.round(x1 / in_scale) + in_zero, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x1)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        return (y.astype(np.float32) - out_zero) * out_scale if out_scale else y

    return Batch1Runner(tuple(inp["shape"]), run_one)
