"""The recipe's sections about what to deploy: ``student.target`` (the device budget ``student.arch: auto`` fits a
student to) with the checks of the keys around it, ``export`` and ``validate`` (which files to build and how each
is checked), and ``report`` (the no-teacher baseline). Torch-free: it is part of loading a recipe."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgedistill.recipe.params import PositiveFloat, Section, given, ignored, known, refuse_given, students

AUTO = "auto"


class DeviceTarget(BaseModel):
    """Limits of one inference call of ``batch`` images with ``threads`` threads at ``precision``; any subset of
    ``max_latency_ms`` / ``max_size_mb`` (at least one). ``archs`` narrows the search to some student families."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None
    max_size_mb: Annotated[float, Field(gt=0)] | None = None
    # a median measured just under the limit lands over it about every other time it is measured again (in
    # validation, on the device); candidates must leave this share of max_latency_ms to spare
    headroom: Annotated[float, Field(ge=0, lt=1)] = 0.1
    precision: Literal["fp32", "int8"] = "fp32"
    threads: Annotated[int, Field(ge=1)] = 1
    batch: Annotated[int, Field(ge=1)] = 1
    archs: Annotated[list[str], Field(min_length=1)] | None = None

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, v: list[str] | None) -> list[str] | None:
        for name in v or ():
            known(students(), name)
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _a_limit(self) -> "DeviceTarget":
        if self.max_latency_ms is None and self.max_size_mb is None:
            raise ValueError("give max_latency_ms or max_size_mb (or both): without a limit every candidate fits")
        return self

    def candidate_archs(self) -> list[str]:
        from edgedistill.models.students import zoo

        return list(self.archs) if self.archs else zoo()


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    baseline: Literal["ce"] | None = None  # also train the student with CE alone (same schedule) to show what distillation added


def check_student(cfg) -> None:
    """``student.arch: auto`` needs a target and chooses the width; a fixed arch makes a target meaningless."""
    if cfg.arch == AUTO:
        if cfg.target is None:
            raise ValueError("target: student.arch is auto; give student.target (max_latency_ms and/or max_size_mb)")
        refuse_given(cfg, ("width",), "student.arch is auto, which chooses the width too", "remove student.width")
    elif cfg.target is not None:
        raise ignored("target", f"student.arch is fixed ({cfg.arch})", "set student.arch: auto, or remove student.target")


def check_precision(recipe) -> None:
    """An int8 target picks for the int8 file: the export must build it."""
    target = recipe.student.target
    if target is not None and given(target, "precision") and target.precision not in recipe.export.formats:
        raise ignored("student.target.precision", f"export.formats ({', '.join(recipe.export.formats)}) has no {target.precision}",
                      f"add {target.precision} to export.formats or remove student.target.precision")


class CalibrationConfig(Section):
    samples: Annotated[int, Field(ge=1)] = 512
    # ONNX Runtime's (PT2E targets use their observers); auto: each judged on the held-out images, the closest kept
    method: Literal["minmax", "entropy", "percentile", "auto"] = "minmax"
    # balanced: round-robin over the classes; energy: evenly over the teacher's energy ranking, so that confident and
    # uncertain images are both in it (edgedistill.distill.energy.spread_by_energy)
    select: Literal["balanced", "energy"] = "balanced"


class QatConfig(Section):
    """The ``qat`` stage's schedule (:mod:`edgedistill.distill.qat`): a few epochs from the distilled student."""

    epochs: Annotated[int, Field(ge=1)] = 3
    lr_scale: PositiveFloat = 0.01  # of distill.optimizer.lr, cosine to 0: QAT fine-tunes, it does not re-learn
    freeze_bn_after: Annotated[int, Field(ge=0)] = 1  # epochs of BatchNorm statistics updates
    freeze_observers_after: Annotated[int, Field(ge=0)] = 2  # epochs of range observation

    @model_validator(mode="after")
    def _within(self) -> "QatConfig":
        for key in ("freeze_bn_after", "freeze_observers_after"):
            if getattr(self, key) > self.epochs:
                raise ValueError(f"{key}: {getattr(self, key)} is beyond epochs={self.epochs}")
        return self


