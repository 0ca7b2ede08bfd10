"""The pipeline's stages. Each is ``stage(ctx) -> summary``; it reads only what earlier stages wrote
into the run folder and writes its own artifacts atomically."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgedistill.base import fsio
from edgedistill.base.chance import chance_bar
from edgedistill.budget.cost import DEFAULT_CURVE_RS, CostModel, choose_fraction, curve
from edgedistill.budget.controller import BudgetHook, Goal
from edgedistill.base.console import progress_bar
from edgedistill.pipeline.context import RunContext
from edgedistill.data.loading import EpochSampler, ImageDataset, make_loader, to_float
from edgedistill.base.distributed import all_gather_array, barrier, broadcast_value
from edgedistill.distill.energy import GROUP_GAP, assign_groups, group_summary, groups_apart, plot_gallery, plot_histogram, score_loader
from edgedistill.base.errors import InputError
from edgedistill.base.shots import shot_top1
from edgedistill.pipeline.folder import NOTHING_MADE, SKIPPED_FILE
from edgedistill.models.students import DEFAULT_TEACHER_ARCH
from edgedistill.distill.objectives import CrossEntropyObjective
from edgedistill.deploy.pick import CHOICE_FILE, PLOT_FILE, chosen_student, pick
from edgedistill.deploy.pick_view import choice_plot, pick_table
from edgedistill.recipe.deploy import AUTO
from edgedistill.pipeline.planning import measure_plan
from edgedistill.pipeline.report import budget_line, energy_table, plan_table, summary_table, write_report
from edgedistill.deploy.targets import TARGETS, export_all, onnx_metadata
from edgedistill.distill.train import class_tally, fit, top1_percent
from edgedistill.deploy.validate import check_gates, onnx_file_problem, validate_export, validate_onnx_file
from edgedistill.deploy.validate_view import validation_table
from edgedistill.deploy.int8_view import SENSITIVITY_FILE, SENSITIVITY_PLOT, sensitivity_lines, sensitivity_of, sensitivity_plot

log = logging.getLogger("edgedistill")

# ---------------------------------------------------------------- pick


def pick_stage(ctx: RunContext) -> dict:
    """``student.arch: auto``: time every candidate student on this machine and choose the largest that fits the target.
    On a run that has trained, a new choice is only shown: the trained student stays the run's student."""
    s, data = ctx.recipe.student, ctx.data
    if s.arch != AUTO:
        ctx.print(f"student fixed by the recipe: {s.arch} (width {s.width:g}); student.arch: auto picks one for student.target")
        return {"arch": s.arch, "width": s.width, "picked": False, NOTHING_MADE: True}
    if not ctx.dist.is_main:
        return {}
    from edgedistill.deploy.candidates import time_candidates

    table = time_candidates(s.target.candidate_archs(), s.target, num_classes=data.num_classes, image_size=ctx.image_size, mean=data.mean,
                            std=data.std, small_input=s.small_input, metadata=_student_metadata(ctx),
                            calibration_method=ctx.recipe.export.int8.calibration.method, seed=ctx.recipe.seed,
                            progress=lambda m: ctx.print(f"[dim]{m}[/]"))
    if not table["rows"]:
        raise InputError(f"student.target: no candidate builds and exports at {ctx.image_size} px: "
                         + "; ".join(f"{r['arch']}: {r['reason']}" for r in table["skipped"]))
    result = {**pick(table["rows"], s.target), "target": table["target"], "settings": table["settings"], "skipped": table["skipped"]}
    ctx.print(pick_table(result))
    path = ctx.run / CHOICE_FILE
    if ctx.run.done("distill") and path.exists() and chosen_student(path) != (result["arch"], result["width"]):
        ctx.print(f"[yellow]today's pick would be {result['reason']}; this run trained {chosen_student(path)[0]} and keeps it "
                  "(pick for a new run with --out)[/]")
        return {"arch": chosen_student(path)[0], "width": chosen_student(path)[1], "picked": True, "what_if": result["arch"]}
    fsio.write_json(path, result)
    fsio.write_bytes(ctx.run / PLOT_FILE, choice_plot(result))
    ctx.print(f"student: {result['reason']}")
    return {"arch": result["arch"], "width": result["width"], "picked": True}


# ---------------------------------------------------------------- teacher

PROBE_IMAGES = 256


