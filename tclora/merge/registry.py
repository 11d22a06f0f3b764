"""One dict of merge methods; register with a decorator, look up with :func:`get`."""

from __future__ import annotations

from typing import Sequence

from tclora.merge.base import MergeDecorator, MergeMethod, Param

_METHODS: dict[str, MergeMethod] = {}


def register(
    name: str, *, reference_url: str, params: Sequence[Param] = (), default_weights: str = "uniform"
) -> MergeDecorator:
    """Register a merge function under ``name`` (lower case, unique)."""
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"merge method names are lower-case identifiers, got {name!r}")
    if default_weights not in ("uniform", "ones"):
        raise ValueError(f"default_weights must be 'uniform' or 'ones', got {default_weights!r}")

    def decorator(fn):
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        _METHODS[name] = MergeMethod(name, fn, reference_url, tuple(params), default_weights)
        return fn

    return decorator


def get(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(_METHODS)}") from None


def names() -> list[str]:
    return sorted(_METHODS)
