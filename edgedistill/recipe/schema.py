"""The recipe: a typed, validated tree loaded from YAML.

Everything a run does is decided here, at load time: unknown keys, wrong types, out-of-range values, names
missing from a registry, loss parameters the loss function does not take, files (``data.root``, ``teacher.path``)
missing or of the wrong kind, and keys the rest of the recipe would silently ignore are all reported before any
data is read, each as one line naming the full key path (the words: :mod:`edgedistill.recipe.params`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgedistill.base.errors import RecipeError
from edgedistill.recipe.params import (
    Fraction, PositiveFloat, Section, augments, coerce_params, data_sources, students, device_name, dry_run_loss, given, ignored, known, refuse_given, registered, run_name,
)
from edgedistill.recipe.deploy import AUTO, DeviceTarget, ExportConfig, ReportConfig, ValidateConfig, check_precision, check_student
from edgedistill.base.fsio import path_problem
from edgedistill.recipe.text import apply_override, describe, read_recipe_file


class Normalize(Section):
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class LongTail(Section):
    """CIFAR-LT style imbalance: class c keeps n_max · imbalance^(-c/(C-1)) training images."""

    imbalance: Annotated[float, Field(ge=1)] = 1.0
    # Which images of each class the cut keeps. Not the run's seed: the split is data, so runs of every seed are paired
    # on the same images, and a teacher trained on it has seen no tail image that a student's split lacks.
    seed: int = 0


class DataConfig(Section):
    source: Annotated[str, registered(data_sources)] = "digits"
    root: Path | None = None
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 128
    eval_batch_size: Annotated[int, Field(ge=1)] = 512
    # auto: on CUDA, enough loader processes to keep the GPU fed; on the CPU, none for images held in memory
    # (a worker would take a core from training) and a few for image files (decoding is the slow part)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    hflip: bool = True
    train_limit: Annotated[int, Field(ge=1)] | None = None
    test_limit: Annotated[int, Field(ge=1)] | None = None
    long_tail: LongTail = Field(default_factory=LongTail)
    # an image file that cannot be opened: stop before anything starts (error), or leave it out and list it (skip)
    on_bad_image: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _root_fits_source(self) -> "DataConfig":
        sources = data_sources()
        spec, readers = sources.get(self.source), ", ".join(n for n in sources.names() if sources.get(n).root)
        if self.root is not None and "source" not in self.model_fields_set:
            raise ValueError(f"source: not set, but data.root is; name the source that reads it ({readers})")
        if given(self, "on_bad_image") and not spec.image_files:
            raise ignored("on_bad_image", f"data source '{self.source}' reads no image files", "remove data.on_bad_image")
        if self.root is not None and spec.root is None:
            raise ignored("root", f"data source '{self.source}' reads no files", f"remove data.root, or pick a source that reads it ({readers})")
        if self.root is None and spec.root is not None:
            raise ValueError(f"root: data source '{self.source}' needs {spec.what}")
        if problem := self.root is not None and path_problem(self.root, spec.root, spec.what):
            raise ValueError(f"root: {problem}")
        return self


class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4

    @model_validator(mode="after")
    def _sgd_keys(self) -> "OptimizerConfig":
        if self.name != "sgd":
            refuse_given(self, ("momentum", "nesterov"), f"only sgd uses it, and the optimizer is '{self.name}'", "remove {key} or set name: sgd")
        return self


class ScheduleConfig(Section):
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    milestones: list[Annotated[int, Field(ge=1)]] = []
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _multistep_keys(self) -> "ScheduleConfig":
        if self.name != "multistep":
            refuse_given(self, ("milestones", "gamma"), f"only the multistep schedule uses it, and the schedule is '{self.name}'",
                         "remove {key} or set name: multistep")
        return self


class TrainConfig(Section):
    epochs: Annotated[int, Field(ge=1)] = 10
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    amp: bool = True
    # auto: channels_last and torch.compile on CUDA; on the CPU, what the plan stage measured to pay (distill only)
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    sync_bn: bool = False
    grad_clip: PositiveFloat | None = None

    @model_validator(mode="after")
    def _milestones_fit(self) -> "TrainConfig":
        if self.schedule.name == "multistep":
            if not self.schedule.milestones:
                raise ValueError("schedule.milestones: 'multistep' needs at least one milestone epoch")
            if max(self.schedule.milestones) > self.epochs:
                raise ValueError(f"schedule.milestones: {max(self.schedule.milestones)} is beyond epochs={self.epochs}")
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError(f"schedule.warmup_epochs: {self.schedule.warmup_epochs} must be < epochs={self.epochs}")
        return self


class TeacherConfig(Section):
    source: str = "train"
    arch: str | None = None
    path: Path | None = None
    normalize: Normalize | None = None
    small_input: bool | Literal["auto"] = "auto"
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: Literal["auto", "torch", "onnxruntime", "compile"] = "auto"  # see edgedistill.distill.teacher_runtime
    allow_weak: bool = False  # distill from a teacher at chance level (edgedistill.base.chance) instead of stopping

    @model_validator(mode="after")
    def _source_needs(self) -> "TeacherConfig":
        from edgedistill.models.teachers import TEACHERS
        from edgedistill.models.students import teacher_arch_problem

        spec = known(TEACHERS, self.source, "source")
        src = f"teacher source '{self.source}'"
        if spec.needs_path and self.path is None:
            raise ValueError(f"path: {src} needs a file path ({spec.what})")
        if self.path is not None and not spec.needs_path:
            raise ignored("path", f"{src} trains its teacher here and reads no file", "remove teacher.path, or pick a source that reads it "
                          f"({', '.join(n for n in TEACHERS.names() if TEACHERS.get(n).needs_path)})")
        if spec.timm:
            refuse_given(self, ("small_input",), f"{src} builds timm's network as its checkpoint has it, stem included", "remove teacher.small_input")
        elif not spec.takes_arch:
            refuse_given(self, ("arch", "small_input"), f"{src} reads the whole network, stem included, from teacher.path", "remove teacher.{key}")
        if not spec.trained_here:
            refuse_given(self, ("train",), f"{src} loads a trained teacher; only source 'train' trains one", "remove teacher.train")
        if spec.needs_arch and not self.arch:
            raise ValueError(f"arch: {src} needs an architecture name")
        if spec.timm:
            from edgedistill.models.timm_zoo import model_name

            try:
                model_name(self.arch)
            except RecipeError as e:
                raise ValueError(f"arch: {e}") from None
        elif problem := self.arch is not None and teacher_arch_problem(self.arch):
            raise ValueError(f"arch: {problem}")
        if problem := self.path is not None and path_problem(self.path, "file", spec.what):
            raise ValueError(f"path: {problem}")
        if spec.onnx_only and self.runtime not in ("auto", "onnxruntime"):
            raise ValueError(f"runtime: '{self.runtime}' cannot run {src}, an ONNX file; use auto or onnxruntime")
        return self


class StudentConfig(Section):
    arch: Annotated[str, registered(students, also=(AUTO,))] = "mobilenet_v2"
    width: PositiveFloat = 1.0
    small_input: bool | Literal["auto"] = "auto"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    target: DeviceTarget | None = None

    @model_validator(mode="after")
    def _fixed_width_keys(self) -> "StudentConfig":
        from edgedistill.models.students import fixed_width

        check_student(self)
        if fixed_width(self.arch) and self.width != 1.0:
            variants = "its width is the variant: shufflenet_v2_x0_5 … x2_0" if self.arch.startswith("shufflenet_v2") else \
                "a timm model's width is in its name: lcnet_050, lcnet_075, lcnet_100, ..."
            raise ValueError(f"width: {self.arch} has no width multiplier ({variants}), got {self.width:g}")
        if self.arch.startswith("shufflenet_v2"):
            refuse_given(self, ("dropout",), "ShuffleNetV2 has no dropout", "remove student.dropout")
        return self


class EnergyConfig(Section):
    temperature: PositiveFloat = 1.0
    fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.2
    direction: Literal["paper", "reversed"] = "paper"
    grouping: Literal["static", "dynamic"] = "static"


class LossConfig(BaseModel):
    """``name`` plus the keyword parameters of that loss function (checked against its signature)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "energy_kd"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _params_fit_signature(cls, raw: Any) -> Any:
        from edgedistill.distill.losses import LOSSES

        if not isinstance(raw, dict):
            return raw
        name = raw.get("name", "energy_kd")
        if not isinstance(name, str):
            raise ValueError(f"name: expected a loss name, got {name!r}")
        params = coerce_params(known(LOSSES, name, "name"), {k: v for k, v in raw.items() if k != "name"}, f"loss '{name}'")
        defaults = {n: p.default for n, p in inspect.signature(LOSSES.get(name)).parameters.items() if p.default is not p.empty}
        t, t_minus = (params.get(k, defaults.get(k)) for k in ("temperature", "t_minus"))
        if t is not None and t_minus is not None and t + t_minus <= 0:
            raise ValueError(f"t_minus: temperature + t_minus = {t} + {t_minus} must be > 0 (a sharpened temperature must stay positive)")
        dry_run_loss(LOSSES.get(name), params)
        return {"name": name, **params}


