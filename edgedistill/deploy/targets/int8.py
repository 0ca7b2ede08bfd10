"""int8: static post-training quantisation of ``student.onnx`` with ONNX Runtime → ``student.int8.onnx``.

QDQ format, per-channel weights. Types: weights QInt8, symmetric, per channel (what ORT expects for QDQ
Conv/Gemm); activations QUInt8 (asymmetric), i.e. "U8S8". ORT's quantization guide names S8S8 + QDQ its
generic first choice, but on the CPU EP (x86-64, which is where validation runs) U8S8 is the combination
its MLAS kernels implement natively (u8 x s8, VNNI / VPMADDUBSW): measured on mobilenet_v3_small at 32 px,
S8S8 left the 24 depthwise convs in float behind Q/DQ pairs and ran 4x slower than U8S8 at the same
accuracy. Weights use 7 of their 8 bits (``reduce_range``): without VNNI (most AVX2 CPUs, and the machines
this was measured on) the u8 × s8 products overflow the 16-bit sums of VPMADDUBSW, and the quickstart student
lost 7 top-1 points at full range (97.7 → 90.4 %) against none at 7 bits (98.0 %), with the same kernels.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from edgedistill.base.errors import InputError
from edgedistill.deploy.targets._base import BuildContext, check_images, register
from edgedistill.base.console import quiet
from edgedistill.deploy.targets._onnx import OnnxTarget
from edgedistill.deploy.int8_fallback import Int8Fit, closest, judge
from edgedistill.models.onnx_export import INPUT_NAME, export_onnx, save_model, set_metadata

if TYPE_CHECKING:
    import numpy as np

INT8_ACTIVATION_TYPE = "QUInt8"
INT8_WEIGHT_TYPE = "QInt8"
ACTIVATION_TYPES = {"quint8": "QUInt8", "qint8": "QInt8"}
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # recipe → ORT name
ENTROPY_BINS = 2048  # histogram bins the entropy calibration searches its thresholds in (entropy_ranges)


@register
class Int8(OnnxTarget):
    """Static post-training quantisation calibrated on training images: a quarter of the fp32 size; whether it is
    faster depends on the CPU's integer kernels (VNNI on x86, dot-product on ARM)."""

    name = "int8"
    files = ("student.int8.onnx",)
    requires = ("fp32",)
    precision = "int8"
    weight_grid = (-64, 64)  # 7 bits (reduce_range): ONNX Runtime's reduced int8 range
    max_drop_key = "max_int8_drop"
    deploy_to = ("server", "edge")  # VNNI / AMX servers and ARM dot-product cores, NPUs and DSPs run int8

    def check(self, ctx: BuildContext) -> None:
        if ctx.calibration_images is None:
            raise InputError("export.formats: int8 needs calibration images (none were given)")
        check_images(ctx.calibration_images, "calibration images", ctx.image_size)

    def build(self, ctx: BuildContext) -> dict:
        cfg = ctx.cfg.int8
        calibration = ctx.calibration_images[: cfg.calibration.samples]
        out = ctx.out_dir / self.files[0]
        with tempfile.TemporaryDirectory(prefix="edgedistill-int8-") as td:
            alone, pre, last = Path(td) / "alone.onnx", Path(td) / "pre.onnx", {}
            source = ctx.file_of("fp32")
            if ctx.qat:  # the weights quantisation-aware training left: a float graph of their own to quantise
                source = Path(td) / "qat.onnx"
                export_onnx(ctx.int8_model, source, image_size=ctx.image_size, opset=ctx.cfg.opset, metadata=ctx.metadata)
            preprocess(source, pre)  # once: every build of the fallback search quantises this graph
            method, chosen_by = cfg.calibration.method, {}
            if method == "auto":
                method, chosen_by = self._calibration(ctx, source, pre, calibration, Path(td))

            def quantize(path: Path, **kw) -> dict:
                return {**quantize_int8(source, path, calibration, method, granularity=cfg.granularity,
                                        ranges_cache=Path(td) / f"ranges-{method}.json", preprocessed=pre, **kw), **chosen_by}

            def keeping(layers: frozenset[str]) -> "np.ndarray":
                last["settings"] = quantize(out, exclude=layers)  # the last build is the file that stays
                return held_out_logits(out, ctx.held_out)

            def only(layer: str) -> "np.ndarray":
                quantize(alone, only=layer)
                return held_out_logits(alone, ctx.held_out)

            if ctx.held_out is None:
                return quantize(out)
            fit = Int8Fit(quantisable_layers(pre), keeping, only, ctx.held_out_reference, ctx.held_out.labels)
            fitted = fit.run(ctx.max_int8_drop, cfg.fallback, cfg.sensitivity, ctx.progress)
        return {**last["settings"], "held_out": fitted}

    def _calibration(self, ctx: BuildContext, source: Path, pre: Path, calibration: "np.ndarray", td: Path) -> tuple[str, dict]:
        """``calibration.method: auto``: every method's file judged on the held-out images, the one closest to the
        float model kept (no method wins on every student: on CIFAR-100-real, entropy gained 2.2 and 3.0 points over
        minmax on MobileNetV3-small per channel and per tensor, and lost 1.2 and 0.5 on MobileNetV2 ×0.5, where
        minmax and percentile were best; benchmarks/bench_int8.py calibration). What export.json records under
        ``calibration_auto``. Without held-out images there is nothing to choose on: minmax, and the record says why."""
        if ctx.held_out is None:
            return "minmax", {"calibration_auto": {"chosen": "minmax", "why": "no held-out images to choose on"}}
        judged = {}
        for m in CALIBRATION_METHODS:
            quantize_int8(source, td / "candidate.onnx", calibration, m, granularity=ctx.cfg.int8.granularity,
                          ranges_cache=td / f"ranges-{m}.json", preprocessed=pre)
            judged[m] = judge(held_out_logits(td / "candidate.onnx", ctx.held_out), ctx.held_out_reference, ctx.held_out.labels)
        chosen = closest(judged)
        ctx.progress(f"{self.name}: calibration auto → {chosen} (held-out answers changed: "
                     + ", ".join(f"{m} {j.changed:.2f} %" for m, j in judged.items()) + ")")
        return chosen, {"calibration_auto": {"chosen": chosen, "judged": {m: j.to_dict() for m, j in judged.items()}}}

    def tolerance(self, cfg) -> float:
        return 2.0  # logits of O(10) move by ~0.5, at worst ~2, under 8-bit activations; the gate is on top-1


