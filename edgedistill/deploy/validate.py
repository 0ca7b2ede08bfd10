"""Validate the exported targets on the CPU, each in its own runtime: parity, accuracy, latency, size.

:func:`validate_export` returns a JSON-ready dict (the caller writes it as ``validation.json``)::

    {
      "passed": bool,                      # every variant passed its gates
      "torch_top1": float,                 # PyTorch eager test top-1 (percent)
      "torch_shot_top1": {"many", "medium", "few"},   # only for a long-tailed training split (base.shots),
      "shot_classes": {"many", "medium", "few"},      # with the number of classes in each group
      "torch_images_per_second": float,    # PyTorch eager throughput, same batch and threads
      "settings": {...},                   # the ValidateConfig used, number of test images
      "chance": {"guess", "bar", ...},     # the test set's chance level (edgedistill.base.chance)
      "target": {...} | None,              # student.target, which the files of its precision must meet
      "variants": {
        "fp32": {"path", "size_bytes", "max_abs_diff", "logit_scale", "top1_agreement", "parity": {batch: {...}},
                 "test_top1", "torch_top1", "delta_top1", "shot_top1" (a long-tailed training split),
                 "latency_ms_p50", "latency_ms_interval": [lo, hi], "latency_ms_samples": [per round],   # batch 1
                 "images_per_second", "images_per_second_interval", "images_per_second_samples",       # throughput_batch
                 "speedup_vs_torch": spread, "latency_vs_fp32": spread,                           # ratios per round
                 "deploy_to": [kind], "precision", "target": {"meets", "why", "failures"} (with a student.target),
                 "torch_images_per_second", "passed", "failures": [str]},
        ...                                # one row per target in export.json
      },
      "torch_images_per_second_interval", "torch_images_per_second_samples",
      "models": {"student": {"parameters", "macs"}, "teacher": {"parameters", "macs", "images_per_second", ...}},
      "recommendations": [{"kind", "variant", "line", ...}]   # edgedistill.deploy.recommend
    }

Timing (:mod:`edgedistill.base.timing`): every variant, PyTorch eager and the teacher run in ``rounds`` interleaved
rounds; a figure is the median of the rounds and their central 95 %, a ratio is taken round by round (a spread:
``{"median", "lo", "hi", "n"}``).

The files, the runtime that runs them and the gates come from the export targets
(:data:`edgedistill.deploy.targets.TARGETS`): fp32 and edge must match PyTorch (``max_abs_diff <= atol`` times the
largest PyTorch |logit| when that exceeds 1, :mod:`edgedistill.base.parity`, and identical top-1 on every parity batch); int8 / fp16 may lose at most ``max_int8_drop`` /
``max_fp16_drop`` top-1 points against PyTorch. Any variant that cannot be loaded fails.
:func:`check_gates` turns failures into :class:`~edgedistill.base.errors.GateFailed` (exit code 1);
write ``validation.json`` before calling it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from edgedistill.base.chance import chance_bar
from edgedistill.base.errors import GateFailed, InputError, first_line
from edgedistill.base.shots import class_counts, shot_top1
from edgedistill.models.macs import model_stats
from edgedistill.deploy.promises import chance_failures, target_check
from edgedistill.deploy.recommend import recommend
from edgedistill.deploy.targets import TARGETS, OnnxTarget, Runner, Target, check_images
from edgedistill.base.timing import interleaved, per_round_ratio, spread
from edgedistill.data.loading import TestImages

LATENCY_WARMUP = 5
REFERENCE_BATCH = 64
REFERENCE_VARIANT = "fp32"  # the variant every other one is compared with (the others require it)
TORCH, TEACHER = "pytorch", "teacher"  # the eager references in the timing rounds


# ---------------------------------------------------------------- public API


def validate_export(model: nn.Module, out_dir: Path, export_summary: Mapping, test: TestImages, cfg, *,
                    teacher: nn.Module | None = None, device_target: Any = None, shot_groups: dict | None = None) -> dict:
    """Validate every target listed in ``export_summary`` (the content of ``export.json``) against ``model``.

    ``out_dir``: the folder holding the exported files; ``test``: the test images and labels, read a chunk at a time
    (:class:`edgedistill.data.loading.TestImages`: peak memory does not grow with their number); ``cfg``: a
    :class:`edgedistill.recipe.schema.ValidateConfig`. A variant that cannot be loaded fails on its own; it never
    stops the others. ``teacher`` (eval mode, on the CPU): counted and timed beside the student in eager PyTorch,
    for the report's compression table. ``device_target``: the recipe's ``student.target``, which the files of its
    precision must meet (:mod:`edgedistill.deploy.promises`). Every file must clear the test set's chance level
    unless ``cfg.allow_weak``. ``shot_groups``: a long-tailed training split's classes by group, for many-, medium-
    and few-shot top-1 beside the overall one.
    """
    _check_data(test)
    reference = _reference(model, test, cfg)
    results, runners = _open_all(Path(out_dir), export_summary, test, cfg, reference)
    reference_scores = _accuracy_pass(test, reference["model"], runners, results, cfg, shot_groups)
    reference["top1"] = reference_scores["test_top1"]
    runners = {name: runner for name, (_, runner) in runners.items()}
    for r in results.values():
        r["torch_top1"] = reference["top1"]
        if r["test_top1"] is not None:
            r["delta_top1"] = round(r["test_top1"] - reference["top1"], 4)
    eager = {TORCH: reference["model"]} | ({TEACHER: teacher} if teacher is not None else {})
    timed = _time_all(runners, eager, test, cfg)
    _fill_timing(results, timed, cfg.throughput_batch)
    chance = chance_bar(test.labels, reference["classes"])
    for name, r in results.items():
        if name in runners:
            r["failures"] += TARGETS.get(name).gate(r, cfg) + chance_failures(r, chance, cfg.allow_weak)
            if device_target is not None:
                r["target"] = target_check(r, device_target, cfg.threads)
                r["failures"] += r["target"]["failures"]
            r["passed"] = not r["failures"]
    out = {
        "passed": all(r["passed"] for r in results.values()),
        "torch_top1": reference["top1"],
        **({"torch_shot_top1": reference_scores["shot_top1"], "shot_classes": {g: len(c) for g, c in shot_groups.items()}}
           if shot_groups else {}),
        **_throughput_fields("torch_", timed["throughput"][TORCH], cfg.throughput_batch),
        "settings": _settings(cfg, len(test)),
        "chance": chance.to_dict(),
        "target": device_target.model_dump() if device_target is not None else None,
        "variants": results,
        "models": {"student": model_stats(reference["model"], reference["chw"][1:])},
    }
    if teacher is not None:
        out["models"]["teacher"] = {**model_stats(teacher, reference["chw"][1:]),
                                    **_throughput_fields("", timed["throughput"][TEACHER], cfg.throughput_batch)}
    out["recommendations"] = recommend(results, target=device_target)
    return out


def validate_onnx_file(path, test: TestImages, cfg, *, name: str | None = None) -> dict:
    """Accuracy, latency and size of one ONNX (or ORT-format) file, with no PyTorch model (no parity, no gates).

    Same result shape as :func:`validate_export`; ``torch_*`` fields are ``None``. The only gate is
    that the file loads and runs on the test images in ONNX Runtime.
    """
    _check_data(test)
    path = Path(path)
    name = name or path.name
    target = OnnxTarget()  # ORT runner; no gate without a reference
    r, runner = _open_one(target, path, test, cfg, None)
    runners = {name: (target, runner)} if runner is not None else {}
    _accuracy_pass(test, None, runners, {name: r}, cfg)
    if runners:
        _fill_timing({name: r}, _time_all({name: runner}, {}, test, cfg), cfg.throughput_batch)
    r["passed"] = not r["failures"]
    return {
        "passed": r["passed"],
        "torch_top1": None,
        "torch_images_per_second": None,
        "settings": _settings(cfg, len(test)),
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


# ---------------------------------------------------------------- one variant


def _open_all(out_dir: Path, export_summary: Mapping, test: TestImages, cfg, reference: dict) -> tuple[dict, dict]:
    """Every variant's row (parity filled in) and the runners of those that run; a target the export could not build
    gets a failed row with the reason."""
    results, runners = {}, {}
    for name, info in export_summary.get("variants", {}).items():
        target = TARGETS.get(name)
        results[name], runner = _open_one(target, out_dir / info["path"], test, cfg, reference)
        if runner is not None:
            runners[name] = (target, runner)
        results[name].update(deploy_to=list(target.deploy_to), precision=target.precision,
                             **{k: info[k] for k in ("float_layers", "qat") if info.get(k)})
    for name, reason in export_summary.get("failed", {}).items():
        target = TARGETS.get(name)
        results[name] = {**_row(out_dir / target.files[0]), "failures": [f"export failed: {reason}"],
                         "deploy_to": list(target.deploy_to), "precision": target.precision}
    return results, runners


def _row(path: Path) -> dict:
    return {
        "path": path.name,
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "max_abs_diff": None,
        "logit_scale": None,
        "top1_agreement": None,
        "parity": {},
        "test_top1": None,
        "torch_top1": None,
        "delta_top1": None,
        "latency_ms_p50": None,
        "latency_ms_interval": None,
        "images_per_second": None,
        "images_per_second_interval": None,
        "passed": False,
        "failures": [],
    }


def _open_one(target: Target, path: Path, test: TestImages, cfg, reference: dict | None) -> tuple[dict, Runner | None]:
    """The row of one variant with its parity, and its runner when the file loads, takes the images and runs them;
    accuracy comes from the one pass over the test images, timing later, with the others, and the gates once the
    row is complete."""
    r = _row(path)
    if not path.is_file():
        r["failures"].append(f"file not found: {path}")
        return r, None
    try:
        runner = target.open(path, cfg.threads)
    except Exception as e:  # noqa: BLE001 - any load error is this variant's failure
        r["failures"].append(f"not a loadable {target.format_name}: {path.name} ({first_line(e)})")
        return r, None
    problem = runner.incompatible(test.head(1).shape[1:])
    if problem:
        r["failures"].append(f"{path.name}: {problem}")
        return r, None
    try:
        if reference is not None:
            _parity(r, runner, reference)
        runner.run(test.head(1), batch=1)  # the timed calls cannot fail later, in the middle of the others' rounds
    except Exception as e:  # noqa: BLE001
        r["failures"].append(f"{path.name} fails in {target.runtime_name}: {first_line(e)}")
        return r, None
    return r, runner


def _accuracy_pass(test: TestImages, model: nn.Module | None, runners: dict[str, tuple[Target, Runner]],
                   rows: dict[str, dict], cfg, shot_groups: dict | None = None) -> dict | None:
    """One pass over the test images, a chunk at a time: every runner's top-1 into its row, and PyTorch's
    (returned with ``test_top1``; None without ``model``); with ``shot_groups``, each one's ``shot_top1`` too
    (:mod:`edgedistill.base.shots`). A runner that fails on a chunk fails its variant and leaves the pass."""
    tallies: dict[str, list] = {}

    def add(name: str, logits: np.ndarray, y: np.ndarray) -> None:
        c, s = class_counts(logits.argmax(1), y, logits.shape[1])
        tallies[name] = [c, s] if name not in tallies else [tallies[name][0] + c, tallies[name][1] + s]

    with torch_threads(cfg.threads):
        for x, y in test.chunks():
            if model is not None:
                add(TORCH, _torch_logits(model, x), y)
            for name, (target, runner) in list(runners.items()):
                try:
                    add(name, runner.run(x, batch=cfg.throughput_batch), y)
                except Exception as e:  # noqa: BLE001
                    rows[name]["failures"].append(f"{rows[name]['path']} fails in {target.runtime_name}: {first_line(e)}")
                    del runners[name]
    scores = {name: _scores(*tallies[name], shot_groups) for name in (*runners, TORCH) if name in tallies}
    for name in runners:
        rows[name].update(scores[name])
    return scores.get(TORCH)


def _scores(correct: np.ndarray, seen: np.ndarray, shot_groups: dict | None) -> dict:
    out = {"test_top1": _percent(int(correct.sum()), int(seen.sum()))}
    return out | ({"shot_top1": shot_top1(correct, seen, shot_groups)} if shot_groups else {})


def _parity(r: dict, runner: Runner, reference: dict) -> None:
    """Max |logit difference| and top-1 agreement with PyTorch on every parity batch, and the largest PyTorch
    |logit| there (what the parity bar scales with)."""
    worst, agree, total = 0.0, 0, 0
    for b, x in reference["parity_inputs"].items():
        out = runner.run(x, batch=b)
        ref = reference["parity"][b]
        diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if np.isfinite(out).all() else math.inf
        same = int((out.argmax(1) == ref.argmax(1)).sum())
        r["parity"][str(b)] = {"max_abs_diff": _num(diff), "top1_agreement": same / len(x)}
        worst, agree, total = max(worst, diff), agree + same, total + len(x)
    r["max_abs_diff"], r["top1_agreement"] = _num(worst), agree / total
    r["logit_scale"] = float(max(np.abs(z).max() for z in reference["parity"].values()))


# ---------------------------------------------------------------- timing, interleaved


def _time_all(runners: Mapping[str, Runner], eager: Mapping[str, nn.Module], test: TestImages, cfg) -> dict:
    """Seconds per call, per round: ``{"latency": {variant: [...]}, "throughput": {variant or eager name: [...]}}``.

    Batch-1 latency of every variant and throughput at ``throughput_batch`` of every variant and eager model, all
    in the same ``cfg.rounds`` interleaved rounds (:func:`edgedistill.base.timing.interleaved`), each figure for at least
    ``cfg.seconds`` over the rounds. Sharing the rounds spreads every figure's samples over the whole measurement: a
    slow phase of the machine that lasts seconds then shows in each figure's spread instead of moving its median."""
    x1, xb = test.head(1), test.head(cfg.throughput_batch)
    tb = torch.from_numpy(xb)
    calls = {("latency", n): (lambda r=r: r.run(x1, batch=1)) for n, r in runners.items()}
    calls |= {("throughput", n): (lambda r=r: r.run(xb, batch=len(xb))) for n, r in runners.items()}
    calls |= {("throughput", n): (lambda m=m: m(tb)) for n, m in eager.items()}
    with torch_threads(cfg.threads), torch.inference_mode():
        samples = interleaved(calls, rounds=cfg.rounds, min_seconds=cfg.seconds / cfg.rounds,
                              min_calls={k: max(1, cfg.latency_runs // cfg.rounds) if k[0] == "latency" else 1 for k in calls},
                              warmup={k: LATENCY_WARMUP if k[0] == "latency" else 1 for k in calls}) if calls else {}
    out: dict[str, dict[str, list[float]]] = {"latency": {}, "throughput": {}}
    for (figure, name), s in samples.items():
        out[figure][name] = s
    return out


def _fill_timing(results: dict, timed: dict, batch: int) -> None:
    """Medians, central 95 % ranges and per-round ratios into the rows of the variants that were timed."""
    lat, thr = timed["latency"], timed["throughput"]
    for name, r in results.items():
        if name not in lat:
            continue
        ms = [round(1000.0 * t, 5) for t in lat[name]]  # figures from the samples as stored: a reader recomputes them exactly
        s = spread(ms)
        r.update(latency_ms_p50=s["median"], latency_ms_interval=[s["lo"], s["hi"]], latency_ms_samples=ms)
        r.update(_throughput_fields("", thr[name], batch))
        if TORCH in thr:
            r["speedup_vs_torch"] = spread(per_round_ratio(thr[TORCH], thr[name]))
        if REFERENCE_VARIANT in lat and name != REFERENCE_VARIANT:
            r["latency_vs_fp32"] = spread(per_round_ratio(lat[name], lat[REFERENCE_VARIANT]))


def _throughput_fields(prefix: str, seconds: list[float], batch: int) -> dict:
    ips = [round(batch / t, 2) for t in seconds]
    s = spread(ips, digits=2)
    return {f"{prefix}images_per_second": s["median"], f"{prefix}images_per_second_interval": [s["lo"], s["hi"]],
            f"{prefix}images_per_second_samples": ips}


# ---------------------------------------------------------------- PyTorch reference


def _reference(model: nn.Module, test: TestImages, cfg) -> dict:
    """The eval copy of the model PyTorch runs (CPU, float32; timed later) and its logits on the parity batches.
    Its test top-1 comes from the one pass over the test images (:func:`_accuracy_pass`)."""
    ref_model = copy.deepcopy(model).cpu().float().eval()
    with torch_threads(cfg.threads):
        parity_inputs = {b: test.head(b) for b in cfg.parity_batches}
        parity = {b: _torch_logits(ref_model, x, batch=b) for b, x in parity_inputs.items()}
    first = next(iter(parity.values()))
    return {"model": ref_model, "parity_inputs": parity_inputs, "parity": parity, "classes": first.shape[1],
            "chw": tuple(next(iter(parity_inputs.values())).shape[1:])}


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


# ---------------------------------------------------------------- helpers


def _check_data(test: TestImages) -> None:
    """The first test image is what every model takes (checked once, as the chunks come from the same transform)
    and the labels are one integer per image."""
    check_images(test.head(1), "test images")
    labels = np.asarray(test.labels)
    if labels.ndim != 1 or len(labels) != len(test) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"test labels: expected ({len(test)},) integers, got {labels.dtype} {labels.shape}")


def _percent(correct: int, n: int) -> float:
    return round(100.0 * correct / n, 4)


def _settings(cfg, n: int) -> dict:
    return {"threads": cfg.threads, "atol": cfg.atol, "max_int8_drop": cfg.max_int8_drop,
            "max_fp16_drop": cfg.max_fp16_drop, "parity_batches": list(cfg.parity_batches),
            "latency_runs": cfg.latency_runs, "throughput_batch": cfg.throughput_batch, "rounds": cfg.rounds,
            "seconds": cfg.seconds, "allow_weak": cfg.allow_weak, "test_images": n,
            "provider": "CPUExecutionProvider"}


def _num(v):
    """JSON-safe float: non-finite → None."""
    return float(v) if v is not None and math.isfinite(v) else None