class DistillConfig(TrainConfig):
    loss: LossConfig = Field(default_factory=LossConfig)
    # a folder of teacher logits that later runs with the same teacher, data, seed and augmentation replay
    # exactly (see edgedistill.distill.teacher_cache); none by default: it costs N x classes x 4 bytes per epoch of disk
    teacher_cache: Path | None = None

    @field_validator("teacher_cache")
    @classmethod
    def _cache_folder(cls, v: Path | None) -> Path | None:
        if v is not None and v.exists() and not v.is_dir():
            raise ValueError(f"{v} exists and is not a folder")
        return v


class BudgetConfig(Section):
    max_overhead: PositiveFloat | None = None
    max_minutes: PositiveFloat | None = None
    strict: bool = False
    range: tuple[Fraction, Fraction] = (0.1, 0.5)

    @model_validator(mode="after")
    def _one_kind(self) -> "BudgetConfig":
        if (self.max_overhead is None) == (self.max_minutes is None):
            raise ValueError("give exactly one of max_overhead (extra time relative to no augmentation, e.g. 0.15) or max_minutes")
        if self.range[0] > self.range[1]:
            raise ValueError(f"range: lower bound {self.range[0]} is above upper bound {self.range[1]}")
        return self


class AugmentConfig(Section):
    method: Annotated[str, registered(augments)] = "cutmix"
    alpha: PositiveFloat | None = None
    selection: Literal["high", "low", "mixed", "all"] = "high"
    fraction: Union[Fraction, Literal["auto"]] = 0.0
    budget: BudgetConfig | None = None
    weight: Annotated[float, Field(ge=0)] = 1.0
    profile_steps: Annotated[int, Field(ge=1)] = 5

    @model_validator(mode="after")
    def _fraction_and_budget(self) -> "AugmentConfig":
        if self.selection == "all":  # (budget is never given at its default, None)
            refuse_given(self, ("fraction", "budget"), "selection 'all' gives every training image a mixed copy (r = 1)",
                         "remove augment.{key}, or pick selection high, low or mixed")
        elif self.fraction == "auto" and self.budget is None:
            raise ValueError("fraction: 'auto' needs a budget (augment.budget.max_overhead or augment.budget.max_minutes)")
        elif self.fraction != "auto" and self.budget is not None:
            raise ignored("budget", f"augment.fraction is fixed at {self.fraction:g}, so no budget chooses it",
                          "set fraction: auto to let the budget choose it, or remove augment.budget")
        elif self.fraction == 0:
            refuse_given(self, ("selection", "weight"), "augment.fraction is 0, so no image gets a mixed copy",
                         "set augment.fraction (or auto with a budget), or remove augment.{key}")
        return self