class ArrayReader:
    """An ORT CalibrationDataReader over an (N, 3, H, W) float32 array, in batches (duck-typed: ORT only
    calls ``get_next`` and ``rewind``)."""

    def __init__(self, array: "np.ndarray", batch_size: int, input_name: str = INPUT_NAME):
        self.array, self.batch_size, self.input_name = array, batch_size, input_name
        self._i = 0

    def get_next(self):
        import numpy as np

        if self._i >= len(self.array):
            return None
        batch = np.ascontiguousarray(self.array[self._i:self._i + self.batch_size], dtype=np.float32)
        self._i += self.batch_size
        return {self.input_name: batch}

    def rewind(self):
        self._i = 0

    def __iter__(self):
        return iter(self.get_next, None)

    def __len__(self):
        return -(-len(self.array) // self.batch_size)


def quantize_int8(fp32_path, out_path, calibration: "np.ndarray", method: str = "minmax", *, batch_size: int = 32,
                  activation_type: str | None = None, granularity: str = "per_channel", exclude: frozenset[str] = frozenset(),
                  only: str | None = None, ranges_cache: Path | None = None, preprocessed: Path | None = None) -> dict:
    """Static post-training int8 quantisation with ONNX Runtime (QDQ; weights per channel or per tensor).

    ``quant_pre_process`` (symbolic shape inference + ORT basic optimisation + ONNX shape inference)
    runs first, then ``quantize_static`` calibrated on ``calibration`` with MinMax, Entropy or
    Percentile ranges. The fp32 file's metadata is copied onto the output.
    ``activation_type``: "quint8" (default, see ``INT8_ACTIVATION_TYPE``) or "qint8".
    ``exclude``: nodes (of :func:`quantisable_layers`) kept in float; ``only``: the one node quantised, every other
    one in float (sensitivity). ``ranges_cache``: a file ORT keeps the calibrated ranges in, so that the builds of
    one file's fallback search calibrate once; ``preprocessed``: :func:`preprocess`'s output for ``fp32_path``, made
    once for them all.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise InputError(f"export.int8.calibration.method: '{method}' is not one of {', '.join(CALIBRATION_METHODS)}")
    act = INT8_ACTIVATION_TYPE if activation_type is None else ACTIVATION_TYPES.get(str(activation_type).lower())
    if act is None:
        raise InputError(f"int8 activation_type: '{activation_type}' is not one of {', '.join(ACTIVATION_TYPES)}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration = check_images(calibration, "calibration images")
    fp32 = onnx.load(str(fp32_path))
    per_channel = granularity == "per_channel"
    settings = {"format": "QDQ", "weights": INT8_WEIGHT_TYPE, "weight_bits": 7, "activations": act,
                "per_channel": per_channel, "calibration": method, **({"entropy_bins": ENTROPY_BINS} if method == "entropy" else {}),
                "calibration_samples": int(len(calibration)),
                **({"float_layers": sorted(exclude)} if exclude else {})}
    with tempfile.TemporaryDirectory(prefix="edgedistill-quant-") as td, quiet():
        pre, raw = preprocessed or preprocess(fp32_path, Path(td) / "preprocessed.onnx"), Path(td) / "quantized.onnx"
        reader = ArrayReader(calibration, batch_size, fp32.graph.input[0].name)
        if method == "entropy":
            ranges_cache = ranges_cache or Path(td) / "ranges.json"
            if not ranges_cache.is_file():
                entropy_ranges(pre, reader, ranges_cache)
        quantize_static(
            str(pre), str(raw), reader,
            quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=True,
            activation_type=getattr(QuantType, act), weight_type=getattr(QuantType, INT8_WEIGHT_TYPE),
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            nodes_to_exclude=sorted(exclude) or None, nodes_to_quantize=[only] if only is not None else None,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            calibration_cache_path=ranges_cache,
        )
        q = onnx.load(str(raw))
    set_metadata(q, {p.key: p.value for p in fp32.metadata_props})
    save_model(q, out_path, {"quantization": json.dumps(settings)})
    return settings


def entropy_ranges(preprocessed: Path, reader: ArrayReader, cache: Path) -> None:
    """ONNX Runtime's entropy (KL divergence) calibration over a 2048-bin histogram for 128 quantised bins (the
    setting of TensorRT's calibrator, which ORT's follows), written where ``quantize_static`` reads its ranges.
    ``quantize_static`` cannot pass a bin count and its default is 128 bins for 128 quantised bins: the search then
    has one candidate, the full range, and gave exactly MinMax's scales (measured: the same files, the same top-1 on
    three CIFAR-100-real students)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    with tempfile.TemporaryDirectory(prefix="edgedistill-entropy-") as td:
        calibrator = create_calibrator(preprocessed, sorted({*QDQRegistry, *QLinearOpsRegistry}),
                                       augmented_model_path=str(Path(td) / "augmented.onnx"), calibrate_method=CalibrationMethod.Entropy,
                                       extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128})
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)


