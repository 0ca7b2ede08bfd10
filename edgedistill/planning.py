"""The plan stage: time real distillation steps on this device, build the cost model, pick ``r``.

The pure cost model and the choice live in :mod:`edgedistill.budget`; this module only measures.
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from edgedistill import fsio
from edgedistill.budget import CostModel, choose_fraction, curve, from_step_timings
from edgedistill.data import EpochSampler, ImageDataset, make_loader, to_float
from edgedistill.errors import InputError
from edgedistill.objectives import Augmenter
from edgedistill.run import RunContext
from edgedistill.train import Precision, build_optimizer, evaluate

WARMUP_STEPS = 2


def plan(ctx: RunContext) -> dict:
    a, epochs = ctx.recipe.augment, ctx.recipe.distill.epochs
    cost = measure_cost(ctx)
    fraction, reason, budget = _decide(ctx, cost)
    rows = curve(cost, epochs, sorted({0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0} | ({fraction} if fraction else set())))
    r = fraction or 0.0
    result = {
        "fraction": fraction,
        "selection": a.selection,
        "method": a.method,
        "reason": reason,
        "budget": budget,
        "predicted_epoch_seconds": cost.epoch_seconds(r),
        "predicted_train_seconds": cost.epoch_seconds(r) - cost.eval_seconds,
        "predicted_overhead": cost.overhead(r),
        "predicted_total_minutes": cost.total_minutes(r, epochs),
        "curve": rows,
        "cost_model": cost.__dict__,
        "device": str(ctx.device),
    }
    if ctx.dist.is_main:
        fsio.write_json(ctx.run / "plan.json", result)
        from edgedistill.report import plan_table

        ctx.print(plan_table(result))
        ctx.print(f"HE-DA fraction: {fraction if fraction is not None else 'none'} — {reason}")
    return {"fraction": fraction, "predicted_epoch_seconds": result["predicted_epoch_seconds"]}


def _decide(ctx: RunContext, cost: CostModel) -> tuple[float | None, str, dict | None]:
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


def measure_cost(ctx: RunContext) -> CostModel:
    """Time ``augment.profile_steps`` real steps without and with one extra mixed sample per sample, in turns."""
    from edgedistill.stages import build_run_student, distill_objective

    steps = ctx.recipe.augment.profile_steps
    data, d = ctx.data, ctx.recipe.data
    device = ctx.device
    precision = Precision.for_device(device, ctx.recipe.distill.amp)
    channels_last = ctx.recipe.distill.channels_last and device.type == "cuda"

    train = ctx.train_set()
    sampler = EpochSampler(len(train), seed=ctx.recipe.seed, shuffle=True, rank=ctx.dist.rank, world=ctx.dist.world)
    loader = make_loader(train, d.batch_size, sampler, num_workers=d.num_workers, pin_memory=device.type == "cuda")
    n_batches = WARMUP_STEPS + steps
    t0 = time.perf_counter()
    batches = list(itertools.islice(itertools.cycle(loader) if len(loader) < n_batches else loader, n_batches))
    load_per_step = (time.perf_counter() - t0) / len(batches)
    batch_size = len(batches[0][1])

    student = build_run_student(ctx).to(device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    student.train()
    optimizer = build_optimizer(student, ctx.recipe.distill.optimizer)
    # plain: no extras whatever the selection mode ('all' ignores the fraction); extra: one per sample
    plain, extra = distill_objective(ctx, fraction=0.0), distill_objective(ctx, fraction=0.0)
    plain.augmenter = None
    extra.augmenter = Augmenter(ctx.recipe.augment.method, ctx.recipe.augment.alpha, "all", 1.0, ctx.recipe.seed)
    extra.augmenter.set_epoch(0)

    def step(objective, images, labels, indices):
        x = to_float(images, device, channels_last)
        with precision.autocast():
            losses, _ = objective(student, x, labels.to(device), indices, 0.0)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    def timed(*fns) -> list[float]:
        """Median seconds per step of each function, run in turn on the same batches.

        Taking turns exposes every function to the same background load, and the median drops the odd step
        that a noisy (shared) machine stalls: the plain-vs-extra difference is what the cost model rests on.
        """
        for b in batches[:WARMUP_STEPS]:
            for fn in fns:
                fn(*b)
        seconds = [[] for _ in fns]
        for b in batches[WARMUP_STEPS:]:
            for fn, out in zip(fns, seconds):
                _sync(device)
                t = time.perf_counter()
                fn(*b)
                _sync(device)
                out.append(time.perf_counter() - t)
        return [statistics.median(s) for s in seconds]

    plain_step, extra_step = (s + load_per_step for s in timed(lambda *b: step(plain, *b), lambda *b: step(extra, *b)))
    # the no-teacher baseline never runs the teacher, so its steps must not be charged for one
    teacher = ctx.teacher if plain.uses_teacher else (lambda x: x)
    with torch.no_grad():
        teacher_step, augment_step = timed(
            lambda images, *_: teacher(to_float(images, device, channels_last)),
            lambda images, *_: extra.augmenter(to_float(images, device, channels_last), torch.zeros(len(images))),
        )
    eval_seconds = _eval_seconds(ctx, student, precision)
    if not all(map(_finite, (plain_step, extra_step, teacher_step, augment_step))):
        raise InputError("plan: the profiling run produced no usable timings")
    return from_step_timings(
        n_train=len(data.train), batch_size=batch_size, plain_step_seconds=plain_step, extra_step_seconds=extra_step,
        extras_per_step=batch_size, augment_seconds_per_sample=augment_step / batch_size,
        teacher_seconds_per_sample=teacher_step / batch_size, eval_seconds=eval_seconds, world_size=ctx.dist.world,
    )


def _eval_seconds(ctx: RunContext, student, precision) -> float:
    """Time the test evaluation on a slice and scale it to the full test set."""
    test = ImageDataset(ctx.data.test, ctx.image_size, train=False)
    n = min(len(test), 2 * ctx.recipe.data.eval_batch_size)
    t = time.perf_counter()
    evaluate(student, _Sized(test, n), ctx.recipe.data.eval_batch_size, ctx.device, precision=precision)
    return (time.perf_counter() - t) * len(test) / max(n, 1) / ctx.dist.world


class _Sized(torch.utils.data.Dataset):
    """The first ``n`` samples of a dataset."""

    def __init__(self, ds, n: int):
        self.ds, self.n = ds, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))

