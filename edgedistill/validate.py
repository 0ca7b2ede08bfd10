"""Validate the exported targets on the CPU, each in its own runtime: parity, accuracy, latency, size.

:func:`validate_export` returns a JSON-ready dict (the caller writes it as ``validation.json``)::

    {
      "passed": bool,                      # every variant passed its gates
      "torch_top1": float,                 # PyTorch eager test top-1 (percent)
      "torch_images_per_second": float,    # PyTorch eager throughput, same batch and threads
      "settings": {...},                   # the ValidateConfig used, number of test images
      "variants": {
        "fp32": {"path", "size_bytes", "max_abs_diff", "top1_agreement", "parity": {batch: {...}},
                 "test_top1", "torch_top1", "delta_top1", "latency_ms_p50", "latency_ms_p90",
                 "images_per_second", "torch_images_per_second", "passed", "failures": [str]},
        ...                                # one row per target in export.json
      }
    }

The files, the runtime that runs them and the gates come from the export targets
(:data:`edgedistill.targets.TARGETS`): fp32 and edge must match PyTorch (``max_abs_diff <= atol`` and
identical top-1 on every parity batch); int8 / fp16 may lose at most ``max_int8_drop`` /
``max_fp16_drop`` top-1 points against PyTorch. Any variant that cannot be loaded fails.
:func:`check_gates` turns failures into :class:`~edgedistill.errors.GateFailed` (exit code 1);
write ``validation.json`` before calling it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from edgedistill.errors import GateFailed, InputError, RecipeError, first_line
from edgedistill.targets import TARGETS, OnnxTarget, Runner, Target, check_images

DEFAULT_THROUGHPUT_SECONDS = 1.0
LATENCY_WARMUP = 5
REFERENCE_BATCH = 64


# ---------------------------------------------------------------- public API


def validate_export(model: nn.Module, out_dir: Path, export_summary: Mapping, test_x: np.ndarray, test_y: np.ndarray,
                    cfg, *, throughput_seconds: float = DEFAULT_THROUGHPUT_SECONDS) -> dict:
    """Validate every target listed in ``export_summary`` (the content of ``export.json``) against ``model``.

    ``out_dir``: the folder holding the exported files; ``test_x``: (N, 3, H, W) float32 RGB in [0, 1];
    ``test_y``: (N,) int64 labels; ``cfg``: a :class:`edgedistill.recipe.ValidateConfig`. A variant that
    cannot be loaded fails on its own; it never stops the others.
    """
    test_x, test_y = _check_data(test_x, test_y)
    reference = _reference(model, test_x, test_y, cfg, throughput_seconds)
    results = {}
    for name, info in export_summary.get("variants", {}).items():
        path = Path(out_dir) / info["path"]
        try:
            target = TARGETS.get(name)
        except RecipeError as e:  # export.json written by a version that had this target
            results[name] = _row(path, reference) | {"failures": [str(e)]}
            continue
        results[name] = _validate_one(target, path, test_x, test_y, cfg, reference, throughput_seconds)
    return {
        "passed": all(r["passed"] for r in results.values()),
        "torch_top1": reference["top1"],
        "torch_images_per_second": reference["images_per_second"],
        "settings": _settings(cfg, len(test_x)),
        "variants": results,
    }


def validate_onnx_file(path, test_x: np.ndarray, test_y: np.ndarray, cfg, *, name: str | None = None,
                       throughput_seconds: float = DEFAULT_THROUGHPUT_SECONDS) -> dict:
    """Accuracy, latency and size of one ONNX (or ORT-format) file, with no PyTorch model (no parity, no gates).

    Same result shape as :func:`validate_export`; ``torch_*`` fields are ``None``. The only gate is
    that the file loads and runs on the test images in ONNX Runtime.
    """
    test_x, test_y = _check_data(test_x, test_y)
    path = Path(path)
    name = name or path.name
    r = _validate_one(OnnxTarget(), path, test_x, test_y, cfg, None, throughput_seconds)  # ORT runner; no gate without a reference
    return {
        "passed": r["passed"],
        "torch_top1": None,
        "torch_images_per_second": None,
        "settings": _settings(cfg, len(test_x)),
        "variants": {name: r},
    }


def onnx_file_problem(path: Path, image_size: int) -> str | None:
    """Why ONNX Runtime cannot run ``path`` on (N, 3, image_size, image_size) images, or None when it can."""
    try:
        runner = OnnxTarget().open(Path(path), threads=1)
    except Exception as e:  # noqa: BLE001 - whatever ORT says about the file is the message
        return f"not a loadable ONNX model ({first_line(e)})"
    return runner.incompatible((3, image_size, image_size))


def check_gates(results: Mapping) -> None:
    """Raise :class:`GateFailed` (exit 1) naming every failed variant and gate, in one line."""
    variants = results.get("variants", results)
    failed = [f"{name}: {'; '.join(r.get('failures') or ['failed'])}"
              for name, r in variants.items() if not r.get("passed", False)]
    if failed:
        raise GateFailed("validation gate failed: " + " | ".join(failed))


def validation_table(results: Mapping):
    """A rich Table: variant · size · top-1 · Δ vs PyTorch · p50 ms · img/s · status."""
    from rich.table import Table

    settings = results.get("settings", {})
    title = "Validation of the exported models (CPU"
    if settings.get("threads"):
        title += f", {settings['threads']} threads"
    if settings.get("throughput_batch"):
        title += f", img/s at batch {settings['throughput_batch']}"
    table = Table(title=title + ")")
    for col, justify in (("variant", "left"), ("size", "right"), ("top-1", "right"), ("Δ vs PyTorch", "right"),
                         ("p50 ms", "right"), ("img/s", "right"), ("status", "left")):
        table.add_column(col, justify=justify)
    if results.get("torch_top1") is not None:
        table.add_row("pytorch (eager)", "–", _fmt(results["torch_top1"], "{:.2f}%"), "–", "–",
                      _fmt(results.get("torch_images_per_second"), "{:,.0f}"), "reference")
    for name, r in results.get("variants", {}).items():
        status = "✅" if r.get("passed") else "❌ " + "; ".join(r.get("failures") or [])
        table.add_row(
            name,
            _fmt_size(r.get("size_bytes")),
            _fmt(r.get("test_top1"), "{:.2f}%"),
            _fmt(r.get("delta_top1"), "{:+.2f}"),
            _fmt(r.get("latency_ms_p50"), "{:.2f}"),
            _fmt(r.get("images_per_second"), "{:,.0f}"),
            status,
        )
    return table


# ---------------------------------------------------------------- one variant


def _row(path: Path, reference: dict | None) -> dict:
    return {
        "path": path.name,
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "max_abs_diff": None,
        "top1_agreement": None,
        "parity": {},
        "test_top1": None,
        "torch_top1": reference["top1"] if reference else None,
        "delta_top1": None,
        "latency_ms_p50": None,
        "latency_ms_p90": None,
        "images_per_second": None,
        "torch_images_per_second": reference["images_per_second"] if reference else None,
        "passed": False,
        "failures": [],
    }


def _validate_one(target: Target, path: Path, test_x, test_y, cfg, reference: dict | None, throughput_seconds: float) -> dict:
    r = _row(path, reference)
    if not path.is_file():
        r["failures"].append(f"file not found: {path}")
        return r
    try:
        runner = target.open(path, cfg.threads)
    except Exception as e:  # noqa: BLE001 - any load error is this variant's failure
        r["failures"].append(f"not a loadable {target.format_name}: {path.name} ({first_line(e)})")
        return r
    problem = runner.incompatible(test_x.shape[1:])
    if problem:
        r["failures"].append(f"{path.name}: {problem}")
        return r
    try:
        if reference is not None:
            _parity(r, runner, reference)
        logits = runner.run(test_x, batch=cfg.throughput_batch)
        r["test_top1"] = _top1(logits, test_y)
        if reference is not None:
            r["delta_top1"] = round(r["test_top1"] - reference["top1"], 4)
        r["latency_ms_p50"], r["latency_ms_p90"] = _latency(runner, test_x[:1], cfg.latency_runs)
        xb = _take(test_x, cfg.throughput_batch)
        r["images_per_second"] = _throughput(lambda: runner.run(xb, batch=len(xb)), len(xb), throughput_seconds)
    except Exception as e:  # noqa: BLE001
        r["failures"].append(f"{path.name} fails in {target.runtime_name}: {first_line(e)}")
        return r
    if reference is not None:
        r["failures"].extend(target.gate(r, cfg))
    r["passed"] = not r["failures"]
    return r


def _parity(r: dict, runner: Runner, reference: dict) -> None:
    """Max |logit difference| and top-1 agreement with PyTorch on every parity batch."""
    worst, agree, total = 0.0, 0, 0
    for b, x in reference["parity_inputs"].items():
        out = runner.run(x, batch=b)
        ref = reference["parity"][b]
        diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if np.isfinite(out).all() else math.inf
        same = int((out.argmax(1) == ref.argmax(1)).sum())
        r["parity"][str(b)] = {"max_abs_diff": _num(diff), "top1_agreement": same / len(x)}
        worst, agree, total = max(worst, diff), agree + same, total + len(x)
    r["max_abs_diff"], r["top1_agreement"] = _num(worst), agree / total


def _latency(runner: Runner, x1: np.ndarray, runs: int) -> tuple[float, float]:
    x1 = np.ascontiguousarray(x1)
    for _ in range(min(LATENCY_WARMUP, runs)):
        runner.run(x1, batch=1)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        runner.run(x1, batch=1)
        times.append((time.perf_counter() - t) * 1000.0)
    return round(float(np.percentile(times, 50)), 4), round(float(np.percentile(times, 90)), 4)


def _throughput(step, images_per_step: int, seconds: float) -> float:
    """Images per second of ``step()`` (one batch): one warm-up call, then at least 3 calls and ``seconds``."""
    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - t0
        if n >= 3 and elapsed >= seconds:
            break
    return round(n * images_per_step / elapsed, 2)


# ---------------------------------------------------------------- PyTorch reference


def _reference(model: nn.Module, test_x: np.ndarray, test_y: np.ndarray, cfg, throughput_seconds: float) -> dict:
    """PyTorch's test top-1, its logits on the parity batches and its throughput (CPU, float32, eval copy)."""
    ref_model = copy.deepcopy(model).cpu().float().eval()
    with torch_threads(cfg.threads):
        parity_inputs = {b: _take(test_x, b) for b in cfg.parity_batches}
        return {
            "top1": _top1(_torch_logits(ref_model, test_x), test_y),
            "images_per_second": _torch_throughput(ref_model, _take(test_x, cfg.throughput_batch), throughput_seconds),
            "parity_inputs": parity_inputs,
            "parity": {b: _torch_logits(ref_model, x, batch=b) for b, x in parity_inputs.items()},
        }


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, restoring the old value."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _torch_logits(model: nn.Module, x: np.ndarray, batch: int = REFERENCE_BATCH) -> np.ndarray:
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(x[i:i + batch])).float().numpy().astype(np.float64))
    return np.concatenate(outs)


