"""Checks of the recipe values that name a registered object or configure a registered function.

They run inside the recipe's pydantic validators, so each failure is a ``ValueError`` whose message starts with
the sub-key it is about; the recipe loader turns that into one line naming the full key path.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from pydantic import AfterValidator, TypeAdapter, ValidationError

from edgedistill.errors import RecipeError
from edgedistill.registry import did_you_mean


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
        except ValidationError as e:
            raise _ParamError(key, f"expected {_type_name(hints.get(key))}, got {value!r} ({e.errors()[0]['msg']})") from None
    return out


def registered(registry: Callable[[], Any]) -> AfterValidator:
    """A pydantic validator for a str that must name an entry of ``registry()``.

    The registry comes from a function so that it is imported when a recipe is checked, not when the recipe
    module is (registries live beside torch code; ``edgedistill --help`` should not load it).
    """

    def check(name: str) -> str:
        known(registry(), name)
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

    from edgedistill.losses import LossBatch

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


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t)).replace("typing.", "")
