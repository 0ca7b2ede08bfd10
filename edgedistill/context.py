"""What every stage receives: the recipe, the run folder, the device, and the builders of the run's parts.

The context knows how to build the teacher, the student, the datasets and the training objective from the
recipe and the files earlier stages left in the run folder. It knows no stage: stages depend on it, never
the other way round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgedistill.console import console
from edgedistill.data import DataBundle, ImageDataset, load_data
from edgedistill.distributed import DistInfo
from edgedistill.energy import EnergyIndex
from edgedistill.folder import RunFolder
from edgedistill.losses import LOSSES
from edgedistill.models import TEACHERS, build_student, freeze, load_checkpoint, load_state, load_teacher
from edgedistill.objectives import Augmenter, DistillObjective
from edgedistill.recipe import Recipe
from edgedistill.train import LoopConfig, select_device


@dataclass
class RunContext:
    recipe: Recipe
    run: RunFolder
    dist: DistInfo = field(default_factory=DistInfo)
    resume: bool = False

    @cached_property
    def device(self) -> torch.device:
        return select_device(self.recipe.device, self.dist)

    @cached_property
    def data(self) -> DataBundle:
        return load_data(self.recipe.data, self.recipe.seed)

    @property
    def image_size(self) -> int:
        return self.data.image_size

    @property
    def teacher_trained_here(self) -> bool:
        return TEACHERS.get(self.recipe.teacher.source).trained_here

    def new_teacher(self) -> nn.Module:
        """The teacher as its source gives it: a loaded file, or an untrained architecture to train here."""
        return load_teacher(self.recipe.teacher, self.data.num_classes, self.image_size, self.data.mean, self.data.std)

    @cached_property
    def teacher(self) -> nn.Module:
        """The frozen teacher on the device; one trained in the pipeline is read from the teacher stage's file."""
        net = self.new_teacher()
        if self.teacher_trained_here:
            path = self.run.require("teacher", "teacher.pt")
            load_state(net, load_checkpoint(path)["model"], str(path))
            freeze(net)
        return net.to(self.device)

    def build_student(self) -> nn.Module:
        s, data = self.recipe.student, self.data
        torch.manual_seed(self.recipe.seed)  # the initial weights are part of what the seed fixes
        return build_student(
            s.arch, data.num_classes, image_size=self.image_size, mean=data.mean, std=data.std,
            width=s.width, small_input=s.small_input, dropout=s.dropout,
        )

    def trained_student(self) -> nn.Module:
        path = self.run.require("distill", "student.pt")
        student = self.build_student()
        load_state(student, load_checkpoint(path)["model"], str(path))
        return student.eval()

    def train_set(self) -> ImageDataset:
        """The augmented training split, as every training stage sees it."""
        return ImageDataset(self.data.train, self.image_size, train=True, seed=self.recipe.seed, hflip=self.recipe.data.hflip)

    def test_set(self) -> ImageDataset:
        return ImageDataset(self.data.test, self.image_size, train=False)

    def energy_index(self) -> EnergyIndex:
        path = self.run.require("score", "energy.npz")
        info = self.read_json("energy.json")
        with np.load(path) as z:
            return EnergyIndex.from_scores(z["energy"], z["index"], z["group"], info["threshold_low"], info["threshold_high"], self.recipe.energy)

    def objective(self, fraction: float) -> DistillObjective:
        a, loss = self.recipe.augment, self.recipe.distill.loss
        augmenter = Augmenter(a.method, a.alpha, a.selection, fraction)
        return DistillObjective(self.teacher, LOSSES.get(loss.name), loss.params, self.energy_index().to(self.device), augmenter, a.weight)

    def timing_objective(self, augmenter: Augmenter | None) -> DistillObjective:
        """The distillation step as far as its cost goes, before anything is trained or scored: a file teacher as
        loaded, an in-pipeline one as its untrained architecture, energies evenly spread."""
        teacher = self.teacher if not self.teacher_trained_here else freeze(self.new_teacher()).to(self.device)
        loss = self.recipe.distill.loss
        energy = EnergyIndex.evenly_spread(len(self.data.train), self.recipe.energy).to(self.device)
        return DistillObjective(teacher, LOSSES.get(loss.name), loss.params, energy, augmenter, self.recipe.augment.weight)

    def loop(self, label: str, checkpoint_dir: Path, metrics: Path) -> LoopConfig:
        d = self.recipe.data
        return LoopConfig(checkpoint_dir, metrics, d.batch_size, d.eval_batch_size, self.recipe.seed, d.num_workers, self.resume, self.recipe.to_dict(), label)

    def read_json(self, name: str) -> dict:
        return json.loads((self.run / name).read_text())

    def print(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            console.print(*args, **kwargs)
