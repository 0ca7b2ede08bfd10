"""The pipeline's stages. Each is ``stage(ctx) -> summary``; it reads only what earlier stages wrote
into the run folder and writes its own artifacts atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from edgedistill import fsio
from edgedistill.console import progress_bar
from edgedistill.data import EpochSampler, ImageDataset, eval_arrays, make_loader, to_float
from edgedistill.distributed import all_gather_array, barrier
from edgedistill.energy import EnergyIndex, assign_groups, group_summary, plot_gallery, plot_histogram, score_loader
from edgedistill.errors import InputError
from edgedistill.losses import LOSSES
from edgedistill.models import Normalized, build_student, freeze, load_checkpoint, load_state, load_teacher
from edgedistill.objectives import Augmenter, CrossEntropyObjective, DistillObjective
from edgedistill.run import RunContext
from edgedistill.train import LoopConfig, evaluate, fit

# ---------------------------------------------------------------- teacher


def teacher_stage(ctx: RunContext) -> dict:
    """Load the teacher (or train it, for ``teacher.source: train``) and measure its test top-1."""
    cfg, data = ctx.recipe.teacher, ctx.data
    if cfg.source == "train":
        torch.manual_seed(ctx.recipe.seed)
        net = _trainable_teacher(ctx)
        ctx.print(f"training the teacher ({cfg.arch or 'resnet18'}, {cfg.train.epochs} epochs)")
        result = fit(
            net, CrossEntropyObjective(),
            ctx.train_set(),
            ImageDataset(data.test, ctx.image_size, train=False),
            cfg.train, _loop(ctx, "teacher", ctx.run / "checkpoints" / "teacher", ctx.run / "teacher_metrics.jsonl"),
            ctx.device, ctx.dist,
        )
        if ctx.dist.is_main:
            with fsio.atomic_path(ctx.run / "teacher.pt") as tmp:
                torch.save({"model": net.state_dict(), "arch": cfg.arch or "resnet18"}, tmp)
        top1 = result.final_top1
        # every rank reloads rank 0's file: under DDP the last step leaves each rank's BN statistics different
        barrier(ctx.dist)
        ctx.__dict__.pop("teacher", None)
    else:
        top1 = evaluate(ctx.teacher, ImageDataset(data.test, ctx.image_size, train=False), ctx.recipe.data.eval_batch_size, ctx.device, ctx.dist)
    info = {
        "source": cfg.source,
        "path": str(cfg.path) if cfg.path else str(ctx.run / "teacher.pt"),
        "arch": cfg.arch,
        "num_classes": data.num_classes,
        "parameters": sum(p.numel() for p in ctx.teacher.parameters()) or None,
        "test_top1": top1,
    }
    if ctx.dist.is_main:
        fsio.write_json(ctx.run / "teacher.json", info)
    ctx.print(f"teacher: {cfg.source} · test top-1 {top1:.2f}%")
    return {"test_top1": top1}


def load_run_teacher(ctx: RunContext) -> torch.nn.Module:
    cfg, data = ctx.recipe.teacher, ctx.data
    if cfg.source != "train":
        return load_teacher(cfg, data.num_classes, ctx.image_size).to(ctx.device)
    path = ctx.run / "teacher.pt"
    if not path.exists():
        ctx.run.require("teacher")
    net = _trainable_teacher(ctx)
    load_state(net, load_checkpoint(path)["model"], str(path))
    return freeze(net).to(ctx.device)


def _trainable_teacher(ctx: RunContext) -> torch.nn.Module:
    """The architecture of ``teacher.source: train``; without ``teacher.normalize`` it gets the data's statistics."""
    cfg, data = ctx.recipe.teacher, ctx.data
    net = load_teacher(cfg, data.num_classes, ctx.image_size)
    return Normalized(net, data.mean, data.std) if cfg.normalize is None else net


# ---------------------------------------------------------------- score


def score_stage(ctx: RunContext) -> dict:
    """Energy of every training image under the teacher (evaluation transform), groups, plots."""
    cfg, data = ctx.recipe.energy, ctx.data
    ds = ImageDataset(data.train, ctx.image_size, train=False)
    sampler = EpochSampler(len(ds), seed=0, shuffle=False, rank=ctx.dist.rank, world=ctx.dist.world)
    loader = make_loader(ds, ctx.recipe.data.eval_batch_size, sampler, num_workers=ctx.recipe.data.num_workers)
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
        "groups": summary,
    }
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
        fsio.write_bytes(ctx.run / "energy_gallery.png", _gallery(ctx, cols))
        from edgedistill.report import energy_table

        ctx.print(energy_table(info))
    return {"threshold_low": low, "threshold_high": high, **{f"{g}_size": s["size"] for g, s in summary.items()}}


def _gallery(ctx: RunContext, cols: dict) -> bytes:
    order = np.argsort(cols["energy"], kind="stable")
    picks = np.concatenate([order[:16], order[-16:]]) if len(order) >= 32 else order
    ds = ImageDataset(ctx.data.train, ctx.image_size, train=False)
    images = [ds[int(cols["index"][i])][0].permute(1, 2, 0).numpy() for i in picks]
    return plot_gallery(images, cols["label"][picks], cols["teacher_pred"][picks], cols["energy"][picks], ctx.data.class_names)


def load_energy_index(ctx: RunContext) -> EnergyIndex:
    path = ctx.run.require("score", "energy.npz")
    info = json.loads((ctx.run / "energy.json").read_text())
    with np.load(path) as z:
        return EnergyIndex.from_scores(z["energy"], z["index"], z["group"], info["threshold_low"], info["threshold_high"], ctx.recipe.energy)


