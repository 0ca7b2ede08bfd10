"""PyTorch student → ONNX (fp32), plus int8 (static PTQ, QDQ) and fp16 variants and edge artifacts.

Every file is written through :func:`edgedistill.fsio.atomic_path`, so a run folder never holds a
half-written model. The exported graph takes float32 RGB in [0, 1], NCHW, named ``input`` (batch axis
dynamic) and returns ``logits``; the normalisation is inside the model (see :class:`edgedistill.models.Normalized`).

What happens to the model before export (on a private copy; the caller's model is never touched):

* eval mode, CPU, float32;
* in-place activations (``ReLU(inplace=True)``, ``Hardswish(inplace=True)``…) switched to out-of-place:
  the ONNX exporter then keeps ``aten.hardswish`` as one ``HardSwish`` node instead of decomposing
  the in-place op into clamp / where / mul, which is several seconds slower to trace and yields the same graph;
* every ``Conv2d`` directly followed by a ``BatchNorm2d`` inside a plain ``nn.Sequential`` is folded
  into one conv. The exporter's optimizer folds them anyway (the final graph holds no
  ``BatchNormalization``); folding first makes the dynamo export ~1.5x faster on a 2-core CPU.
  The folded model matches the original to ~1e-6 (checked by validation's parity gate).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from edgedistill.errors import InputError
from edgedistill.fsio import atomic_path, write_json

log = logging.getLogger("edgedistill")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 18
MAX_DYNAMIC_BATCH = 4096
NORMALIZATION_NOTE = "inside the model: feed RGB float32 in [0,1], NCHW"

VARIANT_FILES = {"fp32": "student.onnx", "int8": "student.int8.onnx", "fp16": "student.fp16.onnx"}
EDGE_B1_FILE = "student.b1.onnx"
EXPORT_SUMMARY_FILE = "export.json"

# int8 types. Weights: QInt8, symmetric, per channel (what ORT expects for QDQ Conv/Gemm).
# Activations: QUInt8 (asymmetric), i.e. "U8S8". ORT's quantization guide names S8S8 + QDQ its generic
# first choice, but on the CPU EP (x86-64, which is where validation runs) U8S8 is the combination its
# MLAS kernels implement natively (u8 x s8, VNNI / VPMADDUBSW): measured on mobilenet_v3_small at 32 px,
# S8S8 left the 24 depthwise convs in float behind Q/DQ pairs and ran 4x slower than U8S8 at the same
# accuracy. On pre-VNNI AVX2/AVX-512 CPUs U8S8 can saturate; pass activation_type="qint8" (or compare
# with benchmarks/bench_export.py) if the int8 gate fails there or for ARM targets.
INT8_ACTIVATION_TYPE = "QUInt8"
INT8_WEIGHT_TYPE = "QInt8"
_ACTIVATION_TYPES = {"quint8": "QUInt8", "qint8": "QInt8"}


# ---------------------------------------------------------------- metadata


def onnx_metadata(class_names: Sequence[str], image_size, mean, std, recipe_digest: str) -> dict[str, str]:
    """The ``metadata_props`` every exported file carries (all values are strings; lists are JSON)."""
    from edgedistill import __version__

    h, w = _hw(image_size)
    return {
        "class_names": json.dumps([str(c) for c in class_names]),
        "num_classes": str(len(class_names)),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": json.dumps([3, h, w]),
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_range": "[0, 1]",
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "normalization": NORMALIZATION_NOTE,
        "recipe_digest": str(recipe_digest),
        "edgedistill_version": __version__,
    }


def read_metadata(path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a dict (weights are not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    merged = {p.key: p.value for p in model.metadata_props}
    merged.update({str(k): str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in merged.items():
        model.metadata_props.add(key=k, value=v)


# ---------------------------------------------------------------- fp32 export


def export_onnx(
    model: nn.Module,
    path,
    *,
    image_size,
    opset: int = 18,
    metadata: Mapping[str, str],
    dynamic_batch: bool = True,
) -> dict:
    """Export ``model`` to one self-contained ONNX file at ``path``; return an info dict.

    Uses the dynamo exporter (``torch.onnx.export(dynamo=True)``); only if it raises, the
    TorchScript exporter is tried, with a warning, and the info records ``exporter`` and
    ``fallback_reason``. The file is checked (``full_check``) and shape-inferred (strict) before it
    replaces ``path``.
    """
    if opset < MIN_OPSET:
        raise InputError(f"export.opset: {opset} is too old; the exporter needs opset >= {MIN_OPSET}")
    path = Path(path)
    h, w = _hw(image_size)
    t0 = time.perf_counter()
    info: dict = {"path": path.name, "exporter": "dynamo", "fallback_reason": None, "opset": opset,
                  "dynamic_batch": dynamic_batch}
    with _export_copy(model) as (net, prepared):
        info["prepared"] = prepared
        # batch 2, not 1: a size-1 example would let torch.export specialise the batch dimension.
        example = torch.rand(2 if dynamic_batch else 1, 3, h, w, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="edgedistill-export-") as td:
            raw = Path(td) / "model.onnx"
            try:
                _export_dynamo(net, example, raw, opset, dynamic_batch)
            except Exception as e:  # noqa: BLE001 - any exporter failure triggers the documented fallback
                reason = f"{type(e).__name__}: {_first_line(e)}"
                log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", reason)
                info["exporter"], info["fallback_reason"] = "torchscript", reason
                for f in Path(td).iterdir():
                    f.unlink()
                try:
                    _export_torchscript(net, example, raw, opset, dynamic_batch)
                except Exception as e2:  # noqa: BLE001
                    raise InputError(
                        f"{path.name}: ONNX export failed with both exporters (dynamo: {reason}; "
                        f"torchscript: {type(e2).__name__}: {_first_line(e2)})"
                    ) from None
            proto = onnx.load(str(raw), load_external_data=True)  # pulls in any external data file
        proto = _finalize(proto, metadata, path.name)
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp), save_as_external_data=False)
    info.update(_describe(proto, path))
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _export_dynamo(net: nn.Module, example: torch.Tensor, out: Path, opset: int, dynamic_batch: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic_batch else None
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
            report=False,
        )
        if program is None:
            raise RuntimeError("the dynamo exporter returned no program")
        program.save(str(out))  # may write external data for huge models; export_onnx re-saves as one file
    if sink.getvalue().strip():
        log.debug("dynamo exporter output:\n%s", sink.getvalue())


def _export_torchscript(net: nn.Module, example: torch.Tensor, out: Path, opset: int, dynamic_batch: bool) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _finalize(proto: onnx.ModelProto, metadata: Mapping[str, str], name: str) -> onnx.ModelProto:
    """Metadata, producer, full checker and strict shape inference; returns the inferred model."""
    _set_metadata(proto, metadata)
    from edgedistill import __version__

    proto.producer_name, proto.producer_version = "edgedistill", __version__
    proto.doc_string = f"edgedistill student; input '{INPUT_NAME}': {NORMALIZATION_NOTE}; output '{OUTPUT_NAME}'"
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{name}: the exported ONNX graph does not pass the ONNX checker ({_first_line(e)})") from None
    names_in = [i.name for i in inferred.graph.input]
    names_out = [o.name for o in inferred.graph.output]
    if names_in != [INPUT_NAME] or names_out != [OUTPUT_NAME]:
        raise InputError(f"{name}: expected one input '{INPUT_NAME}' and one output '{OUTPUT_NAME}', got {names_in} → {names_out}")
    return inferred


def _describe(proto: onnx.ModelProto, path: Path) -> dict:
    return {
        "input_shape": _shape(proto.graph.input[0]),
        "output_shape": _shape(proto.graph.output[0]),
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "nodes": len(proto.graph.node),
        "op_types": dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        "size_bytes": path.stat().st_size,
        "sha256": _sha256(path),
    }


def _shape(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


@contextlib.contextmanager
def _export_copy(model: nn.Module) -> Iterator[tuple[nn.Module, dict]]:
    """A CPU / eval / float32 copy of ``model`` ready to export; the caller's model is never modified.

    If the model cannot be deep-copied, it is used in place and its device, dtype and train/eval
    flags are restored afterwards.
    """
    try:
        net = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001
        log.debug("deepcopy failed (%s); exporting in place and restoring the model afterwards", _first_line(e))
        net = None
    if net is not None:
        net = net.cpu().float().eval()
        prepared = {"inplace_disabled": _disable_inplace(net), "conv_bn_folded": _fold_conv_bn(net)}
        yield net, prepared
        return
    modes = {m: m.training for m in model.modules()}
    first = next(iter(model.parameters()), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    try:
        yield model.cpu().float().eval(), {"inplace_disabled": 0, "conv_bn_folded": 0}
    finally:
        model.to(device=device, dtype=dtype)
        for m, mode in modes.items():
            m.training = mode


def eval_copy(model: nn.Module) -> nn.Module:
    """A CPU, float32, eval-mode deep copy (the reference validation compares against)."""
    return copy.deepcopy(model).cpu().float().eval()


def _disable_inplace(net: nn.Module) -> int:
    n = 0
    for m in net.modules():
        if isinstance(getattr(m, "inplace", None), bool) and m.inplace:
            m.inplace = False
            n += 1
    return n


def _fold_conv_bn(net: nn.Module) -> int:
    """Fold Conv2d → BatchNorm2d pairs that sit next to each other in a plain ``nn.Sequential``."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    n = 0
    for seq in list(net.modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
                    and bn.running_mean is not None and conv.out_channels == bn.num_features
                    and not conv.training and not bn.training):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
                n += 1
    return n


