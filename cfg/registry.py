"""One registry per concept: a name -> function map whose entries declare their own options.

An entry's options are its keyword-only parameters with defaults, minus the ones the engine supplies
(`reserved`): `def sample_ancestral(denoise, z, lambdas, *, noise, v=0.3, clip_denoised=None, ...)` has the
option `v`. So adding a sampler, guidance method, data set, feature extractor or metric is one function with a
decorator, and the params schema, the cell records, MLflow and analysis all learn its name and options from
here (k-diffusion's one-signature samplers, edm2's `metric_specs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Mapping[str, F], Generic[F]):
    """Named functions of one kind (`kind` names it in errors); iterating gives the names in order."""

    def __init__(self, kind: str, reserved: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.reserved = frozenset(reserved)  # keyword arguments the caller supplies, never user options
        self._entries: dict[str, F] = {}
        self._bounds: dict[str, dict[str, tuple[float, float]]] = {}

    def register(self, name: str, bounds: dict[str, tuple[float, float]] | None = None) -> Callable[[F], F]:
        """Decorator: add `fn` under `name` (names are unique); `bounds` gives options' closed ranges."""

        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            self._bounds[name] = dict(bounds or {})
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {list(self._entries)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def options(self, name: str) -> dict[str, Any]:
        """The entry's options and their defaults: keyword-only parameters with a default, less `reserved`."""
        return {
            p.name: p.default
            for p in inspect.signature(self[name]).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.name not in self.reserved
        }

    def resolve(self, name: str, options: Mapping[str, Any] | None, where: str = "options") -> dict[str, Any]:
        """`options` checked against the entry's (unknown keys and wrong types raise ValueError naming the
        key, its value and what is accepted) and completed with the defaults: the dict a record carries."""
        defaults = self.options(name)
        out = dict(defaults)
        for key, value in (options or {}).items():
            if key not in defaults:
                raise ValueError(
                    f"{where}.{key} is not an option of {self.kind} {name!r}; its options: {sorted(defaults)}"
                )
            out[key] = _coerce(value, defaults[key], f"{where}.{key}")
        for key, (lo, hi) in self._bounds[name].items():
            if out[key] is not None and not lo <= out[key] <= hi:
                raise ValueError(
                    f"{where}.{key} = {out[key]!r} is out of range: allowed {lo} <= value <= {hi}"
                )
        return out


def _coerce(value: Any, default: Any, where: str) -> Any:
    """`value` as the type of its default (an int where a float is expected becomes a float)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(
            f"{where} = {value!r} must be a {type(default).__name__} like its default {default!r}"
        )
    return value
