"""The pipeline's training stages, teacher to qat (the deployment ones: :mod:`edgedistill.pipeline.deploy_stages`).
Each is ``stage(ctx) -> summary``; it reads only what earlier stages wrote into the run folder and writes its own
artifacts atomically."""

from __future__ import annotations

import hashlib
import json
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
from edgedistill.pipeline.planning import measure_plan
from edgedistill.pipeline.report import budget_line, energy_table, plan_table
from edgedistill.deploy.targets import qat_weight_grid, torch_logits
from edgedistill.deploy.int8_fallback import judge
from edgedistill.distill.qat import QAT_FILE, QAT_STUDENT_FILE, QatSchedule, qat_train_config
from edgedistill.distill.train import class_tally, fit, top1_percent

log = logging.getLogger("edgedistill")

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
    speed, cost, qat = measure_plan(ctx)
    b = a.budget
    minutes = distill_minutes(b.max_minutes if b else None, qat)
    fraction, reason, budget = _decide(ctx, cost, minutes)
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
        "qat": qat,
    }
    if minutes is not None and cost.total_minutes(0.0, epochs) > minutes:
        # not even plain distillation fits: say how many epochs would (the controller will run at r = 0 and overrun)
        result["epochs_that_fit"] = max(0, int(60 * minutes // cost.epoch_seconds(0.0)))
    if ctx.dist.is_main:
        fsio.write_json(ctx.run / "plan.json", result)
        ctx.print(plan_table(result))
        ctx.print(f"HE-DA fraction: {fraction:g} — {reason}")
        ctx.print("student step: " + " · ".join(f"{key} {'on' if v['use'] else 'off'} ({v['why']})" for key, v in speed.items()))
        if qat is not None:
            ctx.print(f"qat: {qat['epochs']} epochs predicted at {qat['predicted_minutes']:.1f} min (a fake-quantised step costs "
                      f"{qat['step_ratio']:.2f}× a float one)" + (f", reserved out of augment.budget.max_minutes {b.max_minutes:g}"
                                                                    if minutes is not None else ""))
        if "epochs_that_fit" in result:
            ctx.print(f"[yellow]max_minutes {b.max_minutes:g} cannot be met even without HE-DA: "
                      f"{cost.total_minutes(0.0, epochs):.1f} min predicted; {result['epochs_that_fit']} epochs would fit[/]")
    return {"fraction": fraction, "predicted_epoch_seconds": result["predicted_epoch_seconds"]}


def distill_minutes(max_minutes: float | None, qat: dict | None) -> float | None:
    """What ``augment.budget.max_minutes`` leaves distillation: the qat stage's predicted minutes come out of it."""
    return None if max_minutes is None else max_minutes - (qat["predicted_minutes"] if qat else 0.0)


def _decide(ctx: RunContext, cost: CostModel, max_minutes: float | None) -> tuple[float, str, dict | None]:
    a, epochs = ctx.recipe.augment, ctx.recipe.distill.epochs
    if a.selection == "all":
        return 1.0, "selection 'all': ordinary augmentation of every sample (r = 1)", None
    if a.fraction != "auto":
        return float(a.fraction), "fixed by the recipe (augment.fraction)", None
    b = a.budget
    budget = {"max_overhead": b.max_overhead, "max_minutes": b.max_minutes, "range": list(b.range), "strict": b.strict}
    choice = choose_fraction(cost, epochs=epochs, max_overhead=b.max_overhead, max_minutes=max_minutes, lo=b.range[0], hi=b.range[1])
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
        objective, Goal(distill_minutes(b.max_minutes, plan.get("qat")), b.max_overhead, *b.range) if steering else None,
        CostModel(**plan["cost_model"]).costs(),
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


# ---------------------------------------------------------------- qat


def qat_stage(ctx: RunContext) -> dict:
    """``export.int8.method: qat`` (or ``auto``, when post-training int8 changes more held-out answers than
    ``validate.max_int8_drop``): a few epochs of the run's own distillation with int8 simulated
    (:mod:`edgedistill.distill.qat`); the int8 targets then quantise this student. Writes qat.json (and
    student.qat.pt, qat_metrics.jsonl when it trains)."""
    cfg, limit = ctx.recipe.export.int8, ctx.recipe.validate_.max_int8_drop
    if cfg.method == "ptq":
        ctx.print("int8 is post-training (export.int8.method: ptq): no quantisation-aware training")
        return {"method": "ptq", NOTHING_MADE: True}

    student = ctx.trained_student()
    calibration, held_out = ctx.int8_images()
    calibration = calibration[: cfg.calibration.samples]
    grid = qat_weight_grid(ctx.recipe.export.formats)
    fake, quantizer = ctx.fake_quant_student(student)
    fake.calibrate(calibration)
    reference = None if held_out is None else torch_logits(student, held_out)
    ptq = None if held_out is None else judge(torch_logits(fake.eval(), held_out), reference, held_out.labels)
    info = {"method": cfg.method, "granularity": cfg.granularity, "quantizer": quantizer, "weight_grid": list(grid), "limit": limit,
            "held_out_images": None if held_out is None else len(held_out.labels),
            "float_top1": None if held_out is None else _top1(reference, held_out.labels), "ptq": None if ptq is None else ptq.to_dict()}
    if cfg.method == "auto" and (ptq is None or ptq.changed <= limit):
        why = ("every training image calibrates int8, none is left to judge it" if ptq is None else
               f"post-training int8 changes {ptq.changed:.2f} % of the held-out answers, within validate.max_int8_drop {limit:g}")
        if ctx.dist.is_main:
            fsio.write_json(ctx.run / QAT_FILE, {**info, "trained": False, "reason": why})
        ctx.print(f"qat: not needed: {why}")
        return {"trained": False}
    why = "export.int8.method: qat" if cfg.method == "qat" else (
        f"post-training int8 changes {ptq.changed:.2f} % of the held-out answers, over validate.max_int8_drop {limit:g}")
    ctx.print(f"qat: {why}; {cfg.qat.epochs} epochs of quantisation-aware {ctx.recipe.distill.loss.name}")
    fraction = ctx.read_json("budget.json")["fractions"][-1]  # HE-DA as the budget left it at the end of distill
    train_cfg = qat_train_config(ctx.recipe.distill, cfg.qat)
    result = fit(fake.train(), ctx.objective(fraction), ctx.train_set(), ctx.test_set(), train_cfg,
                 ctx.loop("qat", ctx.run / "checkpoints" / "qat", ctx.run / "qat_metrics.jsonl", train_cfg), ctx.device, ctx.dist,
                 QatSchedule(fake, cfg.qat.freeze_bn_after, cfg.qat.freeze_observers_after))
    fake.cpu()
    planned = ctx.read_json("plan.json").get("qat")  # None: the plan priced post-training int8 (method changed since)
    student.load_state_dict(fake.float_state())
    # the int8 answers of the QAT student against its own float weights (what quantisation still changes), and its top-1
    after = None if held_out is None else judge(torch_logits(fake.eval(), held_out), torch_logits(student, held_out), held_out.labels)
    info |= {"trained": True, "reason": why, "epochs": cfg.qat.epochs, "fraction": fraction, "lr": train_cfg.optimizer.lr,
             "freeze_bn_after": cfg.qat.freeze_bn_after, "freeze_observers_after": cfg.qat.freeze_observers_after,
             "qat": None if after is None else after.to_dict(), "test_top1_simulated": result.final_top1,
             "seconds": sum(json.loads(line)["epoch_seconds"] for line in (ctx.run / "qat_metrics.jsonl").read_text().splitlines()),
             "predicted_seconds": None if planned is None else 60.0 * planned["predicted_minutes"]}
    if ctx.dist.is_main:
        with fsio.atomic_path(ctx.run / QAT_STUDENT_FILE) as tmp:
            torch.save({"model": fake.float_state(), "recipe": ctx.recipe.to_dict(), "class_names": ctx.data.class_names,
                        "image_size": ctx.image_size, "mean": ctx.data.mean, "std": ctx.data.std}, tmp)
        fsio.write_json(ctx.run / QAT_FILE, info)
    if after is not None:
        ctx.print(f"qat: held-out top-1 (int8 simulated): {ptq.top1:.2f} % post-training, {after.top1:.2f} % after QAT "
                  f"(float student {info['float_top1']:.2f} %); answers int8 changes: {ptq.changed:.2f} → {after.changed:.2f} %")
    return {"trained": True, "test_top1_simulated": result.final_top1}


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(logits.argmax(1) == labels))


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