# ---------------------------------------------------------------- int8


class _ArrayReader:
    """An ORT CalibrationDataReader over an (N, 3, H, W) float32 array, in batches."""

    def __init__(self, array: np.ndarray, batch_size: int, input_name: str = INPUT_NAME):
        self.array, self.batch_size, self.input_name = array, batch_size, input_name
        self._i = 0

    def get_next(self):
        if self._i >= len(self.array):
            return None
        batch = np.ascontiguousarray(self.array[self._i:self._i + self.batch_size], dtype=np.float32)
        self._i += self.batch_size
        return {self.input_name: batch}

    def rewind(self):
        self._i = 0

    def __len__(self):
        return -(-len(self.array) // self.batch_size)


def _reader_class():
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(_ArrayReader, CalibrationDataReader):
        pass

    return ArrayReader


def check_images(x, what: str, image_size=None) -> np.ndarray:
    """(N, 3, H, W) float32 in [0, 1], or an InputError naming ``what``."""
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != 3 or len(x) == 0:
        shape = getattr(x, "shape", None)
        raise InputError(f"{what}: expected a non-empty (N, 3, H, W) float32 array, got {type(x).__name__} {shape}")
    if image_size is not None and tuple(x.shape[2:]) != _hw(image_size):
        raise InputError(f"{what}: images are {x.shape[2]}x{x.shape[3]}, the model takes {_hw(image_size)[0]}x{_hw(image_size)[1]}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(f"{what}: pixel values span [{lo:.3g}, {hi:.3g}]; the model takes RGB in [0, 1] (normalisation is inside it)")
    return x


def quantize_int8(
    fp32_path,
    out_path,
    calibration: np.ndarray,
    method: str = "minmax",
    *,
    batch_size: int = 32,
    activation_type: str | None = None,
) -> dict:
    """Static post-training int8 quantisation with ONNX Runtime (QDQ, per-channel weights).

    ``quant_pre_process`` (symbolic shape inference + ORT basic optimisation + ONNX shape inference)
    runs first, then ``quantize_static`` calibrated on ``calibration`` with MinMax, Entropy or
    Percentile ranges. The fp32 file's metadata is copied onto the output.
    ``activation_type``: "quint8" (default, see ``INT8_ACTIVATION_TYPE``) or "qint8".
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise InputError(f"export.calibration.method: '{method}' is not one of {', '.join(methods)}")
    act = INT8_ACTIVATION_TYPE if activation_type is None else _ACTIVATION_TYPES.get(str(activation_type).lower())
    if act is None:
        raise InputError(f"int8 activation_type: '{activation_type}' is not one of {', '.join(_ACTIVATION_TYPES)}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibration = check_images(calibration, "calibration images")
    t0 = time.perf_counter()
    fp32 = onnx.load(str(fp32_path))
    input_name = fp32.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="edgedistill-quant-") as td:
        pre = Path(td) / "preprocessed.onnx"
        with _quiet():
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        reader = _reader_class()(calibration, batch_size, input_name)
        with atomic_path(out_path) as tmp, _quiet():
            quantize_static(
                str(pre),
                str(tmp),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,
                activation_type=getattr(QuantType, act),
                weight_type=getattr(QuantType, INT8_WEIGHT_TYPE),
                calibrate_method=methods[method],
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
            q = onnx.load(str(tmp))
            meta = {p.key: p.value for p in fp32.metadata_props}
            meta["quantization"] = json.dumps({
                "format": "QDQ", "weights": INT8_WEIGHT_TYPE, "activations": act,
                "per_channel": True, "calibration": method, "calibration_samples": int(len(calibration)),
            })
            _set_metadata(q, meta)
            q.producer_name = "edgedistill"
            onnx.checker.check_model(q)
            onnx.save(q, str(tmp), save_as_external_data=False)
    return {
        "path": out_path.name, "format": "QDQ", "per_channel": True, "weights": INT8_WEIGHT_TYPE,
        "activations": act, "calibration": method, "calibration_samples": int(len(calibration)),
        "size_bytes": out_path.stat().st_size, "sha256": _sha256(out_path),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def class_balanced_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices into ``labels``, round-robin over the classes (seeded), for calibration.

    Each class's indices are shuffled; rounds take one index from every class that still has
    one, in a seeded class order, until ``n`` are chosen (all indices when ``n >= len(labels)``).
    """
    labels = np.asarray(labels).reshape(-1)
    if n <= 0 or len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    order = rng.permutation(len(classes))
    depth = max(len(p) for p in pools)
    chosen: list[int] = []
    for r in range(depth):
        for ci in order:
            if r < len(pools[ci]):
                chosen.append(int(pools[ci][r]))
                if len(chosen) == n:
                    return np.asarray(chosen, dtype=np.int64)
    return np.asarray(chosen, dtype=np.int64)


# ---------------------------------------------------------------- fp16


def convert_fp16(fp32_path, out_path) -> dict:
    """fp16 weights and compute, float32 input and output (``keep_io_types``).

    Uses ``onnxruntime.transformers.float16.convert_float_to_float16`` (ships with onnxruntime;
    no onnxconverter_common needed). Ops without fp16 support stay in fp32 behind Cast nodes
    (the converter's default block list). Metadata is kept.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    t0 = time.perf_counter()
    model = onnx.load(str(fp32_path))
    meta = {p.key: p.value for p in model.metadata_props}
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _toposort(half.graph)  # the converter appends its boundary Cast nodes at the end of the node list
    meta["precision"] = "fp16 weights and compute; float32 input and output"
    _set_metadata(half, meta)
    half.producer_name = "edgedistill"
    onnx.checker.check_model(half)
    with atomic_path(out_path) as tmp:
        onnx.save(half, str(tmp), save_as_external_data=False)
    return {"path": out_path.name, "size_bytes": out_path.stat().st_size, "sha256": _sha256(out_path),
            "keep_io_types": True, "seconds": round(time.perf_counter() - t0, 2)}


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically (stable: keeps the original order where it is valid)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise InputError("fp16 conversion produced a graph with a cycle or a dangling input "
                             f"(e.g. node '{rest[0].name}')")
        pending = rest
    copies = [copy.deepcopy(n) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


# ---------------------------------------------------------------- edge


def export_edge(fp32_path, out_dir, image_size) -> dict:
    """Batch-1 model, its ORT-format (``.ort``) file and the NNAPI / CoreML usability summary.

    Writes ``student.b1.onnx``, ``student.b1.ort`` and ``student.b1.required_operators.config``
    (for a minimal ORT build) into ``out_dir``.
    """
    fp32_path, out_dir = Path(fp32_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h, w = _hw(image_size)
    t0 = time.perf_counter()
    b1_path = out_dir / EDGE_B1_FILE
    make_batch_fixed(fp32_path, b1_path, (1, 3, h, w))

    ort_info = convert_to_ort(b1_path, out_dir)
    try:
        usability = mobile_usability(b1_path)
    except Exception as e:  # noqa: BLE001 - the summary is advisory; the artifacts above are what matter
        log.warning("ORT mobile usability check failed on %s (%s)", b1_path.name, _first_line(e))
        usability = {"error": _first_line(e)}
    return {
        "b1_onnx": b1_path.name,
        "b1_size_bytes": b1_path.stat().st_size,
        **ort_info,
        "usability": usability,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def make_batch_fixed(src, dst, shape: Sequence[int]) -> None:
    """Copy of ``src`` whose input has the fixed ``shape`` (output shapes re-inferred)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(src))
    make_input_shape_fixed(model.graph, model.graph.input[0].name, list(shape))
    fix_output_shapes(model)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    meta["batch"] = str(shape[0])
    _set_metadata(model, meta)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp), save_as_external_data=False)