def _fingerprint(path: Path, fast: nn.Module, probe: np.ndarray, device: torch.device) -> dict:
    """The teacher file's SHA-256 and that of its float32 logits on the first test images through its runtime:
    what tells a re-run whose numbers drift whether the teacher (or the library running it) changed."""
    with torch.inference_mode():
        logits = fast(torch.from_numpy(probe).to(device)).float().cpu().numpy()
    return {"file_sha256": fsio.sha256(path), "probe": {"images": len(probe), "logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest()}}



def teacher_stage(ctx: RunContext) -> dict:
    """Load the teacher (or train it, for a source trained in the pipeline) and measure its test top-1. The first stage
    to read the data: it records the image files ``data.on_bad_image: skip`` left out."""
    cfg = ctx.recipe.teacher
    if ctx.data.skipped:
        if ctx.dist.is_main:
            fsio.write_json(ctx.run / SKIPPED_FILE, ctx.data.skipped)
        ctx.print(f"[yellow]{len(ctx.data.skipped)} unreadable image files left out (data.on_bad_image: skip), listed in {SKIPPED_FILE}; "
                  f"the first: {ctx.data.skipped[0]['path']}: {ctx.data.skipped[0]['why']}[/]")
    if ctx.teacher_trained_here:
        torch.manual_seed(ctx.recipe.seed)
        net = ctx.new_teacher()
        arch = cfg.arch or DEFAULT_TEACHER_ARCH
        ctx.print(f"training the teacher ({arch}, {cfg.train.epochs} epochs)")
        fit(
            net, CrossEntropyObjective(), ctx.train_set(), ctx.test_set(), cfg.train,
            ctx.loop("teacher", ctx.run / "checkpoints" / "teacher", ctx.run / "teacher_metrics.jsonl", cfg.train), ctx.device, ctx.dist,
        )
        if ctx.dist.is_main:
            with fsio.atomic_path(ctx.run / "teacher.pt") as tmp:
                torch.save({"model": net.state_dict(), "arch": arch}, tmp)
        # every rank reads rank 0's file: under DDP the last step leaves each rank's BN statistics different
        barrier(ctx.dist)
        net = ctx.trained_teacher(ctx.run / "teacher.pt")
    else:
        net = ctx.eager_teacher()
    fast, runtime = ctx.choose_teacher_runtime(net)
    # measured through the chosen runtime: the teacher that scores and distills is the one whose accuracy is shown
    correct, seen = class_tally(fast, ctx.test_set(), ctx.recipe.data.eval_batch_size, ctx.device, ctx.dist)
    top1 = top1_percent(correct, seen)
    chance = chance_bar(ctx.data.test.labels, ctx.data.num_classes)
    if not chance.clears(top1) and not cfg.allow_weak:
        # before teacher.json: a stage that stops here has not finished, and a fixed teacher is taken by a new run
        raise InputError(f"teacher: test {chance.why(top1)}; distilling from it would teach the student nothing. Check the "
                         "teacher (its file, teacher.normalize, the data's classes) or set teacher.allow_weak: true to go on")
    path = Path(cfg.path) if cfg.path else ctx.run / "teacher.pt"
    info = {
        "source": cfg.source,
        "path": str(path),
        **_fingerprint(path, fast, ctx.test_images().head(PROBE_IMAGES), ctx.device),
        "arch": cfg.arch,
        "num_classes": ctx.data.num_classes,
        "parameters": sum(p.numel() for p in net.parameters()) or None,
        "test_top1": top1,
        **({"shot_top1": shot_top1(correct, seen, ctx.shot_groups)} if ctx.shot_groups else {}),
        "chance": chance.to_dict(),
        "runtime": runtime,
    }
    if ctx.dist.is_main:
        fsio.write_json(ctx.run / "teacher.json", info)
    layout = ", channels_last" if runtime["channels_last"] else ""
    ms = next(c["ms_per_batch"] for c in runtime["candidates"] if (c["runtime"], c["channels_last"]) == (runtime["runtime"], runtime["channels_last"]))
    ctx.print(f"teacher: {cfg.source} · test top-1 {top1:.2f}% · runs in {runtime['runtime']}{layout} "
              f"({ms:.1f} ms per batch of {runtime['batch']}; chosen in {runtime['choice_seconds']:.1f} s)")
    return {"test_top1": top1, "runtime": runtime["runtime"]}


# ---------------------------------------------------------------- score


def score_stage(ctx: RunContext) -> dict:
    """Energy of every training image under the teacher (evaluation transform), groups, plots."""
    cfg, data = ctx.recipe.energy, ctx.data
    ds = ImageDataset(data.train, ctx.image_size, train=False)
    sampler = EpochSampler(len(ds), seed=0, shuffle=False, rank=ctx.dist.rank, world=ctx.dist.world)
    loader = make_loader(ds, ctx.recipe.data.eval_batch_size, sampler, num_workers=ctx.num_workers)
    with progress_bar(ctx.dist.is_main) as progress:
        cols = score_loader(ctx.teacher, loader, ctx.device, to_float, cfg.temperature, progress)
    if ctx.dist.enabled:  # gather the shards; padding repeats a few indices, keep the first of each
        cols = {k: all_gather_array(ctx.dist, torch.from_numpy(v)).numpy() for k, v in cols.items()}
        _, first = np.unique(cols["index"], return_index=True)
        cols = {k: v[first] for k, v in cols.items()}
    order = np.argsort(cols["index"])
    cols = {k: v[order] for k, v in cols.items()}
    groups, low, high = assign_groups(cols["energy"], cfg.fraction)
    correct = cols["teacher_pred"] == cols["label"]
    summary = group_summary(groups, cols["energy"], cols["confidence"], correct)
    info = {
        "temperature": cfg.temperature,
        "fraction": cfg.fraction,
        "threshold_low": low,
        "threshold_high": high,
        "num_samples": int(len(groups)),
        "teacher_train_accuracy": float(100 * correct.mean()),
        "groups_apart": groups_apart(cols["energy"], groups, cfg.temperature),
        "groups": summary,
    }
    if not info["groups_apart"]:
        log.warning("score: the low- and high-energy groups cannot be told apart (their median energies differ by less "
                    "than %g·T): the teacher is about as unsure of every image, so Energy KD's two temperatures and HE-DA's "
                    "selection fall on arbitrary images; check the teacher", GROUP_GAP)
    if ctx.dist.is_main:
        with fsio.atomic_path(ctx.run / "energy.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f, energy=cols["energy"].astype(np.float32), index=cols["index"].astype(np.int64),
                    label=cols["label"].astype(np.int64), teacher_pred=cols["teacher_pred"].astype(np.int64),
                    confidence=cols["confidence"].astype(np.float32), group=groups,
                )
        fsio.write_json(ctx.run / "energy.json", info)
        fsio.write_bytes(ctx.run / "energy_hist.png", plot_histogram(cols["energy"], groups, low, high, cfg.temperature))
        fsio.write_bytes(ctx.run / "energy_gallery.png", _gallery(ctx, ds, cols))
        ctx.print(energy_table(info))
    return {"threshold_low": low, "threshold_high": high, **{f"{g}_size": s["size"] for g, s in summary.items()}}


def _gallery(ctx: RunContext, ds: ImageDataset, cols: dict) -> bytes:
    order = np.argsort(cols["energy"], kind="stable")
    picks = np.concatenate([order[:16], order[-16:]]) if len(order) >= 32 else order
    images = [ds[int(cols["index"][i])][0].permute(1, 2, 0).numpy() for i in picks]
    return plot_gallery(images, cols["label"][picks], cols["teacher_pred"][picks], cols["energy"][picks], ctx.data.class_names)


# ---------------------------------------------------------------- plan


def plan_stage(ctx: RunContext) -> dict:
    """Measure what a step costs on this device and pick the HE-DA fraction the budget allows."""
    a, epochs = ctx.recipe.augment, ctx.recipe.distill.epochs
    speed, cost = measure_plan(ctx)
    fraction, reason, budget = _decide(ctx, cost)
    result = {
        "fraction": fraction,
        "selection": a.selection,
        "method": a.method,
        "reason": reason,
        "budget": budget,
        "predicted_epoch_seconds": cost.epoch_seconds(fraction),
        "predicted_train_seconds": cost.epoch_seconds(fraction) - cost.eval_seconds,
        "predicted_overhead": cost.overhead(fraction),
        "predicted_total_minutes": cost.total_minutes(fraction, epochs),
        "curve": curve(cost, epochs, sorted({*DEFAULT_CURVE_RS, fraction})),
        "cost_model": asdict(cost),
        "device": str(ctx.device),
        "speed": speed,
    }
    b = a.budget
    if b is not None and b.max_minutes is not None and cost.total_minutes(0.0, epochs) > b.max_minutes:
        # not even plain distillation fits: say how many epochs would (the controller will run at r = 0 and overrun)
        result["epochs_that_fit"] = int(60 * b.max_minutes // cost.epoch_seconds(0.0))
    if ctx.dist.is_main:
        fsio.write_json(ctx.run / "plan.json", result)
        ctx.print(plan_table(result))
        ctx.print(f"HE-DA fraction: {fraction:g} — {reason}")
        ctx.print("student step: " + " · ".join(f"{key} {'on' if v['use'] else 'off'} ({v['why']})" for key, v in speed.items()))
        if "epochs_that_fit" in result:
            ctx.print(f"[yellow]max_minutes {b.max_minutes:g} cannot be met even without HE-DA: "
                      f"{cost.total_minutes(0.0, epochs):.1f} min predicted; {result['epochs_that_fit']} epochs would fit[/]")
    return {"fraction": fraction, "predicted_epoch_seconds": result["predicted_epoch_seconds"]}


def _decide(ctx: RunContext, cost: CostModel) -> tuple[float, str, dict | None]:
    a, epochs = ctx.recipe.augment, ctx.recipe.distill.epochs
    if a.selection == "all":
        return 1.0, "selection 'all': ordinary augmentation of every sample (r = 1)", None
    if a.fraction != "auto":
        return float(a.fraction), "fixed by the recipe (augment.fraction)", None
    b = a.budget
    budget = {"max_overhead": b.max_overhead, "max_minutes": b.max_minutes, "range": list(b.range), "strict": b.strict}
    choice = choose_fraction(cost, epochs=epochs, max_overhead=b.max_overhead, max_minutes=b.max_minutes, lo=b.range[0], hi=b.range[1])
    if choice.fraction is None:
        if b.strict:
            raise InputError(f"augment.budget: {choice.reason} (strict: true)")
        return 0.0, f"{choice.reason}; running without HE-DA", budget
    return choice.fraction, choice.reason, budget


# ---------------------------------------------------------------- distill

PREDICTION_KEYS = ("fraction", "predicted_epoch_seconds", "predicted_overhead", "predicted_total_minutes")


def distill_stage(ctx: RunContext) -> dict:
    """Train the student against the teacher with the recipe's loss and HE-DA; with ``fraction: auto`` the budget
    controller re-chooses r before every epoch from what the steps really cost. Writes budget.json."""
    plan = ctx.read_json("plan.json")
    student, data, b = ctx.build_student(), ctx.data, ctx.recipe.augment.budget
    objective = ctx.objective(plan["fraction"])
    steering = ctx.recipe.augment.fraction == "auto"
    if objective.cache is not None:
        c, epochs = objective.cache, ctx.recipe.distill.epochs
        replayed = c.cached_epochs(epochs)
        ctx.print(f"teacher logit cache: {c.dir} · {c.bytes_per_epoch() / 1e6:.1f} MB per epoch, "
                  f"{c.bytes_per_epoch() * epochs / 1e6:.0f} MB for {epochs} · replaying {len(replayed)} of {epochs} epochs")
    train_set = ctx.train_set()
    steps = math.ceil(math.ceil(len(train_set) / ctx.dist.world) / ctx.recipe.data.batch_size)
    hook = BudgetHook(
        objective, Goal(b.max_minutes, b.max_overhead, *b.range) if steering else None, CostModel(**plan["cost_model"]).costs(),
        epochs=ctx.recipe.distill.epochs, steps_per_epoch=steps, batch_size=ctx.recipe.data.batch_size,
        first_fraction=plan["fraction"], agree=lambda r: broadcast_value(ctx.dist, r),
    )
    result = fit(student, objective, train_set, ctx.test_set(), ctx.recipe.distill,
                 ctx.loop("distill", ctx.run / "checkpoints", ctx.run / "metrics.jsonl", ctx.recipe.distill, plan.get("speed")), ctx.device, ctx.dist, hook)
    budget = {**hook.verdict(), "budget": plan["budget"], "prediction": {k: plan[k] for k in PREDICTION_KEYS}}
    if ctx.dist.is_main:
        with fsio.atomic_path(ctx.run / "student.pt") as tmp:
            torch.save({"model": student.state_dict(), "recipe": ctx.recipe.to_dict(), "class_names": data.class_names,
                        "image_size": ctx.image_size, "mean": data.mean, "std": data.std}, tmp)
        fsio.write_json(ctx.run / "budget.json", budget)
        ctx.print(budget_line(budget))
    seconds = [e["epoch_seconds"] for e in result.epochs]
    return {
        "test_top1": result.final_top1,
        "best_top1": result.best_top1,
        "fractions": budget["fractions"],
        "budget_verdict": budget["verdict"],
        "mean_epoch_seconds": float(np.mean(seconds)) if seconds else None,
    }


# ---------------------------------------------------------------- export, validate, report


def export_stage(ctx: RunContext) -> dict:
    if not ctx.dist.is_main:
        return {}
    cfg = ctx.recipe.export
    calibration, held_out = ctx.int8_images()
    if held_out is None and any(TARGETS.get(f).precision == "int8" for f in cfg.formats):
        ctx.print("[yellow]int8: every training image calibrates it, none is left to judge it: no fallback[/]")
    summary = export_all(ctx.trained_student(), ctx.run.root, cfg, image_size=ctx.image_size, calibration_images=calibration,
                         metadata=_student_metadata(ctx), held_out=held_out, max_int8_drop=ctx.recipe.validate_.max_int8_drop,
                         progress=lambda m: ctx.print(f"[dim]{m}[/]"))
    for name, reason in summary["failed"].items():
        ctx.print(f"[yellow]{name}: not built: {reason}[/] (validation fails it; the other targets are built)", highlight=False)
    if judged := sensitivity_of(summary):
        fsio.write_json(ctx.run / SENSITIVITY_FILE, judged)
        if any(r.get("sensitivity") for r in judged.values()):
            fsio.write_bytes(ctx.run / SENSITIVITY_PLOT, sensitivity_plot(judged))
        for line in sensitivity_lines(judged, top=0):
            ctx.print(line.replace("**", ""), highlight=False)
    return {"targets": sorted(summary["variants"]), "failed": sorted(summary["failed"])}


def _student_metadata(ctx: RunContext) -> dict[str, str]:
    """What the student's files say about their input and classes (the picker's candidates carry it too)."""
    data = ctx.data
    return onnx_metadata(data.class_names, ctx.image_size, data.mean, data.std, ctx.recipe.digest())


def validate_stage(ctx: RunContext) -> dict:
    if not ctx.dist.is_main:
        return {}
    ctx.run.require("export")
    # the teacher, timed beside the student on the CPU where the files are validated, for the report's compression table
    results = validate_export(ctx.trained_student(), ctx.run.root, ctx.read_json("export.json"), ctx.test_images(), ctx.recipe.validate_,
                              teacher=ctx.eager_teacher().cpu().eval(), device_target=ctx.recipe.student.target,
                              shot_groups=ctx.shot_groups)
    fsio.write_json(ctx.run / "validation.json", results)
    ctx.print(validation_table(results))
    for rec in results["recommendations"]:
        ctx.print(rec["line"], highlight=False)
    return {"passed": results["passed"], "ship": {r["kind"]: r["variant"] for r in results["recommendations"]}}


def validate_files(ctx: RunContext, files: list[Path]) -> None:
    """Validate ONNX files the user gives (no PyTorch model: accuracy, latency, size) on the recipe's test split.

    A file ONNX Runtime cannot load, or whose input does not take the recipe's images, is bad input (exit 2):
    a gate failure (exit 1) is for models that run but fall short.
    """
    for f in files:
        problem = onnx_file_problem(f, ctx.image_size)
        if problem:
            raise InputError(f"--onnx: {f}: {problem}")
    results = [validate_onnx_file(f, ctx.test_images(), ctx.recipe.validate_) for f in files]
    merged = {"passed": all(r["passed"] for r in results), "settings": results[0]["settings"],
              "variants": {k: v for r in results for k, v in r["variants"].items()}}
    fsio.write_json(ctx.run / "validation.files.json", merged)
    ctx.print(validation_table(merged))
    check_gates(merged)


def baseline_stage(ctx: RunContext) -> dict:
    """``report.baseline: ce``: the same student trained with cross-entropy alone, same schedule (baseline.json)."""
    if ctx.recipe.report.baseline is None:
        ctx.print("no baseline asked for (report.baseline)")
        return {"baseline": None, NOTHING_MADE: True}
    net = ctx.build_student()
    result = fit(net, CrossEntropyObjective(), ctx.train_set(), ctx.test_set(), ctx.recipe.distill,
                 ctx.loop("baseline", ctx.run / "checkpoints" / "baseline", ctx.run / "baseline_metrics.jsonl", ctx.recipe.distill),
                 ctx.device, ctx.dist)
    info = {"loss": ctx.recipe.report.baseline, "test_top1": result.final_top1, "best_top1": result.best_top1,
            "epochs": ctx.recipe.distill.epochs}
    if ctx.dist.is_main:
        fsio.write_json(ctx.run / "baseline.json", info)
    ctx.print(f"baseline (no teacher, {info['loss']}): test top-1 {info['test_top1']:.2f}%")
    return info


def report_stage(ctx: RunContext) -> dict:
    if not ctx.dist.is_main:
        return {}
    summary = write_report(ctx.run.root, ctx.recipe)
    ctx.print(summary_table(ctx.run.root))
    return summary
