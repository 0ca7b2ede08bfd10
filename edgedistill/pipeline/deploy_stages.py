"""The pipeline's deployment stages: picking the student for a device, exporting it, validating the files, the report.
Each is ``stage(ctx) -> summary``, like the training stages of :mod:`edgedistill.pipeline.stages`."""

from __future__ import annotations

from pathlib import Path

from edgedistill.base import fsio
from edgedistill.base.errors import InputError
from edgedistill.deploy.int8_view import SENSITIVITY_FILE, SENSITIVITY_PLOT, sensitivity_lines, sensitivity_of, sensitivity_plot
from edgedistill.deploy.pick import CHOICE_FILE, PLOT_FILE, chosen_student, pick
from edgedistill.deploy.pick_view import choice_plot, pick_table
from edgedistill.deploy.targets import TARGETS, export_all, onnx_metadata
from edgedistill.deploy.validate import check_gates, onnx_file_problem, validate_export, validate_onnx_file
from edgedistill.deploy.validate_view import validation_table
from edgedistill.pipeline.context import RunContext
from edgedistill.pipeline.folder import NOTHING_MADE
from edgedistill.pipeline.report import summary_table, write_report
from edgedistill.recipe.deploy import AUTO

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
                         int8_model=ctx.qat_student(), progress=lambda m: ctx.print(f"[dim]{m}[/]"))
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


def report_stage(ctx: RunContext) -> dict:
    if not ctx.dist.is_main:
        return {}
    summary = write_report(ctx.run.root, ctx.recipe)
    ctx.print(summary_table(ctx.run.root))
    return summary