def convert_to_ort(onnx_path, out_dir) -> dict:
    """ONNX → ORT format via onnxruntime.tools.convert_onnx_models_to_ort (fixed optimisations).

    Runs into a temp folder and copies the ``.ort`` file and the required-operators config into
    ``out_dir`` atomically, so neither is ever half-written there.
    """
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="edgedistill-ort-") as td:
        sink = io.StringIO()
        try:
            with _ort_tool_logging() as tool_loggers, contextlib.redirect_stdout(sink):
                from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

                for lg in tool_loggers:  # the tool sets DEBUG on import
                    lg.setLevel(logging.WARNING)
                convert_onnx_models_to_ort(onnx_path, output_dir=Path(td), optimization_styles=[OptimizationStyle.Fixed])
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{onnx_path.name}: conversion to ORT format failed ({_first_line(e)})") from None
        made = sorted(Path(td).rglob("*"))
        ort_files = [p for p in made if p.suffix == ".ort"]
        configs = [p for p in made if p.name.endswith(".config")]
        if not ort_files:
            raise InputError(f"{onnx_path.name}: conversion to ORT format produced no .ort file ({sink.getvalue().strip()[-200:]})")
        ort_dst = out_dir / (onnx_path.stem + ".ort")
        cfg_dst = out_dir / (onnx_path.stem + ".required_operators.config")
        _move_atomic(ort_files[0], ort_dst)
        if configs:
            _move_atomic(configs[0], cfg_dst)
    return {
        "ort": ort_dst.name,
        "ort_size_bytes": ort_dst.stat().st_size,
        "required_operators_config": cfg_dst.name if cfg_dst.exists() else None,
    }