class Int8Config(Section):
    """What every int8 target (ONNX ``int8``, ``executorch_int8``, ``litert_int8``) shares (docs/recipe.md, export)."""

    # ptq: post-training int8 of the distilled student; qat: int8 of the student after quantisation-aware distillation
    # (the qat stage); auto: qat when post-training int8 loses more than validate.max_int8_drop on the held-out images
    method: Literal["ptq", "qat", "auto"] = "ptq"
    qat: QatConfig = Field(default_factory=QatConfig)
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    # when the int8 file changes more held-out top-1 answers than validate.max_int8_drop allows, keep its most
    # sensitive layers in float until it does not (edgedistill.deploy.int8_fallback)
    fallback: bool = True
    sensitivity: bool = False  # rank every layer even when the file fits (int8_sensitivity.json); fallback always ranks
    held_out: Annotated[int, Field(ge=32)] = 1000  # training images, none of them calibration ones, that judge it
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _qat(self) -> "Int8Config":
        import importlib.util

        if self.method == "ptq":
            refuse_given(self, ("qat",), "method is ptq (post-training int8 only)", "set method: qat or auto, or remove qat")
        elif importlib.util.find_spec("torchao") is None:
            raise ValueError(f"method: {self.method} needs torchao: install the extra 'qat' (pip install 'edgedistill[qat]')")
        return self


class ExportConfig(Section):
    """``formats``: names of registered export targets (:data:`edgedistill.deploy.targets.TARGETS`)."""

    formats: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["fp32", "int8"])
    opset: Annotated[int, Field(ge=18)] = 18
    int8: Int8Config = Field(default_factory=Int8Config)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "calibration" in raw:
            raise ValueError("calibration: moved to export.int8.calibration (every int8 target shares it)")
        return raw

    @field_validator("formats")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        from edgedistill.deploy.targets import TARGETS, missing_requirements, not_installed

        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        for name in v:
            known(TARGETS, name)
        missing = missing_requirements(v)
        if missing:
            raise ValueError(f"{'; '.join(missing)} (add it to export.formats)")
        if absent := not_installed(v):
            raise ValueError("; ".join(absent))
        return v

    @model_validator(mode="after")
    def _qat_needs_int8(self) -> "ExportConfig":
        from edgedistill.deploy.targets import TARGETS, qat_weight_grid

        if self.int8.method != "ptq" and qat_weight_grid(self.formats) is None:
            int8 = [name for name in TARGETS.names() if TARGETS.get(name).weight_grid is not None]
            raise ValueError(f"int8.method: {self.int8.method} trains for int8 files, and formats has none: add one of {', '.join(int8)}")
        return self


class ValidateConfig(Section):
    atol: PositiveFloat = 1e-4
    max_int8_drop: Annotated[float, Field(ge=0)] = 1.0
    max_fp16_drop: Annotated[float, Field(ge=0)] = 0.5
    threads: Annotated[int, Field(ge=1)] = 2
    parity_batches: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 7, 32]
    latency_runs: Annotated[int, Field(ge=1)] = 50
    throughput_batch: Annotated[int, Field(ge=1)] = 32
    rounds: Annotated[int, Field(ge=1)] = 15  # interleaved timing rounds: every latency / throughput is their median and central 95 %
    # Timed seconds per latency or throughput figure, over all rounds. A machine whose speed drifts (a shared VM)
    # needs a measurement longer than its slow phases for two validations' medians to agree: at 1 s and 5 rounds
    # they were up to 70 % apart, at 10 s and 15 rounds within 20 % (docs/deploy.md).
    seconds: PositiveFloat = 10.0
    allow_weak: bool = False  # a file at chance level (edgedistill.base.chance) passes instead of failing its gate
