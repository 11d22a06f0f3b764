"""Choosing each merge method's λ and knobs on a validation split (Ray-free, model-free).

The protocol of the papers we compare against (REFERENCES.md): task arithmetic picks λ on validation,
TIES λ and density, KnOTS λ then top-K by coordinate search. Here every method gets the same
treatment, an exhaustive search over a small grid: every value combination of the method's
:data:`KNOBS`, each at every λ of :data:`SCALES` (plus 1/T, the mean), so the chosen setting is the
validation argmax over the whole grid.

Not a coordinate search (λ, then each knob at that λ, then λ again): a knob can change what λ means,
and then a search that moves one coordinate at a time never leaves the first rule it tuned. CP's
``combine`` is one: ``mean`` is ``sum`` / T, so its best λ is T times theirs. On the demo world (LoRI-S,
``train.merge_aware`` 0.05 with adapter dropout 0.5, CP rank 12, seed 0) coordinate search kept
``mean`` at λ = 2.0 (validation 0.475: at λ = 2.0 the other rules score 0.05 and 0.075) where
``shared`` at λ = 1.0 scores 0.65, and the tuned CP merge scored 0.39 on test instead of 0.69.

Ties keep the first candidate seen (the configured setting first, then the grid in order), so a flat
score keeps the default setting. λ multiplies every method's update exactly (tests/test_merge.py), so
a method is merged once per knob setting (at λ = 1) and each λ is that merge times λ: λ costs an
evaluation, not a merge. A method with one knob of K values costs K merges and K x |λ grid| evaluations.

This module never sees a split: ``score(deltas) -> float`` is the caller's evaluation on its
validation records, so nothing here can read a test split.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from tclora.merge import Delta, LowRank, merge_adapters, registry, scaled

log = logging.getLogger(__name__)

# λ grid, on the update computed with weights 1 (so 1/T, added per call, is the mean of the task vectors).
SCALES: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
# Each method's own knobs and the values tried (the first value listed is not special: defaults come
# from the method's signature and are always among the candidates through step 1).
KNOBS: dict[str, dict[str, list[Any]]] = {
    "ties": {"density": [0.1, 0.2, 0.5, 1.0]},  # TIES paper: top-20%; KnOTS on Llama: 100%
    "knots": {"density": [0.2, 0.5, 1.0]},
    "dare": {"density": [0.1, 0.5, 0.9]},  # keep probability = 1 - drop rate
    "cp": {"combine": ["mean", "sum", "shared"]},
    "tsvm": {"fraction": [None, 0.5, 1.0]},
}

Score = Callable[[Mapping[str, Delta]], float]


@dataclass
class TuneResult:
    """The chosen setting of one method and every candidate tried (in order)."""

    method: str
    params: dict[str, Any]  # the method's params at the chosen setting, `scale` included
    score: float  # validation score at ``params``
    trials: list[dict[str, Any]] = field(default_factory=list)  # [{"params": {...}, "score": float}]

    def as_json(self) -> dict[str, Any]:
        return {"params": self.params, "validation_score": self.score, "trials": self.trials}


def grid_for(method: str, n_adapters: int, override: Mapping[str, Sequence[Any]] | None = None
             ) -> tuple[list[float], dict[str, list[Any]]]:
    """(λ values, {knob: values}) for ``method``: the defaults above, ``override`` replacing any entry.

    ``override`` is ``merge.tune_grid[method]``: a ``scale`` entry replaces the λ grid, any other key a
    knob's values.

    Raises:
        ValueError: ``override`` names a parameter the method does not have.
    """
    declared = {p.name for p in registry.get(method).params}
    override = dict(override or {})
    unknown = sorted(set(override) - declared)
    if unknown:
        raise ValueError(f"merge.tune_grid.{method}: {method!r} has no parameter(s) {unknown}; "
                         f"known: {sorted(declared)}")
    scales = override.pop("scale", None)
    if scales is None:
        scales = sorted({1.0 / n_adapters, *SCALES})
    knobs = {**KNOBS.get(method, {}), **{k: list(v) for k, v in override.items()}}
    return [float(s) for s in scales], knobs


def tune_method(
    factors: Sequence[Mapping[str, LowRank]],
    method: str,
    params: Mapping[str, Any],
    score: Score,
    weights: Sequence[float] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
) -> TuneResult:
    """Grid search for ``method``'s λ and knobs, maximising ``score`` (see the module doc).

    Args:
        factors: the T adapters, module -> factors.
        params: the method's configured parameters (``merge.params``, the CP rank, ...): the first
            candidate; knobs in the grid are varied from there, the rest stay fixed.
        score: evaluation of a merged model on validation records only, higher is better.
        weights: per-adapter weights (``merge.weights``; None: 1 each).
        grid: ``merge.tune_grid[method]`` (see :func:`grid_for`).

    Returns:
        The validation argmax over the configured setting and every (knobs, λ) of the grid, its
        score, and every trial in the order tried.
    """
    start = resolved(method, params, len(factors))
    scales, knobs = grid_for(method, len(factors), grid)
    merges: dict[tuple, dict[str, Delta]] = {}
    seen: dict[tuple, float] = {}
    trials: list[dict[str, Any]] = []

    def evaluate(setting: dict[str, Any]) -> float:
        key = tuple(sorted((k, repr(v)) for k, v in setting.items()))
        if key not in seen:
            knob_key = tuple(item for item in key if item[0] != "scale")
            if knob_key not in merges:
                merges[knob_key] = merge_adapters(factors, method, weights, {**setting, "scale": 1.0})
            merged = {m: scaled(d, setting["scale"]) for m, d in merges[knob_key].items()}
            seen[key] = float(score(merged))
            trials.append({"params": dict(setting), "score": seen[key]})
            log.info("tune %s %s -> %.4f", method, {k: setting[k] for k in ("scale", *knobs)}, seen[key])
        return seen[key]

    best, best_score = start, evaluate(start)
    knob_settings = [dict(zip(knobs, values)) for values in itertools.product(*knobs.values())]
    for knob_setting in [{k: start[k] for k in knobs}, *knob_settings]:  # the configured knobs first
        for scale in [start["scale"], *scales]:
            candidate = {**start, **knob_setting, "scale": scale}
            s = evaluate(candidate)
            if s > best_score:  # strict: ties keep the earlier (configured-first) setting
                best, best_score = candidate, s
    return TuneResult(method, best, best_score, trials)


def resolved(method: str, params: Mapping[str, Any] | None, n_adapters: int) -> dict[str, Any]:
    """Every parameter of ``method`` at ``params`` over its defaults, λ explicit.

    linear and svd default to λ = None, meaning 1/T (the mean): written as the number, so reports and
    ``best_merge.yaml`` say what ran.
    """
    out = registry.get(method).resolve_params(params)
    if out["scale"] is None:
        out["scale"] = 1.0 / n_adapters
    return out


def recommend(results: Mapping[str, TuneResult]) -> TuneResult:
    """The method with the best validation score (the first of equal scores, in ``results``' order).

    Raises:
        ValueError: nothing was tuned.
    """
    if not results:
        raise ValueError("recommend: no tuned merge method to choose from")
    return max(results.values(), key=lambda r: r.score)