@contextlib.contextmanager
def _ort_tool_logging():
    """ORT's tools call ``logging.basicConfig`` on import and log at INFO: keep both out of our logging."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)  # basicConfig() is a no-op while root has a handler
    tool_loggers = [logging.getLogger(n) for n in ("ort_format_model.utils", "check_usability", "usability_checker")]
    try:
        yield tool_loggers
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        for lg in tool_loggers:
            lg.setLevel(logging.WARNING)


def _move_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def mobile_usability(onnx_path) -> dict:
    """How much of the model ORT Mobile's NNAPI (Android) and CoreML (iOS) EPs could take.

    Uses the functions behind ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``
    (the model is first optimised to ORT's basic level, as that tool does). Falls back to running the
    tool's analysis with a captured logger and parsing its lines if those functions moved.
    """
    onnx_path = Path(onnx_path)
    with _ort_tool_logging():
        try:
            return _usability_direct(onnx_path)
        except (ImportError, AttributeError, TypeError) as e:
            log.debug("usability checker API changed (%s); parsing its log instead", _first_line(e))
            return _usability_from_log(onnx_path)


def _usability_direct(onnx_path: Path) -> dict:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory(prefix="edgedistill-usability-") as td:
        opt = Path(td) / onnx_path.name
        optimize_model(onnx_path, opt)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(opt)), strict_mode=True)
    checks = {
        "nnapi": lambda m: uc.check_nnapi_partitions(m, require_fixed_input_sizes=True),
        "coreml_mlprogram": lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_mlprogram_ops.md"),
        "coreml_neuralnetwork": lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_neuralnetwork_ops.md"),
    }
    out = {}
    for name, check in checks.items():
        info = check(model)
        out[name] = {
            "nodes": int(info.num_nodes),
            "supported_nodes": int(info.num_supported_nodes),
            "partitions": int(info.num_partitions),
            "unsupported_ops": sorted(info.unsupported_ops),
            "suitability": info.suitability().name,
        }
    return out


_USABILITY_LINE = r"(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+?) EP"


def _usability_from_log(onnx_path: Path) -> dict:
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("edgedistill.usability")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = _Keep()
    logger.addHandler(handler)
    try:
        uc.analyze_model(onnx_path, skip_optimize=False, logger=logger)
    finally:
        logger.removeHandler(handler)
    return parse_usability_log("\n".join(records))


def parse_usability_log(text: str) -> dict:
    """Parse the checker's 'N partitions with a total of S/T nodes can be handled by the X EP' lines.

    The first line per EP is the as-is (fixed shape) analysis, which is what a batch-1 model gets.
    """
    import re

    names = {"NNAPI": "nnapi", "CoreML MLProgram": "coreml_mlprogram", "CoreML NeuralNetwork": "coreml_neuralnetwork"}
    out: dict = {}
    for m in re.finditer(_USABILITY_LINE, text):
        key = names.get(m.group(4), m.group(4).lower().replace(" ", "_"))
        out.setdefault(key, {"nodes": int(m.group(3)), "supported_nodes": int(m.group(2)),
                             "partitions": int(m.group(1))})
    return out


# ---------------------------------------------------------------- all variants


def export_variants(
    model: nn.Module,
    out_dir,
    cfg,
    *,
    image_size,
    calibration_images: np.ndarray | None,
    metadata: Mapping[str, str],
) -> dict[str, Path]:
    """Write ``student.onnx`` and the variants ``cfg.formats`` asks for (+ edge artifacts), and ``export.json``.

    ``cfg`` is an :class:`edgedistill.recipe.ExportConfig`. ``calibration_images`` (N, 3, H, W) float32
    in [0, 1] is needed for int8; at most ``cfg.calibration.samples`` of them are used (pick them with
    :func:`class_balanced_sample`). Returns ``{variant: path}`` for the ONNX variants.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if "int8" in cfg.formats:
        if calibration_images is None:
            raise InputError("export.formats: int8 needs calibration images (none were given)")
        calibration_images = check_images(calibration_images, "calibration images", image_size)[: cfg.calibration.samples]

    paths: dict[str, Path] = {"fp32": out_dir / VARIANT_FILES["fp32"]}
    fp32_info = export_onnx(model, paths["fp32"], image_size=image_size, opset=cfg.opset, metadata=metadata)
    summary: dict = {
        "exporter": fp32_info["exporter"],
        "fallback_reason": fp32_info["fallback_reason"],
        "opset": fp32_info["opset"],
        "input": {"name": INPUT_NAME, "shape": fp32_info["input_shape"], "dtype": "float32",
                  "normalization": NORMALIZATION_NOTE},
        "output": {"name": OUTPUT_NAME, "shape": fp32_info["output_shape"]},
        "versions": _versions(),
        "variants": {"fp32": fp32_info},
    }
    if "int8" in cfg.formats:
        paths["int8"] = out_dir / VARIANT_FILES["int8"]
        summary["variants"]["int8"] = quantize_int8(paths["fp32"], paths["int8"], calibration_images, cfg.calibration.method)
    if "fp16" in cfg.formats:
        paths["fp16"] = out_dir / VARIANT_FILES["fp16"]
        summary["variants"]["fp16"] = convert_fp16(paths["fp32"], paths["fp16"])
    if cfg.edge:
        summary["edge"] = export_edge(paths["fp32"], out_dir, image_size)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out_dir / EXPORT_SUMMARY_FILE, summary)
    return paths


# ---------------------------------------------------------------- helpers


def _hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise InputError(f"image_size: expected an int or (height, width), got {image_size}")
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnxruntime

    from edgedistill import __version__

    return {"edgedistill": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _quiet():
    """Keep ORT tools' prints and INFO logging out of the CLI's output (they go to debug logging)."""
    sink = io.StringIO()
    root = logging.getLogger()
    old = root.level
    if old < logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        root.setLevel(old)
        if sink.getvalue().strip():
            log.debug("%s", sink.getvalue().strip())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
