"""Objectives: what one training step optimises, for the method-agnostic loop in :mod:`edgedistill.distill.train`.

An objective is ``objective(model, images, labels, indices, epoch) -> (losses, logits)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgedistill.distill.augment import AUGMENTS, selection_mask
from edgedistill.distill.energy import EnergyIndex
from edgedistill.distill.losses import LossBatch
from edgedistill.distill.teacher_cache import LogitCache


class Objective:
    """What the loop calls. ``begin_step`` hands over the step's seed (see :func:`edgedistill.distill.train.step_seed`)
    for any randomness of the objective's own; ``state_dict`` is what a checkpoint keeps of it."""

    uses_teacher = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, indices: Tensor, epoch: float) -> tuple[dict[str, Tensor], Tensor]:
        raise NotImplementedError

    def begin_step(self, seed: int) -> None:
        pass

    def begin_epoch(self, epoch: int) -> None:
        pass

    def end_epoch(self, epoch: int, whole: bool) -> None:
        """``whole``: every step of the epoch ran in this process (it was not resumed part-way)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CrossEntropyObjective(Objective):
    """Plain supervised training (the in-pipeline teacher)."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, indices: Tensor, epoch: float):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        return {"loss": loss, "ce": loss.detach()}, logits


class Augmenter:
    """HE-DA: which samples of a batch get a mixed extra copy, and how it is mixed.

    Selection uses the energy ranking of the score stage (``selection`` high/low/mixed/all at
    fraction ``r``); the randomness (partners, boxes, λ) comes from its own generator, seeded at every
    step by the loop, so runs and resumes repeat exactly.
    """

    def __init__(self, method: str, alpha: float | None, selection: str, fraction: float):
        self.fn = AUGMENTS.get(method)
        self.alpha, self.selection, self.fraction = alpha, selection, fraction
        self.generator = torch.Generator()

    @property
    def active(self) -> bool:
        return self.selection == "all" or self.fraction > 0

    def seed(self, seed: int) -> None:
        # a stream of its own: seeded like the global RNG, its draws would mirror the step's dropout masks
        self.generator.manual_seed(seed + 1)

    def __call__(self, x: Tensor, quantile: Tensor):
        mask = selection_mask(quantile, self.selection, self.fraction).to(x.device)
        return self.fn(x, mask, generator=self.generator, alpha=self.alpha)


class DistillObjective(Objective):
    """Teacher → student logit distillation with a registered loss, energy groups and optional HE-DA.

    The mixed HE-DA images are *extra* samples (Kim et al., KBS 2024, §HE-DA): the teacher is
    run on them and the student learns them with the recipe's loss without a CE term (they
    have no single hard label), weighted by ``augment_weight``. Clean and mixed images go
    through the student in one forward pass (its BatchNorm sees them together); the frozen teacher sees them in
    two, so that its logits for the clean views never depend on the extras and can be replayed from a
    :class:`~edgedistill.distill.teacher_cache.LogitCache`.
    """

    def __init__(self, teacher: nn.Module, loss_fn, params: dict, energy: EnergyIndex, augmenter: Augmenter | None = None,
                 augment_weight: float = 1.0, cache: LogitCache | None = None):
        self.teacher, self.loss_fn, self.params, self.energy = teacher, loss_fn, params, energy
        self.cache = cache
        self.augmenter = augmenter
        self.last_extras = 0  # mixed samples in the last step: what a step's cost depends on
        self.augment_weight = augment_weight
        # a loss that never reads the teacher (the no-teacher baseline) skips its forward pass
        self.uses_teacher = getattr(loss_fn, "uses_teacher", True)

    def begin_step(self, seed: int) -> None:
        if self.augmenter:
            self.augmenter.seed(seed)

    def begin_epoch(self, epoch: int) -> None:
        if self.cache:
            self.cache.begin_epoch(epoch)

    def end_epoch(self, epoch: int, whole: bool) -> None:
        if self.cache:
            self.cache.end_epoch(epoch, whole)

    def set_fraction(self, fraction: float) -> None:
        """HE-DA's r from now on (the budget controller re-chooses it between epochs)."""
        if self.augmenter is None:
            raise ValueError("set_fraction: this objective was built without an augmenter")
        self.augmenter.fraction = fraction

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, indices: Tensor, epoch: float):
        b = len(x)
        mixed = self.augmenter(x, self.energy.static(indices)[1]) if self.augmenter and self.augmenter.active else None
        inputs = torch.cat([x, mixed.images.to(x.dtype)]) if mixed is not None and len(mixed.images) else x
        self.last_extras = len(inputs) - b
        student_all = model(inputs)
        if self.uses_teacher:
            teacher_all = self._clean_logits(x, indices)
            if len(inputs) > b:
                teacher_all = torch.cat([teacher_all, self._teacher(inputs[b:])])
        else:
            teacher_all = torch.zeros(student_all.shape, dtype=torch.float32, device=student_all.device)
        group, quantile = self.energy.lookup(indices, teacher_all[:b])
        out = self.loss_fn(LossBatch(student_all[:b], teacher_all[:b], y, group, quantile, epoch), **self.params)
        if len(inputs) > b:
            g, q = self.energy.lookup(None, teacher_all[b:])
            extra = self.loss_fn(LossBatch(student_all[b:], teacher_all[b:], None, g, q, epoch), **self.params)
            out = {**out, "loss": out["loss"] + self.augment_weight * extra["loss"], "mixed_loss": extra["loss"].detach()}
        return out, student_all[:b]

    def _teacher(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher(x).float()

    def _clean_logits(self, x: Tensor, indices: Tensor) -> Tensor:
        if self.cache is None:
            return self._teacher(x)
        stored = self.cache.lookup(indices)
        if stored is not None:
            return stored.to(x.device, non_blocking=True)
        logits = self._teacher(x)
        self.cache.record(indices, logits)
        return logits
