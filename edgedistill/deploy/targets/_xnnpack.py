"""What the phone-runtime targets (ExecuTorch ``.pte`` and LiteRT ``.tflite``, both on XNNPACK) share: the batch-1
example they are traced with, PT2E int8 calibration, the metadata they carry and the runner validation feeds.

The batch is fixed to 1: it is what a phone app runs, and ExecuTorch plans its memory ahead of time for the largest
batch a dynamic axis allows (a program allows nothing else; probed: ``Dim("batch", max=4096)`` came out bounded
at 15 images). Validation therefore feeds these files image by image, like the ORT-format ``edge`` file.

int8 is PyTorch's PT2E flow, the one both runtimes document: ``torch.export`` → ``prepare_pt2e`` with the runtime's
quantizer (symmetric per-channel int8 weights, int8 activations) → calibration on the training images ONNX int8
uses (the same pick, ``export.int8.calibration.samples`` of them) → ``convert_pt2e``. Ranges come from the
quantizer's own observers; ``export.int8.calibration.method`` is ONNX Runtime's and does not apply here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Mapping

from edgedistill.base.errors import InputError, first_line
from edgedistill.base.fsio import atomic_path
from edgedistill.deploy.targets._base import BuildContext, Target, check_images
from edgedistill.data.transforms import hw
from edgedistill.base.console import quiet

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

BATCH = 1
CALIBRATION_BATCH = 32


def example(image_size, batch: int = BATCH) -> "torch.Tensor":
    """The fixed example input the programs are traced with (its values do not matter, its shape does)."""
    import torch

    h, w = hw(image_size)
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


def quantize_pt2e(net: "nn.Module", quantizer, calibration: "np.ndarray", file_name: str, *,
                  fold_quantize: bool = True) -> "torch.fx.GraphModule":
    """``net`` with int8 quantize / dequantize pairs whose ranges were calibrated on ``calibration``.

    Traced with a dynamic batch so that calibration runs in batches; the runtimes' converters re-trace the
    result at batch 1. ``fold_quantize``: store the weights as int8 constants (ExecuTorch) or keep them float
    behind their quantize op (what litert-torch's converter reads).
    """
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    calibration = check_images(calibration, "calibration images")
    batch = torch.export.Dim("batch", min=1, max=max(2, CALIBRATION_BATCH))
    try:
        with quiet():
            graph = torch.export.export(net, (example(calibration.shape[2:], 2),), dynamic_shapes=({0: batch},)).module()
            observed = prepare_pt2e(graph, quantizer)
            with torch.no_grad():
                for i in range(0, len(calibration), CALIBRATION_BATCH):
                    observed(torch.from_numpy(calibration[i:i + CALIBRATION_BATCH]))
            return convert_pt2e(observed, fold_quantize=fold_quantize)
    except Exception as e:  # noqa: BLE001 - a model the quantizer cannot trace is the user's model's problem
        raise InputError(f"{file_name}: int8 quantisation failed ({type(e).__name__}: {first_line(e)})") from None


def int8_settings(quantizer: str, n: int) -> dict:
    return {"flow": "PT2E static", "quantizer": quantizer, "weights": "int8 symmetric per channel",
            "activations": "int8 per tensor", "calibration": "the quantizer's observers", "calibration_samples": int(n)}


def file_metadata(metadata: Mapping[str, str], drop: tuple[str, ...] = (), **extra) -> dict[str, str]:
    """The run's metadata (see :func:`edgedistill.deploy.targets.onnx_metadata`) for a batch-1 phone file, less the keys
    in ``drop``, plus ``extra`` (values that are not strings are JSON)."""
    out = {k: str(v) for k, v in metadata.items() if k not in drop}
    out["batch"] = str(BATCH)
    out.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return out


class XnnpackTarget(Target):
    """A batch-1 file for a phone runtime on XNNPACK. ``build`` is shared: a prepared copy of the student (as the
    ONNX export prepares it), PT2E int8 when the variant has a ``quantizer``, the runtime's own conversion
    (``convert``), one atomic write. Subclasses set ``convert`` and, for int8, ``quantizer``."""

    deploy_to = ("edge",)
    quantizer_name = ""  # int8 variants: the quantizer, in export.json
    fold_quantize = True  # int8 weights stored as int8 constants (False: float behind their quantize op)

    def quantizer(self):
        """The PT2E quantizer of an int8 variant; ``None`` for fp32."""
        return None

    def check(self, ctx: BuildContext) -> None:
        if self.quantizer_name:
            if ctx.calibration_images is None:
                raise InputError(f"export.formats: {self.name} needs calibration images (none were given)")
            check_images(ctx.calibration_images, "calibration images", ctx.image_size)

    def convert(self, ctx: BuildContext, net: "nn.Module", quantizer, settings: dict) -> tuple[bytes, dict]:
        """The file's bytes and what export.json says of the conversion, for ``net`` (quantised by ``quantizer``
        with ``settings``, or float: ``None`` and ``{}``)."""
        raise NotImplementedError

    def build(self, ctx: BuildContext) -> dict:
        from edgedistill.models.onnx_export import export_copy

        path = ctx.out_dir / self.files[0]
        net, prep = export_copy(ctx.model, path.name)
        quantizer, settings = self.quantizer(), {}
        if quantizer is not None:
            calibration = ctx.calibration_images[: ctx.cfg.int8.calibration.samples]
            net = quantize_pt2e(net, quantizer, calibration, path.name, fold_quantize=self.fold_quantize)
            settings = int8_settings(self.quantizer_name, len(calibration))
        try:
            with quiet():
                content, info = self.convert(ctx, net, quantizer, settings)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - any converter failure is the user's model's problem
            raise InputError(f"{path.name}: {self.runtime_name} conversion failed ({type(e).__name__}: {first_line(e)})") from None
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
        return {"batch": BATCH, "prepared": prep, **info, **({"quantization": settings} if settings else {})}


class Batch1Runner:
    """Validation's runner over a batch-1 model: ``run_one`` maps one (1, 3, H, W) float32 image to (1, classes)."""

    def __init__(self, input_shape: tuple[int, ...], run_one: Callable[["np.ndarray"], "np.ndarray"]):
        self.input_shape, self.run_one = tuple(int(d) for d in input_shape), run_one

    def incompatible(self, chw) -> str | None:
        if self.input_shape[1:] != tuple(chw):
            return f"the model takes {list(self.input_shape)}, test images are {list(chw)}"
        return None

    def run(self, x: "np.ndarray", batch: int) -> "np.ndarray":
        import numpy as np

        del batch  # the file's batch is 1: images go one at a time, whatever the caller's batch
        return np.concatenate([self.run_one(np.ascontiguousarray(x[i:i + 1])) for i in range(len(x))]).astype(np.float32, copy=False)
