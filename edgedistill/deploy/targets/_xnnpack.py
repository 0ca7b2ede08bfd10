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
from edgedistill.deploy.targets._base import BuildContext, Target, check_images, torch_logits
from edgedistill.data.transforms import hw
from edgedistill.base.console import quiet

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

BATCH = 1
CALIBRATION_BATCH = 32
#: XNNPACK's int8 convolution and fully-connected operators need input scale × weight scale / output scale below this
#: in every output channel (its operator creation returns xnn_status_unsupported_parameter at or above it)
XNNPACK_MAX_REQUANTIZATION = 256.0


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


def int8_settings(quantizer: str, n: int, per_channel: bool = True, float_layers: frozenset[str] = frozenset()) -> dict:
    return {"flow": "PT2E static", "quantizer": quantizer, "weights": f"int8 symmetric per {'channel' if per_channel else 'tensor'}",
            "per_channel": per_channel, "activations": "int8 per tensor", "calibration": "the quantizer's observers",
            "calibration_samples": int(n), **({"float_layers": sorted(float_layers)} if float_layers else {})}


def owner(node) -> str | None:
    """The innermost module a traced node came from (``net.features.3.conv.0.0``), or None."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def layer_filter(inner, keep_float: frozenset[str] = frozenset(), only: str | None = None):
    """``inner`` (a PT2E quantizer) whose annotations are dropped from the nodes of the layers kept in float, or of
    every layer but ``only``: how a PT2E target keeps layers in float (its own ``set_module_name(name, None)`` is
    not supported by XNNPACK's quantizer). Layers are :func:`pt2e_layers`'s."""
    from torchao.quantization.pt2e.quantizer import Quantizer

    keep_float = {m for layer in keep_float for m in layer.split("+")}
    kept = None if only is None else set(only.split("+"))

    class LayerFilter(Quantizer):
        def transform_for_annotation(self, model):
            return inner.transform_for_annotation(model)

        def annotate(self, model):
            model = inner.annotate(model)
            dropped = set()
            for node in model.graph.nodes:
                name = owner(node) if node.op == "call_function" else None
                if name is not None and (name in keep_float or (kept is not None and name not in kept)):
                    dropped.add(node)
            while dropped:  # and the annotations that share a quantisation spec with a dropped one (views, pools)
                for node in dropped:
                    node.meta.pop("quantization_annotation", None)
                dropped = {n for n in model.graph.nodes if _shares_with_dropped(n)}
            return model

        def validate(self, model) -> None:
            inner.validate(model)

        def __getattr__(self, name):  # what a converter reads of its own quantizer (LiteRT: global_config)
            return getattr(inner, name)

    return LayerFilter()


def _shares_with_dropped(node) -> bool:
    """Whether ``node``'s annotation shares a spec with a node that has none left: a SharedQuantizationSpec names an
    edge (its consumer holds the spec) or a node (it holds the spec)."""
    from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

    ann = node.meta.get("quantization_annotation")
    if ann is None:
        return False
    for spec in (*ann.input_qspec_map.values(), ann.output_qspec):
        if isinstance(spec, SharedQuantizationSpec):
            holder = spec.edge_or_node[1] if isinstance(spec.edge_or_node, tuple) else spec.edge_or_node
            if holder is not node and "quantization_annotation" not in holder.meta:
                return True
    return False


def pt2e_layers(net: "nn.Module", quantizer, image_size) -> list[str]:
    """The layers ``quantizer`` annotates in ``net``, in graph order: what sensitivity and fallback work on. A layer is
    a module whose operations get annotated (convolutions, linears, activations, the blocks whose additions are
    quantised), joined with ``+`` to the modules of a fused pattern (a convolution whose output is quantised after its
    ReLU: ``features.0.0+features.0.2``), because half a pattern in float is not something XNNPACK can run."""
    import torch

    with quiet():
        graph = torch.export.export(net, (example(image_size, 2),)).module()
        graph = quantizer.annotate(quantizer.transform_for_annotation(graph))
    parent: dict[str, str] = {}

    def root(m: str) -> str:
        while parent[m] != m:
            m = parent[m]
        return m

    for node in graph.graph.nodes:
        ann = node.meta.get("quantization_annotation") if node.op == "call_function" else None
        if ann is None or owner(node) is None:
            continue
        parent.setdefault(owner(node), owner(node))
        if ann.output_qspec is None:  # fused: its output is quantised by the pattern's last node
            for user in node.users:
                if "quantization_annotation" in user.meta and owner(user) is not None:
                    parent.setdefault(owner(user), owner(user))
                    parent[root(owner(user))] = root(owner(node))
    members: dict[str, list[str]] = {}
    for m in parent:
        members.setdefault(root(m), []).append(m)
    return ["+".join(ms) for ms in members.values()]


def requantization_scales(graph: "torch.fx.GraphModule") -> dict[str, float]:
    """For each int8 convolution and linear of a converted PT2E graph, by the module it came from: its largest
    requantisation scale, input scale × weight scale / output scale over the output channels (the output quantised
    right after it or after its fused ReLU / clamp). XNNPACK refuses to create the operator at :data:`XNNPACK_MAX_REQUANTIZATION`
    and above, and ExecuTorch then cannot load the program at all."""
    import torch

    def scale(dq) -> "torch.Tensor | None":  # the scale a dequantize node uses (None: not a dequantize node)
        if not (isinstance(dq, torch.fx.Node) and dq.op == "call_function" and "dequantize" in str(dq.target)):
            return None
        s = dq.args[1]
        return torch.as_tensor(getattr(graph, s.target) if isinstance(s, torch.fx.Node) else s, dtype=torch.float64)

    out = {}
    for node in graph.graph.nodes:
        if node.op != "call_function" or str(node.target) not in ("aten.conv2d.default", "aten.linear.default"):
            continue
        x, w = scale(node.args[0]), scale(node.args[1])
        after = node
        if len(node.users) == 1 and any(k in str(next(iter(node.users)).target) for k in ("relu", "hardtanh", "clamp")):
            after = next(iter(node.users))
        q = [u for u in after.users if "quantize_per_tensor" in str(u.target)]
        if x is None or w is None or not q or owner(node) is None:
            continue
        out[owner(node)] = float((x * w / float(q[0].args[1])).max())
    return out


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
    (``convert``), one atomic write. Subclasses set ``convert`` and, for int8, ``quantizer`` (:meth:`Target.quantizer`)."""

    deploy_to = ("edge",)
    quantizer_name = ""  # int8 variants: the quantizer, in export.json
    fold_quantize = True  # int8 weights stored as int8 constants (False: float behind their quantize op)
    #: int8 variants whose runtime refuses a convolution or linear at this requantisation scale and above (None: no
    #: such limit): those layers stay in float (:func:`requantization_scales`)
    max_requantization: float | None = None

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
        net, prep = export_copy(ctx.model_for(self.precision), path.name)
        quantizer, settings, fitted = self.quantizer(), {}, None
        if quantizer is not None:
            net, quantizer, settings, fitted = self._quantized(ctx, net, path.name)
        try:
            with quiet():
                content, info = self.convert(ctx, net, quantizer, settings)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - any converter failure is the user's model's problem
            raise InputError(f"{path.name}: {self.runtime_name} conversion failed ({type(e).__name__}: {first_line(e)})") from None
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
        return {"batch": BATCH, "prepared": prep, **info, **({"quantization": settings} if settings else {}),
                **({"float_layers": settings.get("float_layers", []), "held_out": fitted} if fitted else {})}

    def _quantized(self, ctx: BuildContext, net: "nn.Module", file_name: str):
        """PT2E int8 of ``net``: plain, or fitted on the held-out images (:mod:`edgedistill.deploy.int8_fallback`, judged
        on the simulated int8 module in PyTorch; validation then runs the runtime's file). Returns the quantised
        module, its quantizer, the settings and the fit (None without held-out images). Layers the runtime refuses in
        int8 (:attr:`max_requantization`) stay in float whatever the fit decides."""
        from edgedistill.deploy.int8_fallback import Int8Fit

        cfg = ctx.cfg.int8
        per_channel = cfg.granularity == "per_channel"
        calibration = ctx.calibration_images[: cfg.calibration.samples]
        layers = pt2e_layers(net, self.quantizer(per_channel), ctx.image_size)
        refused: dict[str, float] = {}
        chosen: dict = {}

        def quantized(keep: frozenset[str] = frozenset(), only: str | None = None):
            q = layer_filter(self.quantizer(per_channel), keep | refused.keys(), only)
            return q, quantize_pt2e(net, q, calibration, file_name, fold_quantize=self.fold_quantize)

        plain = None  # every layer the runtime takes in int8
        if self.max_requantization is not None:
            plain = quantized()
            over = {m: v for m, v in requantization_scales(plain[1]).items() if v >= self.max_requantization}
            refused.update({next(layer for layer in layers if m in layer.split("+")): v for m, v in over.items()})
            if refused:
                plain = quantized()
                ctx.progress(f"{self.name}: {len(refused)} layer(s) kept in float, where {self.runtime_name} refuses int8 "
                             f"(requantisation scale ≥ {self.max_requantization:g}): "
                             + ", ".join(f"{layer} ({v:.0f})" for layer, v in refused.items()))
        refusals = {"runtime_refused": {layer: round(v, 2) for layer, v in refused.items()}} if refused else {}
        if ctx.held_out is None:
            q, qnet = plain or quantized()
            return qnet, q, {**int8_settings(self.quantizer_name, len(calibration), per_channel, frozenset(refused)), **refusals}, None

        def keeping(layers: frozenset[str]) -> "np.ndarray":
            built = plain if plain is not None and not layers else quantized(layers)  # (the fit starts from all in int8)
            chosen.update(zip(("quantizer", "net", "keep"), (*built, layers)))
            return torch_logits(chosen["net"], ctx.held_out, CALIBRATION_BATCH)

        fit = Int8Fit([layer for layer in layers if layer not in refused], keeping,
                      lambda layer: torch_logits(quantized(only=layer)[1], ctx.held_out, CALIBRATION_BATCH),
                      ctx.held_out_reference, ctx.held_out.labels)
        fitted = fit.run(ctx.max_int8_drop, cfg.fallback, cfg.sensitivity, ctx.progress)
        settings = int8_settings(self.quantizer_name, len(calibration), per_channel, chosen["keep"] | refused.keys())
        return chosen["net"], chosen["quantizer"], {**settings, **refusals}, {**fitted, "judged_on": "the PT2E module simulating int8 in PyTorch"}


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
