"""Time real distillation steps on this device and turn them into a cost model.

The pure cost model and the choice of ``r`` live in :mod:`edgedistill.budget`; this module only measures.
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch

from edgedistill.budget import CostModel, from_step_timings
from edgedistill.context import RunContext
from edgedistill.data import EpochSampler, make_loader, to_float
from edgedistill.errors import InputError
from edgedistill.objectives import Augmenter
from edgedistill.train import Precision, build_optimizer, evaluate

WARMUP_STEPS = 2


def measure_cost(ctx: RunContext) -> CostModel:
    """Time ``augment.profile_steps`` real steps without and with one extra mixed sample per sample, in turns.

    Nothing needs to be trained or scored first: a step costs the same with untrained weights and any energies.
    """
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

    student = ctx.build_student().to(device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
    student.train()
    optimizer = build_optimizer(student, ctx.recipe.distill.optimizer)
    # plain: no extras whatever the selection mode ('all' ignores the fraction); extra: one per sample
    plain = ctx.timing_objective(None)
    extra = ctx.timing_objective(Augmenter(ctx.recipe.augment.method, ctx.recipe.augment.alpha, "all", 1.0))
    extra.augmenter.seed(ctx.recipe.seed)

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
    teacher = plain.teacher if plain.uses_teacher else (lambda x: x)
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
    test = ctx.test_set()
    n = min(len(test), 2 * ctx.recipe.data.eval_batch_size)
    t = time.perf_counter()
    evaluate(student, torch.utils.data.Subset(test, range(n)), ctx.recipe.data.eval_batch_size, ctx.device, precision=precision)
    return (time.perf_counter() - t) * len(test) / max(n, 1) / ctx.dist.world


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))