def _torch_throughput(model: nn.Module, xb: np.ndarray, seconds: float) -> float:
    t = torch.from_numpy(np.ascontiguousarray(xb))
    with torch.inference_mode():
        return _throughput(lambda: model(t), len(xb), seconds)


# ---------------------------------------------------------------- helpers


def _check_data(test_x, test_y) -> tuple[np.ndarray, np.ndarray]:
    test_x = check_images(test_x, "test images")
    test_y = np.asarray(test_y)
    if test_y.ndim != 1 or len(test_y) != len(test_x) or not np.issubdtype(test_y.dtype, np.integer):
        raise InputError(f"test labels: expected ({len(test_x)},) integers, got {test_y.dtype} {test_y.shape}")
    return test_x, test_y.astype(np.int64)


def _take(x: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` images, cycling when there are fewer."""
    if n <= len(x):
        return np.ascontiguousarray(x[:n])
    return np.ascontiguousarray(x[np.arange(n) % len(x)])


def _top1(logits: np.ndarray, y: np.ndarray) -> float:
    return round(float((logits.argmax(1) == y).mean() * 100.0), 4)


def _settings(cfg, n: int) -> dict:
    return {"threads": cfg.threads, "atol": cfg.atol, "max_int8_drop": cfg.max_int8_drop,
            "max_fp16_drop": cfg.max_fp16_drop, "parity_batches": list(cfg.parity_batches),
            "latency_runs": cfg.latency_runs, "throughput_batch": cfg.throughput_batch, "test_images": n,
            "provider": "CPUExecutionProvider"}


def _num(v):
    """JSON-safe float: non-finite → None."""
    return float(v) if v is not None and math.isfinite(v) else None


def _fmt(v, spec: str) -> str:
    return "–" if v is None else spec.format(v)


def _fmt_size(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

