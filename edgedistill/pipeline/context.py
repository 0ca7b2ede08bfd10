"""What every stage receives: the recipe, the run folder, the device, and the builders of the run's parts.

The context knows how to build the teacher, the student, the datasets and the training objective from the
recipe and the files earlier stages left in the run folder. It knows no stage: stages depend on it, never
the other way round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgedistill.data import transforms
from edgedistill.base import fsio
from edgedistill.base.console import console
from edgedistill.base.shots import shot_groups
from edgedistill.data.sources import DataBundle, limit_indices, load_data
from edgedistill.data.loading import ImageDataset, SplitImages, eval_arrays
from edgedistill.base.devices import preset, select_device
from edgedistill.base.distributed import DistInfo, broadcast_object
from edgedistill.distill.energy import EnergyIndex, spread_by_energy
from edgedistill.pipeline.folder import RunFolder
from edgedistill.distill.losses import LOSSES
from edgedistill.models.teachers import TEACHERS, freeze, load_teacher
from edgedistill.models.students import build_student
from edgedistill.models.checkpoints import load_checkpoint, load_state
from edgedistill.distill.objectives import Augmenter, DistillObjective
from edgedistill.distill.qat import QAT_FILE, QAT_STUDENT_FILE, FakeQuantStudent
from edgedistill.distill.qat import quantizer as qat_quantizer
from edgedistill.deploy.targets import qat_target, qat_weight_grid
from edgedistill.deploy.pick import CHOICE_FILE, chosen_student
from edgedistill.recipe.schema import Recipe
from edgedistill.recipe.deploy import AUTO
from edgedistill.distill.teacher_cache import LogitCache, digest_split
from edgedistill.distill.teacher_runtime import build_runtime, choose_runtime
from edgedistill.distill.train import LoopConfig

TEACHER_ONNX = "teacher.onnx"  # a torch teacher exported for ONNX Runtime, when that runtime is a candidate


def loader_workers(spec: int | str, device: torch.device, world: int, in_memory: bool) -> int:
    """``data.num_workers``: a number as given; ``auto``: on CUDA, this rank's share of the CPU cores (at most 8) so that
    decoding and augmentation keep up with the GPU; on the CPU none for images held in memory (a worker would take
    a core from the training step) and up to 4 for image files, whose decoding is the slow part."""
    if spec != "auto":
        return int(spec)
    cores = max(1, (os.cpu_count() or 1) // world)
    if device.type == "cuda":
        return min(8, cores)
    return 0 if in_memory else min(4, max(1, cores // 2))


def resolve(value: bool | str, key: str, device: torch.device, measured: dict | None) -> bool:
    """A ``channels_last`` / ``compile`` setting: its :func:`~edgedistill.base.devices.preset`, else what the plan
    measured (``measured``: plan.json ``speed``), else off (a loop the plan did not time: the teacher's)."""
    fixed = preset(value, device)
    if fixed is not None:
        return fixed["use"]
    return bool(measured is not None and key in measured and measured[key]["use"])


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

    def eager_teacher(self) -> nn.Module:
        """The frozen teacher on the device as PyTorch runs it; one trained in the pipeline is read from the
        teacher stage's file."""
        if self.teacher_trained_here:
            return self.trained_teacher(self.run.require("teacher", "teacher.pt"))
        return self.new_teacher().to(self.device)

    def trained_teacher(self, path: Path) -> nn.Module:
        """The teacher trained here, read from its file (under DDP every rank reads rank 0's)."""
        net = self.new_teacher()
        load_state(net, load_checkpoint(path)["model"], str(path))
        return freeze(net).to(self.device)

    def choose_teacher_runtime(self, net: nn.Module) -> tuple[nn.Module, dict]:
        """Measure the runtimes ``teacher.runtime`` allows for ``net`` and return the fastest faithful one with its
        record. Rank 0 measures; every rank follows its choice."""
        cfg = self.recipe.teacher
        if self.dist.is_main:
            fast, record = choose_runtime(
                net, wanted=cfg.runtime, device=self.device, batch=self.recipe.data.batch_size, image_size=self.image_size,
                onnx_path=cfg.path if TEACHERS.get(cfg.source).onnx_only else None, export_to=self.run / TEACHER_ONNX,
            )
        record = broadcast_object(self.dist, record if self.dist.is_main else None)
        return (fast if self.dist.is_main else build_runtime(net, record, self.device)), record

    @cached_property
    def teacher(self) -> nn.Module:
        """The frozen teacher in the runtime the teacher stage chose (``teacher.json``). Before that stage ran (a
        plan on a fresh folder), the choice is made here, on the untrained architecture for a teacher trained here:
        speed does not depend on the weights."""
        if self.run.done("teacher"):
            return build_runtime(self.eager_teacher(), self.read_json("teacher.json")["runtime"], self.device)
        net = freeze(self.new_teacher()).to(self.device) if self.teacher_trained_here else self.eager_teacher()
        return self.choose_teacher_runtime(net)[0]

    def build_student(self) -> nn.Module:
        """The recipe's student; with ``student.arch: auto``, the one the pick stage chose."""
        s, data = self.recipe.student, self.data
        arch, width = chosen_student(self.run.require("pick", CHOICE_FILE)) if s.arch == AUTO else (s.arch, s.width)
        torch.manual_seed(self.recipe.seed)  # the initial weights are part of what the seed fixes
        return build_student(
            arch, data.num_classes, image_size=self.image_size, mean=data.mean, std=data.std,
            width=width, small_input=s.small_input, dropout=s.dropout,
        )

    def trained_student(self) -> nn.Module:
        path = self.run.require("distill", "student.pt")
        student = self.build_student()
        load_state(student, load_checkpoint(path)["model"], str(path))
        return student.eval()

    def qat_student(self) -> nn.Module | None:
        """The student after quantisation-aware training, when the qat stage trained one (``qat.json``)."""
        if self.recipe.export.int8.method == "ptq" or not json.loads(self.run.require("qat", QAT_FILE).read_text())["trained"]:
            return None
        path = self.run / QAT_STUDENT_FILE
        student = self.build_student()
        load_state(student, load_checkpoint(path)["model"], str(path))
        return student.eval()

    def fake_quant_student(self, student: nn.Module) -> tuple[FakeQuantStudent, str]:
        """``student`` with int8 simulated as the qat stage trains it (and the plan prices it): the scheme of the run's
        first int8 target (:func:`edgedistill.deploy.targets.qat_target`), the weights on the coarsest grid of its int8
        targets. Returns it and the quantizer's name."""
        formats, per_channel = self.recipe.export.formats, self.recipe.export.int8.granularity == "per_channel"
        target = qat_target(formats)
        base = None if target is None else target.quantizer(per_channel, qat=True)
        q = qat_quantizer(per_channel, qat_weight_grid(formats), base)
        return FakeQuantStudent(student, transforms.hw(self.image_size), q), type(q).__name__

    def train_set(self) -> ImageDataset:
        """The augmented training split, as every training stage sees it."""
        return ImageDataset(self.data.train, self.image_size, train=True, seed=self.recipe.seed, hflip=self.recipe.data.hflip)

    def test_set(self) -> ImageDataset:
        return ImageDataset(self.data.test, self.image_size, train=False)

    def test_images(self) -> SplitImages:
        """The test split as the exported files' runtimes read it: float32 chunks of ``data.eval_batch_size``."""
        return SplitImages(self.data.test, self.image_size, chunk=self.recipe.data.eval_batch_size)

    def int8_images(self) -> tuple[np.ndarray, SplitImages | None]:
        """The calibration images (``export.int8.calibration``: class-balanced, or spread over the teacher's energy
        ranking) and the held-out training images, with labels, that judge an int8 file (none of them calibrates;
        None when calibration takes every training image)."""
        cfg, labels = self.recipe.export.int8, self.data.train.labels
        if cfg.calibration.select == "energy":
            with np.load(self.run.require("score", "energy.npz")) as z:
                energy = np.empty(len(labels))
                energy[z["index"]] = z["energy"]
            picked = spread_by_energy(energy, cfg.calibration.samples)
        else:
            picked = limit_indices(labels, cfg.calibration.samples, self.recipe.seed)
        rest = np.setdiff1d(np.arange(len(labels)), picked)
        held = rest[limit_indices(labels[rest], cfg.held_out, self.recipe.seed + 1)]
        calibration, _ = eval_arrays(self.data.train, self.image_size, indices=picked)
        if not len(held):
            return calibration, None
        return calibration, SplitImages(self.data.train.subset(held), self.image_size, chunk=self.recipe.data.eval_batch_size)

    def energy_index(self) -> EnergyIndex:
        path = self.run.require("score", "energy.npz")
        info = self.read_json("energy.json")
        with np.load(path) as z:
            return EnergyIndex.from_scores(z["energy"], z["index"], z["group"], info["threshold_low"], info["threshold_high"], self.recipe.energy)

    def objective(self, fraction: float) -> DistillObjective:
        a, loss = self.recipe.augment, self.recipe.distill.loss
        augmenter = Augmenter(a.method, a.alpha, a.selection, fraction)
        return DistillObjective(self.teacher, LOSSES.get(loss.name), loss.params, self.energy_index().to(self.device), augmenter, a.weight,
                                cache=self.logit_cache())

    def logit_cache(self) -> LogitCache | None:
        """The ``distill.teacher_cache`` folder's entry for this run's teacher, data, seed and augmentation."""
        folder = self.recipe.distill.teacher_cache
        if folder is None:
            return None
        cfg, d, data = self.recipe.teacher, self.recipe.data, self.data
        teacher_file = cfg.path if cfg.path is not None else self.run.require("teacher", "teacher.pt")
        runtime = self.read_json("teacher.json")["runtime"]  # the key names the runtime whose logits it replays
        key = {
            "teacher": fsio.sha256(teacher_file), "normalize": cfg.normalize.model_dump() if cfg.normalize else None,
            "runtime": [runtime["runtime"], runtime["channels_last"]],
            "data": digest_split(data.train.images, data.train.paths, data.train.labels),
            "image_size": self.image_size, "hflip": d.hflip, "seed": self.recipe.seed, "batch_size": d.batch_size,
            "transforms": fsio.sha256(Path(transforms.__file__)), "torch": torch.__version__, "device": self.device.type,
            "amp": self.recipe.distill.amp and self.device.type == "cuda",
        }
        cache = LogitCache(folder, key, n_train=len(data.train), num_classes=data.num_classes, rank=self.dist.rank, world=self.dist.world)
        cache.open()
        return cache

    def timing_objective(self, augmenter: Augmenter | None) -> DistillObjective:
        """The distillation step as far as its cost goes, before anything is trained or scored: the teacher in its
        runtime (an in-pipeline one as its untrained architecture), energies evenly spread."""
        loss = self.recipe.distill.loss
        energy = EnergyIndex.evenly_spread(len(self.data.train), self.recipe.energy).to(self.device)
        return DistillObjective(self.teacher, LOSSES.get(loss.name), loss.params, energy, augmenter, self.recipe.augment.weight)

    @property
    def num_workers(self) -> int:
        return loader_workers(self.recipe.data.num_workers, self.device, self.dist.world, in_memory=self.data.train.images is not None)

    def loop(self, label: str, checkpoint_dir: Path, metrics: Path, train_cfg, measured: dict | None = None) -> LoopConfig:
        """The loop's settings; ``channels_last`` and ``compile`` resolve ``auto`` from ``measured`` (the plan's
        ``speed`` decisions) where given, else to on for CUDA and off for the CPU."""
        d = self.recipe.data
        return LoopConfig(
            checkpoint_dir, metrics, d.batch_size, d.eval_batch_size, self.recipe.seed, self.num_workers, self.resume, self.recipe.to_dict(), label,
            channels_last=resolve(train_cfg.channels_last, "channels_last", self.device, measured),
            compile=resolve(train_cfg.compile, "compile", self.device, measured),
            shot_groups=self.shot_groups,
        )

    @cached_property
    def shot_groups(self) -> dict[str, list[int]] | None:
        """The classes of each shot group when the training split is long-tailed (:mod:`edgedistill.base.shots`)."""
        return shot_groups(self.data.train.labels, self.data.num_classes)

    def read_json(self, name: str) -> dict:
        return json.loads((self.run / name).read_text())

    def print(self, *args, **kwargs) -> None:
        if self.dist.is_main:
            console.print(*args, **kwargs)
