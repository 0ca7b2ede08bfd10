"""A tiny name → object registry whose errors list the names it knows."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from edgedistill.base.errors import RecipeError

T = TypeVar("T")


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._families: dict[str, tuple[Callable[[str], T], str]] = {}

    def register_family(self, prefix: str, resolve: Callable[[str], T], what: str) -> None:
        """Names that start with ``prefix`` resolve through ``resolve(name)`` (which raises RecipeError for a name it
        cannot resolve): a library's models by their own names. ``what`` describes them in errors."""
        self._families[prefix] = (resolve, what)

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        for prefix, (resolve, _) in self._families.items():
            if name.startswith(prefix):
                return resolve(name)
        families = "".join(f", or {f}" for f in self.families())
        raise RecipeError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; known: {', '.join(self.names())}{families}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def families(self) -> list[str]:
        """``<prefix><name> (what)`` for every family of names (:meth:`register_family`)."""
        return [f"{prefix}<name> ({what})" for prefix, (_, what) in self._families.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
