"""One dict of merge methods; register with a decorator, look up with :func:`get`."""

from __future__ import annotations

from typing import Mapping

from tclora.merge.base import MergeDecorator, MergeMethod, signature_params

_METHODS: dict[str, MergeMethod] = {}


def register(
    name: str, *, reference_url: str, help: Mapping[str, str], rank_param: bool = False, whole_model: bool = False
) -> MergeDecorator:
    """Register a merge function under ``name`` (lower case, unique).

    Parameters and defaults come from the function's signature (everything after ``deltas, weights``);
    ``help`` gives each one its help text.

    Args:
        rank_param: the method's ``rank`` is set from ``merge.cp_rank`` by the pipeline.
        whole_model: the function merges every module at once (see :mod:`tclora.merge.base`).

    Raises:
        ValueError: bad or duplicate name, a parameter without default or help, or ``rank_param``
            on a method without a ``rank`` parameter.
    """
    if name != name.lower() or not name.isidentifier():
        raise ValueError(f"merge method names are lower-case identifiers, got {name!r}")

    def decorator(fn):
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        params = signature_params(name, fn, help)
        if rank_param and "rank" not in {p.name for p in params}:
            raise ValueError(f"merge method {name!r}: rank_param=True needs a `rank` parameter")
        _METHODS[name] = MergeMethod(name, fn, reference_url, params, rank_param, whole_model)
        return fn

    return decorator


def get(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(_METHODS)}") from None


def names() -> list[str]:
    return sorted(_METHODS)