def preprocess(fp32_path, out: Path) -> Path:
    """ORT's ``quant_pre_process`` (symbolic shape inference, basic graph optimisation, ONNX shape inference) → ``out``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with quiet():
        quant_pre_process(str(fp32_path), str(out), skip_symbolic_shape=False)
    return out


def quantisable_layers(preprocessed: Path) -> list[str]:
    """Every node ``quantize_int8`` quantises in the :func:`preprocess`-ed graph (the op types ONNX Runtime quantises by
    default: convolutions and matrix products, and the activations, additions, pools and reshapes between them), by
    name, in graph order: what sensitivity quantises one at a time and fallback keeps in float. A convolution kept in
    float with its ReLU quantised still has its output rounded to 8 bits, so both are candidates."""
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return [n.name for n in onnx.load(str(preprocessed)).graph.node if n.op_type in {*QDQRegistry, *QLinearOpsRegistry}]


def held_out_logits(path: Path, images) -> "np.ndarray":
    """ONNX Runtime's logits of ``path`` on ``images`` (a :class:`edgedistill.data.loading.TestImages`), chunk by chunk."""
    import numpy as np

    from edgedistill.deploy.targets._onnx import OrtRunner

    runner = OrtRunner.load(path, threads=0)  # ORT's default: every core
    return np.concatenate([runner.run(x, batch=len(x)) for x, _ in images.chunks()])