# ---------------------------------------------------------------- plan


def plan_stage(ctx: RunContext) -> dict:
    from edgedistill.planning import plan

    return plan(ctx)


# ---------------------------------------------------------------- distill


def build_run_student(ctx: RunContext) -> torch.nn.Module:
    s, data = ctx.recipe.student, ctx.data
    torch.manual_seed(ctx.recipe.seed)  # the initial weights are part of what the seed fixes
    return build_student(s.arch, data.num_classes, image_size=ctx.image_size, mean=data.mean, std=data.std, width=s.width, small_input=s.small_input, dropout=s.dropout)


def distill_objective(ctx: RunContext, fraction: float) -> DistillObjective:
    a, loss = ctx.recipe.augment, ctx.recipe.distill.loss
    augmenter = Augmenter(a.method, a.alpha, a.selection, fraction, ctx.recipe.seed)
    return DistillObjective(ctx.teacher, LOSSES.get(loss.name), loss.params, load_energy_index(ctx).to(ctx.device), augmenter, a.weight)


def distill_stage(ctx: RunContext) -> dict:
    """Train the student against the teacher with the recipe's loss and the planned HE-DA fraction."""
    plan = json.loads(ctx.run.require("plan", "plan.json").read_text())
    fraction = plan["fraction"] or 0.0
    student = build_run_student(ctx)
    data = ctx.data
    result = fit(
        student, distill_objective(ctx, fraction),
        ctx.train_set(),
        ImageDataset(data.test, ctx.image_size, train=False),
        ctx.recipe.distill, _loop(ctx, "distill", ctx.run / "checkpoints", ctx.run / "metrics.jsonl"),
        ctx.device, ctx.dist,
    )
    if ctx.dist.is_main:
        with fsio.atomic_path(ctx.run / "student.pt") as tmp:
            torch.save({"model": student.state_dict(), "recipe": ctx.recipe.to_dict(), "class_names": data.class_names,
                        "image_size": ctx.image_size, "mean": data.mean, "std": data.std}, tmp)
    seconds = [e["epoch_seconds"] for e in result.epochs]
    return {
        "test_top1": result.final_top1,
        "best_top1": result.best_top1,
        "fraction": fraction,
        "mean_epoch_seconds": float(np.mean(seconds)) if seconds else None,
    }


def load_run_student(ctx: RunContext) -> torch.nn.Module:
    path = ctx.run.require("distill", "student.pt")
    student = build_run_student(ctx)
    load_state(student, load_checkpoint(path)["model"], str(path))
    return student.eval()


def _loop(ctx: RunContext, label: str, checkpoint_dir: Path, metrics: Path) -> LoopConfig:
    d = ctx.recipe.data
    return LoopConfig(checkpoint_dir, metrics, d.batch_size, d.eval_batch_size, ctx.recipe.seed, d.num_workers, ctx.resume, ctx.recipe.to_dict(), label)


# ---------------------------------------------------------------- export, validate, report


def export_stage(ctx: RunContext) -> dict:
    from edgedistill.export import class_balanced_sample, export_variants, onnx_metadata

    if not ctx.dist.is_main:
        return {}
    student, data, cfg = load_run_student(ctx), ctx.data, ctx.recipe.export
    calib_idx = class_balanced_sample(data.train.labels, cfg.calibration.samples, ctx.recipe.seed)
    calib, _ = eval_arrays(data.train, ctx.image_size, indices=calib_idx)
    meta = onnx_metadata(data.class_names, ctx.image_size, data.mean, data.std, ctx.recipe.digest())
    paths = export_variants(student, ctx.run.root, cfg, image_size=ctx.image_size, calibration_images=calib, metadata=meta)
    return {name: str(p) for name, p in paths.items()}


def validate_stage(ctx: RunContext) -> dict:
    from edgedistill.validate import validate_variants, validation_table

    if not ctx.dist.is_main:
        return {}
    variants = {k: Path(v) for k, v in ctx.run.summary("export").items()} if ctx.run.done("export") else {}
    if not variants:
        ctx.run.require("export")
    student = load_run_student(ctx)
    test_x, test_y = eval_arrays(ctx.data.test, ctx.image_size)
    results = validate_variants(student, variants, test_x, test_y, ctx.recipe.validate_)
    fsio.write_json(ctx.run / "validation.json", results)
    ctx.print(validation_table(results))
    return {"passed": results["passed"]}


def validate_files(ctx: RunContext, files: list[Path]) -> None:
    """Validate ONNX files the user gives (no PyTorch model: accuracy, latency, size) on the recipe's test split."""
    from edgedistill.validate import check_gates, validate_onnx_file, validation_table

    for f in files:
        if not Path(f).is_file():
            raise InputError(f"--onnx: {f} not found")
    test_x, test_y = eval_arrays(ctx.data.test, ctx.image_size)
    results = [validate_onnx_file(f, test_x, test_y, ctx.recipe.validate_) for f in files]
    merged = {"passed": all(r["passed"] for r in results), "variants": {k: v for r in results for k, v in r["variants"].items()}}
    fsio.write_json(ctx.run / "validation.files.json", merged)
    ctx.print(validation_table(merged))
    check_gates(merged)


def report_stage(ctx: RunContext) -> dict:
    from edgedistill.report import write_report

    if not ctx.dist.is_main:
        return {}
    return write_report(ctx)
