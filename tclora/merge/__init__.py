"""Merge methods behind one registry; :func:`merge_adapters` applies one method to every module.

Importing this package registers every built-in method. Adding a method is one new module that
calls :func:`tclora.merge.registry.register` and one import line below.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from tclora.merge import registry
from tclora.merge.base import Delta, LowRank, Param, dense, scaled, stack_factors

# Each import registers its methods.
from tclora.merge import cp, dare, isoc, knots, linear, svd, ties, tsvm  # noqa: E402,F401  # isort: skip

__all__ = ["Delta", "LowRank", "Param", "dense", "merge_adapters", "registry", "scaled", "stack_factors"]


def merge_adapters(
    adapters: Sequence[Mapping[str, LowRank]],
    method: str,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Delta]:
    """Merge T adapters (module name -> factors) with one registered method.

    Per-module methods are called once per module with that module's T deltas; whole-model methods
    once with ``{module: [T deltas]}``. ``weights`` default to 1 each; ``params["scale"]`` (λ) then
    multiplies the merged update.

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
    if spec.whole_model:
        merged = spec.fn({name: [a[name] for a in adapters] for name in modules}, w, **resolved)
        if set(merged) != set(modules):
            raise ValueError(f"merge method {method!r} returned modules {sorted(merged)[:5]}, not the adapters' own")
        return {name: merged[name] for name in modules}
    return {name: spec.fn([a[name] for a in adapters], w, **resolved) for name in modules}
