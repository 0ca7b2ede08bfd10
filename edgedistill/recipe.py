"""The recipe: a typed, validated tree loaded from YAML.

Everything a run does is decided here, at load time: unknown keys, wrong types, out-of-range
values, names missing from a registry and loss parameters the loss function does not take are
all reported before any data is read, each as one line naming the full key path.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgedistill.errors import RecipeError
from edgedistill.params import coerce_params, dry_run_loss, known, registered
from edgedistill.registry import did_you_mean


def _data_sources():
    from edgedistill.data import DATA_SOURCES

    return DATA_SOURCES


def _students():
    from edgedistill.models import STUDENTS

    return STUDENTS


def _augments():
    from edgedistill.augment import AUGMENTS

    return AUGMENTS


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Normalize(Section):
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]


class LongTail(Section):
    """CIFAR-LT style imbalance: class c keeps n_max · imbalance^(-c/(C-1)) training images."""

    imbalance: Annotated[float, Field(ge=1)] = 1.0


class DataConfig(Section):
    source: Annotated[str, registered(_data_sources)] = "digits"
    root: Path | None = None
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 128
    eval_batch_size: Annotated[int, Field(ge=1)] = 512
    num_workers: Annotated[int, Field(ge=0)] = 0
    hflip: bool = True
    train_limit: Annotated[int, Field(ge=1)] | None = None
    test_limit: Annotated[int, Field(ge=1)] | None = None
    long_tail: LongTail = Field(default_factory=LongTail)



class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Field(ge=0)] = 5e-4


class ScheduleConfig(Section):
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: Annotated[float, Field(ge=0)] = 0.0
    milestones: list[Annotated[int, Field(ge=1)]] = []
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1


class TrainConfig(Section):
    epochs: Annotated[int, Field(ge=1)] = 10
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    amp: bool = True
    channels_last: bool = True
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

    @model_validator(mode="after")
    def _source_needs(self) -> "TeacherConfig":
        from edgedistill.models import TEACHERS

        spec = known(TEACHERS, self.source, "source")
        if spec.needs_path and self.path is None:
            raise ValueError(f"path: teacher source '{self.source}' needs a file path")
        if spec.needs_arch and not self.arch:
            raise ValueError(f"arch: teacher source '{self.source}' needs an architecture name")
        if self.path is not None and not Path(self.path).is_file():
            found = "is a folder, expected a file" if Path(self.path).is_dir() else "file not found"
            raise ValueError(f"path: {found}: {self.path}")
        return self


class StudentConfig(Section):
    arch: Annotated[str, registered(_students)] = "mobilenet_v2"
    width: PositiveFloat = 1.0
    small_input: bool | Literal["auto"] = "auto"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2



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
        from edgedistill.losses import LOSSES

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
    method: Annotated[str, registered(_augments)] = "cutmix"
    alpha: PositiveFloat | None = None
    selection: Literal["high", "low", "mixed", "all"] = "high"
    fraction: Union[Fraction, Literal["auto"]] = 0.0
    budget: BudgetConfig | None = None
    weight: Annotated[float, Field(ge=0)] = 1.0
    profile_steps: Annotated[int, Field(ge=1)] = 5


    @model_validator(mode="after")
    def _auto_needs_budget(self) -> "AugmentConfig":
        if self.fraction == "auto" and self.budget is None:
            raise ValueError("fraction: 'auto' needs a budget (augment.budget.max_overhead or augment.budget.max_minutes)")
        return self


class CalibrationConfig(Section):
    samples: Annotated[int, Field(ge=1)] = 512
    method: Literal["minmax", "entropy", "percentile"] = "minmax"


class ExportConfig(Section):
    """``formats``: names of registered export targets (:data:`edgedistill.targets.TARGETS`)."""

    formats: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["fp32", "int8"])
    opset: Annotated[int, Field(ge=18)] = 18
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="before")
    @classmethod
    def _edge_key_removed(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "edge" in raw:
            raise ValueError("edge: removed; add 'edge' to export.formats")
        return raw

    @field_validator("formats")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        from edgedistill.targets import TARGETS, missing_requirements

        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        for name in v:
            known(TARGETS, name)
        missing = missing_requirements(v)
        if missing:
            raise ValueError(f"{'; '.join(missing)} (add it to export.formats)")
        return v


class ValidateConfig(Section):
    atol: PositiveFloat = 1e-4
    max_int8_drop: Annotated[float, Field(ge=0)] = 1.0
    max_fp16_drop: Annotated[float, Field(ge=0)] = 0.5
    threads: Annotated[int, Field(ge=1)] = 2
    parity_batches: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [1, 7, 32]
    latency_runs: Annotated[int, Field(ge=1)] = 50
    throughput_batch: Annotated[int, Field(ge=1)] = 32


class Recipe(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = "run"
    seed: Annotated[int, Field(ge=0)] = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    energy: EnergyConfig = Field(default_factory=EnergyConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """A short hash of the resolved recipe: stored in checkpoints and ONNX metadata."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Load a YAML recipe (``None`` → all defaults), apply ``key.path=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text("utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
        raw.setdefault("name", path.stem)
        _resolve_paths(raw, path.parent)
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path) if path else "recipe")


PATH_KEYS = (("data", "root"), ("teacher", "path"))


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative file paths in a recipe file are relative to that file, so recipes travel with their data.

    (Paths given with --set stay relative to the working directory, like any command-line path.)
    """
    for section, key in PATH_KEYS:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and not Path(node[key]).expanduser().is_absolute():
            node[key] = str((base / node[key]).resolve())


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b.c=value``: value parsed as YAML (so numbers, booleans and lists work)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_describe(e.errors()[0], raw)}") from None


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    # pydantic puts the names of union branches in loc; keep only the recipe keys.
    keys = [str(p) for p in err["loc"] if not re.fullmatch(r"(function-after|literal|union|lax-or-strict)\[.*\]|float|int|str|bool|tuple\[.*\]|list\[.*\]|none|is-instance\[.*\]", str(p))]
    path = ".".join(keys)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        fields = _fields_at(keys[:-1])
        return f"unknown key '{path}'{did_you_mean(keys[-1], fields)}; valid keys here: {', '.join(sorted(fields))}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        # validators prefix their message with the sub-key they are about ("t_minus: ...").
        sub, colon, rest = msg.partition(": ")
        if colon and re.fullmatch(r"[A-Za-z_][\w.]*", sub):
            return f"{'.'.join(keys + [sub]) if keys else sub}: {rest}"
        return f"{path}: {msg}" if path else msg
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f", got {got!r}"
    return f"{path or 'recipe'}: {msg[0].lower() + msg[1:]}{shown}"


def _fields_at(keys: list[str]) -> list[str]:
    model: Any = Recipe
    for k in keys:
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        ann = fields[k].annotation if k in fields else None
        model = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return [(f.alias or n) for n, f in model.model_fields.items()]


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
