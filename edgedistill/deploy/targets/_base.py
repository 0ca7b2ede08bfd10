"""What an export target is, the registry of them, and the helpers every target shares.

A target owns four things: the file names it writes (``files``; the first one is what validation
runs), how it is built (``build``), how it is run for validation (``open``: a runner over its own
runtime) and its quality gate (``gate``). Building, validation and the report never branch on a target's name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

from edgedistill.base.errors import InputError
from edgedistill.base.parity import describe, within
from edgedistill.base.registry import Registry
from edgedistill.data.transforms import hw

if TYPE_CHECKING:  # (the recipe is not imported: it imports this package to check export.formats)
    import numpy as np
    from torch import nn

log = logging.getLogger("edgedistill")


class Runner(Protocol):
    """A loaded artifact that maps (N, 3, H, W) float32 images to (N, classes) logits."""

    def incompatible(self, chw: tuple[int, ...]) -> str | None:
        """Why images of shape ``chw`` cannot be fed (``None`` when they can)."""

    def run(self, x: "np.ndarray", batch: int) -> "np.ndarray":
        """Logits for ``x``, fed ``batch`` images at a time (or the model's fixed batch)."""


@dataclass
class BuildContext:
    """Everything a target's ``build`` may read; ``built`` holds the infos of the targets built before it."""

    model: "nn.Module"
    out_dir: Path
    cfg: Any  # edgedistill.recipe.schema.ExportConfig
    image_size: int | tuple[int, int]
    calibration_images: "np.ndarray | None"
    metadata: dict[str, str]
    built: dict[str, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # export.json's top level: a target may add a key of its own
    # int8 targets: held-out training images (a TestImages) with the float student's logits on them, and the most
    # answers in % an int8 file may change there (edgedistill.deploy.int8_fallback); None: no fitting, plain PTQ
    held_out: Any = None
    held_out_reference: "np.ndarray | None" = None
    max_int8_drop: float = 1.0
    progress: Callable[[str], None] = lambda _: None
    # what int8 targets quantise: the student after quantisation-aware training (the qat stage), else ``model``
    # (held_out_reference holds its float logits; validation compares every file with ``model``)
    int8_model: "nn.Module | None" = None

    def __post_init__(self) -> None:
        if self.int8_model is None:
            self.int8_model = self.model

    def model_for(self, precision: str) -> "nn.Module":
        return self.int8_model if precision == "int8" else self.model

    @property
    def qat(self) -> bool:
        return self.int8_model is not self.model

    def file_of(self, target: str) -> Path:
        """The main file of a target built earlier (one this target ``requires``)."""
        return self.out_dir / TARGETS.get(target).files[0]


class Target:
    """Base class of export targets: set the class attributes, implement ``build`` and ``open``, decorate
    the class with :func:`register`. (ONNX targets derive from :class:`edgedistill.deploy.targets._onnx.OnnxTarget`,
    which opens files in ONNX Runtime.) ``cfg`` below is the recipe's ``export`` / ``validate`` section."""

    name: str = ""
    files: tuple[str, ...] = ()  # every file it writes into the run folder; files[0] is what validation runs
    requires: tuple[str, ...] = ()  # targets that must be in export.formats and are built first
    packages: tuple[str, ...] = ()  # modules whose __version__ export.json records
    #: the pip extra that installs ``packages`` when they are optional (``pip install 'edgedistill[<extra>]'``);
    #: a recipe naming the target without them fails when it loads (see :func:`not_installed`)
    extra: str = ""
    format_name = "model file"  # in messages: "not a loadable <format_name>"
    runtime_name = "its runtime"  # in messages: "<file> fails in <runtime_name>"
    #: where the file is meant to run: "server" (a CPU server), "edge" (phones, boards, NPUs); validation recommends,
    #: per kind, the fastest variant meant for it (edgedistill.deploy.recommend)
    deploy_to: tuple[str, ...] = ("server", "edge")
    #: the number format of its weights and arithmetic: what ``student.target.precision`` asks of a file
    precision: str = "fp32"
    #: int8 targets: the integers its files round each weight to (symmetric, per channel or per tensor);
    #: quantisation-aware training trains against the coarsest grid among the run's targets
    weight_grid: tuple[int, int] | None = None

    def quantizer(self, per_channel: bool = True, qat: bool = False):
        """The PT2E quantizer a PT2E int8 target builds its files with (``qat``: with fake quantisers, for training
        against it); None for every other target."""
        return None

    def device_note(self) -> str:
        """Where this target pays off even when it measures slower than another here: the first paragraph of the
        target class's own docstring (none: empty)."""
        doc = type(self).__dict__.get("__doc__") or ""
        return " ".join(doc.strip().split("\n\n")[0].split())

    def check(self, ctx: BuildContext) -> None:
        """Cheap checks of the inputs, run for every target before anything is built."""

    def build(self, ctx: BuildContext) -> dict:
        """Write ``self.files`` into ``ctx.out_dir`` (atomically); return the JSON-ready info for export.json."""
        raise NotImplementedError

    def open(self, path: Path, threads: int) -> Runner:
        """A runner over ``path`` in the target's runtime, for validation."""
        raise NotImplementedError

    #: the ValidateConfig key holding the top-1 points a lossy target may lose; empty: gated on parity, like fp32
    max_drop_key: str = ""

    def gate(self, row: dict, cfg: Any) -> list[str]:
        """Failure messages for one validation row."""
        return top1_drop_gate(row, cfg, self.max_drop_key) if self.max_drop_key else parity_gate(row, cfg)

    def tolerance(self, cfg: Any) -> float:
        """The max |logit − PyTorch logit| expected on a healthy model with logits of O(1–10): what the
        per-target test checks the runner against (the gate may be looser, e.g. on top-1 only)."""
        return cfg.atol


TARGETS: Registry[Target] = Registry("export target")
TargetClass = TypeVar("TargetClass", bound=type[Target])


def register(cls: TargetClass) -> TargetClass:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    TARGETS.register(cls.name)(cls())
    return cls


def build_order(names: list[str]) -> list[str]:
    """``names`` with every target after the ones it requires (otherwise in the given order)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise InputError(f"export targets require each other in a cycle: {' → '.join(path + (name,))}")
        for dep in TARGETS.get(name).requires:
            visit(dep, path + (name,))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def missing_requirements(names: list[str]) -> list[str]:
    """'X is required by Y' for every requirement of a target in ``names`` that is not in ``names``."""
    return [f"{dep} is required by {name}" for name in names for dep in TARGETS.get(name).requires if dep not in names]


def qat_weight_grid(names: list[str]) -> tuple[int, int] | None:
    """The coarsest weight grid among the int8 targets in ``names`` (None: there is none): what quantisation-aware
    training rounds its weights to, so that every file rounds them as QAT did or more finely."""
    grids = [g for name in names if (g := TARGETS.get(name).weight_grid) is not None]
    return min(grids, key=lambda g: g[1] - g[0], default=None)


def qat_target(names: list[str]) -> Target | None:
    """The int8 target whose own quantizer quantisation-aware training simulates: the first int8 target in ``names``
    (the file shipped first), when it has a PT2E quantizer with a QAT mode (ExecuTorch's XNNPACKQuantizer; not
    LiteRT's, see its target); None otherwise, and QAT uses torchao's x86 scheme (U8S8, like ONNX Runtime's files).
    Each file gains most from QAT against its own scheme: on MobileNetV3-small, QAT KD against XNNPACK's quantizer
    gave the ExecuTorch file +0.34 points and the ONNX Runtime file -0.49 against QAT with the x86 scheme."""
    first = next((t for name in names if (t := TARGETS.get(name)).precision == "int8"), None)
    return first if first is not None and first.quantizer(qat=True) is not None else None


def not_installed(names: list[str]) -> list[str]:
    """The install command for every target in ``names`` whose optional packages (``extra``) are missing.

    Only looks the top-level modules up (``find_spec``, no import): the recipe calls it on every load.
    """
    import importlib.util

    out = []
    for name in names:
        target = TARGETS.get(name)
        missing = [p for p in dict.fromkeys(p.split(".")[0] for p in target.packages) if importlib.util.find_spec(p) is None]
        if target.extra and missing:
            out.append(f"{name} needs {', '.join(missing)}: install the extra '{target.extra}' (pip install 'edgedistill[{target.extra}]')")
    return out


# ---------------------------------------------------------------- gates


def parity_gate(row: dict, cfg: Any) -> list[str]:
    """Same logits as PyTorch within ``atol`` (of the largest |logit|, when above 1: :mod:`edgedistill.base.parity`)
    and the same top-1 on every parity batch."""
    out = []
    diff = row.get("max_abs_diff")
    if diff is None:
        out.append(f"max_abs_diff nan/inf vs PyTorch (atol {cfg.atol:g})")
    elif not within(diff, cfg.atol, row["logit_scale"]):
        out.append(f"max_abs_diff {diff:.3g} > atol {describe(cfg.atol, row['logit_scale'])} vs PyTorch")
    if not row.get("top1_agreement") == 1.0:
        agreement = row.get("top1_agreement")
        shown = "nan" if agreement is None else f"{agreement:.4f}"
        out.append(f"top1_agreement {shown} < 1.0 on parity batches {list(cfg.parity_batches)}")
    return out


def top1_drop_gate(row: dict, cfg: Any, limit_key: str) -> list[str]:
    """At most ``cfg.<limit_key>`` top-1 points lost against PyTorch."""
    limit = float(getattr(cfg, limit_key))
    delta = row.get("delta_top1")
    drop = float("inf") if delta is None else -delta
    return [] if drop <= limit + 1e-9 else [f"top-1 drop {drop:.2f} points > {limit_key} {limit}"]


# ---------------------------------------------------------------- shared helpers


def check_images(x, what: str, image_size=None) -> "np.ndarray":
    """(N, 3, H, W) float32 in [0, 1], or an InputError naming ``what``."""
    import numpy as np

    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[1] != 3 or len(x) == 0:
        shape = getattr(x, "shape", None)
        raise InputError(f"{what}: expected a non-empty (N, 3, H, W) float32 array, got {type(x).__name__} {shape}")
    if image_size is not None and tuple(x.shape[2:]) != hw(image_size):
        h, w = hw(image_size)
        raise InputError(f"{what}: images are {x.shape[2]}x{x.shape[3]}, the model takes {h}x{w}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(f"{what}: pixel values span [{lo:.3g}, {hi:.3g}]; the model takes RGB in [0, 1] (normalisation is inside it)")
    return x




def torch_logits(net: "nn.Module", images: Any, batch: int | None = None) -> "np.ndarray":
    """``net``'s logits on ``images`` (a :class:`edgedistill.data.loading.TestImages`), chunk by chunk, at most
    ``batch`` images a call (a traced module's bound), without gradients."""
    import numpy as np
    import torch

    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(np.ascontiguousarray(x[i:i + (batch or len(x))]))).numpy()
                               for x, _ in images.chunks() for i in range(0, len(x), batch or len(x))])
