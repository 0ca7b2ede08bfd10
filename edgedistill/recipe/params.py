"""Checks the recipe's validators run: names of registered objects, parameters of registered functions, keys a
combination of settings would ignore, paths of the right kind, run and device names.

They run inside pydantic validators, so each failure is a ``ValueError`` whose message starts with the sub-key it
is about; :mod:`edgedistill.recipe.text` turns it into one line naming the full key path.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from typing import Annotated, Any, Callable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgedistill.base.errors import RecipeError
from edgedistill.base.registry import did_you_mean


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def coerce_params(fn, params: dict[str, Any], what: str) -> dict[str, Any]:
    """Check ``params`` against ``fn``'s keyword-only parameters and coerce them to the annotated types."""
    sig = inspect.signature(fn)
    allowed = {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    hints = inspect.get_annotations(fn, eval_str=True)
    out = {}
    for key, value in params.items():
        if key not in allowed:
            raise _ParamError(key, f"unknown parameter of {what}{did_you_mean(key, allowed)}; it takes: {', '.join(allowed) or 'none'}")
        try:
            out[key] = TypeAdapter(hints.get(key, Any)).validate_python(value, strict=False)
        except ValidationError:
            raise _ParamError(key, f"expected {type_words(hints.get(key))}, got {value!r}") from None
    return out


def registered(registry: Callable[[], Any], also: tuple[str, ...] = ()) -> AfterValidator:
    """A pydantic validator for a str that must name an entry of ``registry()`` (or be one of ``also``).

    The registry comes from a function so that it is imported when a recipe is checked, not when the recipe
    module is (registries live beside torch code; ``edgedistill --help`` should not load it).
    """

    def check(name: str) -> str:
        if name in also:
            return name
        try:
            known(registry(), name)
        except ValueError as e:
            raise ValueError(f"{e}{''.join(f', or {a}' for a in also)}") from None
        return name

    return AfterValidator(check)


def known(registry, name: str, key: str | None = None):
    """``registry.get`` inside a validator: a ValueError, so the error gets its key path."""
    try:
        return registry.get(name)
    except RecipeError as e:
        raise ValueError(f"{key}: {e}" if key else str(e)) from None


def dry_run_loss(loss_fn, params: dict[str, Any]) -> None:
    """Call the loss once on tiny random logits, so a value it rejects fails now, not at epoch 3."""
    import torch

    from edgedistill.distill.losses import LossBatch

    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    batch = LossBatch(z, z.flip(0), torch.tensor([0, 1, 2, 3]), torch.tensor([-1, 0, 1, 0], dtype=torch.int8), torch.tensor([0.1, 0.4, 0.9, 0.5]))
    try:
        loss_fn(batch, **params)
    except ValueError as e:
        raise ValueError(str(e)) from None


class _ParamError(ValueError):
    def __init__(self, key: str, msg: str):
        super().__init__(f"{key}: {msg}")
        self.key = key


_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def type_words(t) -> str:
    """A parameter annotation in plain words: ``float`` → 'a number', ``tuple[float, ...]`` → 'a list of numbers'."""
    if t in _WORDS:
        return _WORDS[t]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (tuple, list, collections.abc.Sequence) and args:
        item = _WORDS.get(args[0], "values").removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s" if args[0] in _WORDS and args[0] is not bool else f"a list of {item}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_words(a) for a in args if a is not type(None))
    return getattr(t, "__name__", str(t)).replace("typing.", "")


# ---------------------------------------------------------------- keys the recipe would ignore, files, names


def given(section: BaseModel, key: str) -> bool:
    """The recipe sets ``key`` of ``section`` to something other than its default.

    A key that the rest of the recipe makes meaningless is an error only when it is *given* this way: the
    resolved ``recipe.yaml`` of a run folder lists every key with its default, and must load again.
    """
    if key not in section.model_fields_set:
        return False
    return getattr(section, key) != type(section).model_fields[key].get_default(call_default_factory=True)


def ignored(key: str, why: str, fix: str) -> ValueError:
    """The one message of a key the recipe would silently ignore: ``KEY: would be ignored: WHY; FIX``."""
    return ValueError(f"{key}: would be ignored: {why}; {fix}")


def refuse_given(section: BaseModel, keys: tuple[str, ...], why: str, fix: str, at: str = "") -> None:
    """:func:`ignored` for the first of ``keys`` that ``section`` is :func:`given` (``{key}`` in ``fix``: that key;
    ``at``: the section's key path, when the check runs in a validator above it)."""
    for key in keys:
        if given(section, key):
            raise ignored(at + key, why, fix.format(key=key))


def run_name(name: str) -> str:
    """A pydantic validator: ``name`` names the run folder."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"expected letters, digits, '_', '.' and '-', starting with a letter or digit (it names the run folder), got {name!r}")
    return name


def device_name(name: str) -> str:
    """A pydantic validator: ``device`` in words, not as the regular expression that checks it."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {name!r}")
    return name


# Registries are imported when a recipe is checked, not when this module is: they live beside torch code.
def data_sources():
    from edgedistill.data.sources import DATA_SOURCES
    return DATA_SOURCES


def students():
    from edgedistill.models.students import STUDENTS
    return STUDENTS


def augments():
    from edgedistill.distill.augment import AUGMENTS
    return AUGMENTS
