"""Merge methods behind one registry; :func:`merge_adapters` applies one method module by module.

Importing this package registers every built-in method. Adding a method is one new module that
calls :func:`tclora.merge.registry.register` and one import line below.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from tclora.merge import registry
from tclora.merge.base import Delta, LowRank, Param, dense, stack_factors

# Each import registers its methods.
from tclora.merge import cp, dare, knots, linear, svd, ties  # noqa: E402,F401

__all__ = ["Delta", "LowRank", "Param", "dense", "merge_adapters", "registry", "stack_factors"]


def merge_adapters(
    adapters: Sequence[Mapping[str, LowRank]],
    method: str,
    weights: Sequence[float] | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Delta]:
    """Merge T adapters (module name -> factors) with one registered method.

    Raises:
        KeyError: unknown method.
        ValueError: the adapters do not cover the same modules, or a parameter is unknown.
    """
    spec = registry.get(method)
    if not adapters:
        raise ValueError("merge_adapters needs at least one adapter")
    modules = list(adapters[0])
    for i, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != set(modules):
            missing = sorted(set(modules) ^ set(adapter))[:5]
            raise ValueError(f"adapter {i} does not target the same modules as adapter 0 (differs on {missing})")
    resolved = spec.resolve_params(params)
    w = spec.resolve_weights(weights, len(adapters))
    return {name: spec.fn([a[name] for a in adapters], w, **resolved) for name in modules}
