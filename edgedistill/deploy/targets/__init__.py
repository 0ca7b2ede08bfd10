"""Export targets: one module per format, registered in :data:`TARGETS` under the name ``export.formats`` uses.

Every module in this package whose name does not start with ``_`` is imported here, so a new target is
one new module (a :class:`Target` subclass decorated with :func:`register`) plus its tests. Importing the
package is cheap: targets import torch / onnx / onnxruntime inside their functions.

:func:`export_all` builds the targets of ``export.formats`` (each after the ones it requires) into the
run folder and writes ``export.json``::

    {"exporter", "opset", "input", "output",   # written by the fp32 target
     "versions": {...},
     "variants": {name: {"path": file validation runs, "files": [every file it wrote], ...its info,
                         "size_bytes", "sha256": of the main file, "seconds": to build it}},
     "seconds": float}
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from edgedistill.base.errors import InputError
from edgedistill.base.fsio import sha256, write_json
from edgedistill.deploy.targets._base import (
    TARGETS,
    BuildContext,
    Runner,
    Target,
    build_order,
    check_images,
    missing_requirements,
    not_installed,
    parity_gate,
    qat_target,
    qat_weight_grid,
    register,
    top1_drop_gate,
    torch_logits,
)
from edgedistill.deploy.targets._onnx import OnnxTarget, OrtRunner, onnx_metadata, read_metadata

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

EXPORT_SUMMARY_FILE = "export.json"

__all__ = [
    "EXPORT_SUMMARY_FILE", "TARGETS", "BuildContext", "OnnxTarget", "OrtRunner", "Runner", "Target", "build_order", "check_images",
    "export_all", "missing_requirements", "not_installed", "onnx_metadata", "parity_gate", "qat_target", "qat_weight_grid", "read_metadata", "register", "top1_drop_gate",
]


def export_all(model: "nn.Module", out_dir: Path, cfg: Any, *, image_size: int, calibration_images: "np.ndarray | None",
               metadata: Mapping[str, str], held_out: Any = None, max_int8_drop: float = 1.0, int8_model: "nn.Module | None" = None,
               progress: Callable[[str], None] = lambda _: None) -> dict:
    """Build every target in ``cfg.formats`` into ``out_dir``, write ``export.json`` atomically, return its content.

    A target that cannot take the network (its exporter or converter refuses an operator: an :class:`InputError`
    from its build) is recorded under ``failed`` with the reason, with the targets built from it, and the others
    are built: validation fails those variants, so the run ends with exit 1 and every file that could be made.

    ``cfg``: the recipe's :class:`edgedistill.recipe.schema.ExportConfig` (not imported here: the recipe imports
    this package to check ``export.formats``).
    ``calibration_images``: (N, 3, H, W) float32 RGB in [0, 1], already chosen by the caller (targets that
    calibrate use at most ``cfg.int8.calibration.samples`` of them); ``metadata``: see :func:`onnx_metadata`.
    ``held_out``: training images that are not calibration images, with labels (a
    :class:`edgedistill.data.loading.TestImages`), on which an int8 target judges its file and, when it changes
    more than ``max_int8_drop`` % of the answers, keeps layers in float (:mod:`edgedistill.deploy.int8_fallback`).
    ``int8_model``: what the int8 targets quantise instead of ``model`` (the student after quantisation-aware
    training); their held-out judgement compares them with the float weights they round. Each target's inputs are
    checked before anything is built.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = build_order(list(cfg.formats))
    ctx = BuildContext(model, out_dir, cfg, image_size, calibration_images, dict(metadata), held_out=held_out,
                       max_int8_drop=max_int8_drop, progress=progress, int8_model=int8_model)
    if held_out is not None and any(TARGETS.get(n).precision == "int8" for n in names):
        # quantisation is judged against the float weights it rounds (after QAT, those QAT left)
        ctx.held_out_reference = torch_logits(copy.deepcopy(ctx.int8_model).cpu().float().eval(), held_out)
    for name in names:
        TARGETS.get(name).check(ctx)
    failed: dict[str, str] = {}
    for name in names:
        target = TARGETS.get(name)
        t_target = time.perf_counter()
        if blocked := [r for r in target.requires if r in failed]:
            failed[name] = f"needs {blocked[0]}, which failed"
            continue
        try:
            info = target.build(ctx)
        except InputError as e:  # this network in this target (an operator its exporter refuses): the others go on
            failed[name] = str(e)
            continue
        missing = [f for f in target.files if not (out_dir / f).is_file()]
        if missing:
            raise InputError(f"export target '{name}' did not write {', '.join(missing)}")
        main = out_dir / target.files[0]
        ctx.built[name] = {"path": target.files[0], "files": list(target.files), **info,
                           **({"qat": True} if ctx.qat and target.precision == "int8" else {}), "size_bytes": main.stat().st_size,
                           "sha256": sha256(main), "seconds": round(time.perf_counter() - t_target, 2)}
    summary = ctx.summary
    summary["versions"] = _versions(names)
    summary["variants"] = ctx.built
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out_dir / EXPORT_SUMMARY_FILE, summary)
    return summary


def _versions(names: list[str]) -> dict[str, str]:
    from edgedistill import __version__

    packages = dict.fromkeys(p for name in names for p in TARGETS.get(name).packages)
    return {"edgedistill": __version__, **{p: importlib.import_module(p).__version__ for p in packages}}


def _import_targets() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_targets()