class Recipe(Section):
    name: Annotated[str, AfterValidator(run_name)] = "run"
    seed: Annotated[int, Field(ge=0)] = 0
    device: Annotated[str, AfterValidator(device_name)] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    report: ReportConfig = Field(default_factory=ReportConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _across_sections(self) -> "Recipe":
        """Keys another section makes meaningless (export.int8 here: export code builds ExportConfig alone)."""
        from edgedistill.distill.losses import LOSSES
        loss = self.distill.loss.name
        if not {"t_plus", "t_min"} & set(inspect.signature(LOSSES.get(loss)).parameters):  # no energy temperature policy
            refuse_given(self.energy, ("direction", "grouping"), f"loss '{loss}' uses no energy groups", "remove energy.{key}", at="energy.")
        check_precision(self)
        for section, key, precision in (("export", "int8", "int8"), ("validate", "max_int8_drop", "int8"), ("validate", "max_fp16_drop", "fp16")):
            formats = self.export.formats
            if given(getattr(self, "validate_" if section == "validate" else section), key) and not _of_precision(formats, precision):
                raise ignored(f"{section}.{key}", f"export.formats ({', '.join(formats)}) has no {precision} target",
                              f"add one ({', '.join(_of_precision(None, precision))}) to export.formats or remove {section}.{key}")
        for section, cfg in (("distill", self.distill), ("teacher.train", self.teacher.train)):
            if self.device == "cpu" and given(cfg, "sync_bn"):
                raise ignored(f"{section}.sync_bn", "SyncBatchNorm works on CUDA only, and device is cpu", f"remove {section}.sync_bn")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """A short hash of the resolved recipe: stored in checkpoints and ONNX metadata."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- loading

RECIPE_START = "recipes/quickstart.yaml"


def _of_precision(formats: list[str] | None, precision: str) -> list[str]:
    """The targets of ``formats`` (None: every registered one) that make files of ``precision``."""
    from edgedistill.deploy.targets import TARGETS

    return [n for n in (TARGETS.names() if formats is None else formats) if TARGETS.get(n).precision == precision]


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a YAML recipe file, apply ``key.path=value`` overrides, validate. A recipe file must at least set
    ``data.source``: nothing runs on defaults nobody chose. ``None`` gives the defaults, for tests and tools."""
    raw: dict[str, Any] = {}
    source = "recipe"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = read_recipe_file(path, RECIPE_START)
        _resolve_paths(raw, path.parent)
    for item in overrides:
        apply_override(raw, item)
    _resolve_paths(raw, Path.cwd())  # what --set gave: a command-line path, relative to the working directory
    if path is not None and "name" not in raw:
        try:
            raw["name"] = run_name(path.stem)
        except ValueError:
            raise RecipeError(f"{source}: name: not set, and the file name {path.stem!r} cannot name the run folder "
                              "(letters, digits, '_', '.' and '-'); set name: in the recipe") from None
    recipe = validate_recipe(raw, source=source)
    if path is not None and "source" not in recipe.data.model_fields_set:
        raise RecipeError(f"{source}: data.source: not set; a recipe must say what it distills "
                          f"({', '.join(data_sources().names())}); see {RECIPE_START}")
    return recipe


PATH_KEYS = (("data", "root"), ("teacher", "path"), ("distill", "teacher_cache"))


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths become absolute: in a recipe file relative to that file (recipes travel with their data),
    so the run folder's recipe.yaml names the same files from anywhere."""
    for section, key in PATH_KEYS:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and not Path(node[key]).expanduser().is_absolute():
            node[key] = str((base / node[key]).resolve())


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {describe(e.errors(), raw, Recipe)}") from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
