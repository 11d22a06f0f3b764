"""The one contract every merge method follows.

A merge method works on one adapted module at a time: it receives the T adapters' low-rank deltas for
that module (``ΔW_t = B_t @ A_t``, the LoRA scaling already folded into ``B_t``) and one weight per
adapter, and returns the merged delta, as factors (a LoRA of some rank) where the method allows it,
or as a dense ``(d_out, d_in)`` tensor where it does not (TIES, DARE). Merge code is pure tensors: no
PEFT model, no Ray, no files.

A *whole-model* method (``register(..., whole_model=True)``) instead receives every module at once,
``{module: [ΔW_1, …, ΔW_T]}``, and returns ``{module: merged delta}``: KnOTS trims each task's
coordinates over the whole model, which a module-at-a-time function cannot see.

Every method has a parameter ``scale`` (λ) with one meaning: the method computes its merged update from
the deltas with the given weights (1 each by default), and λ multiplies that update. So ``linear`` at
λ = 1/T is the mean of the task vectors, ``cat`` at λ = 1 their sum, TIES at λ = 1 the paper's disjoint
mean. Parameters and their defaults are read from the function's signature (as mergekit's
``easy_define`` does): a default is written once, in the ``def`` line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor


@dataclass
class LowRank:
    """A low-rank update ``B @ A`` with the LoRA scaling folded into ``B``."""

    B: Tensor  # (d_out, r)
    A: Tensor  # (r, d_in)

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError("LowRank needs B (d_out, r) and A (r, d_in); "
                             f"got {tuple(self.B.shape)} and {tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> Tensor:
        return self.B @ self.A  # (d_out, d_in)

    def to(self, *args: Any, **kwargs: Any) -> "LowRank":
        return LowRank(self.B.to(*args, **kwargs), self.A.to(*args, **kwargs))


Delta = LowRank | Tensor  # what a merge returns for one module


def dense(delta: Delta) -> Tensor:
    return delta.dense() if isinstance(delta, LowRank) else delta


def scaled(delta: Delta, scale: float) -> Delta:
    """``λ · delta``: for factors only ``B`` is multiplied, so the rank and ``A`` stay as they are."""
    if isinstance(delta, LowRank):
        return LowRank(delta.B * scale, delta.A)
    return delta * scale


@dataclass(frozen=True)
class Param:
    """A method parameter: name, default (from the function's signature) and help."""

    name: str
    default: Any
    help: str


class MergeFn(Protocol):
    def __call__(self, deltas: Sequence[LowRank], weights: Tensor, **params: Any) -> Delta: ...


@dataclass(frozen=True)
class MergeMethod:
    """A registered method.

    Attributes:
        rank_param: the method has a ``rank`` parameter that the pipeline sets from ``merge.cp_rank``
            (cp, svd), so a sweep over the CP rank re-merges it and nothing else.
        whole_model: ``fn`` takes ``{module: [deltas]}`` and returns ``{module: delta}`` (see module doc).
    """

    name: str
    fn: Callable[..., Any]
    reference_url: str
    params: tuple[Param, ...] = field(default_factory=tuple)
    rank_param: bool = False
    whole_model: bool = False

    def resolve_params(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; an unknown name is an error naming the method."""
        given = dict(given or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no parameter(s) {unknown}; known: {sorted(known)}")
        return {p.name: given.get(p.name, p.default) for p in self.params}

    def resolve_weights(self, weights: Sequence[float] | None, n: int) -> Tensor:
        """Per-adapter weights, 1 each by default (λ, not the weights, sets the overall size)."""
        if weights is None:
            return torch.ones(n)
        if len(weights) != n:
            raise ValueError(f"merge method {self.name!r}: got {len(weights)} weights for {n} adapters")
        return torch.tensor(list(weights), dtype=torch.float32)


def signature_params(name: str, fn: Callable[..., Any], help: Mapping[str, str]) -> tuple[Param, ...]:
    """The keyword parameters after ``(deltas, weights)``, defaults from the signature, help from ``help``.

    Raises:
        ValueError: a parameter without a default or without help, a help entry naming no parameter,
            or no ``scale`` parameter (every method takes λ).
    """
    sig = list(inspect.signature(fn).parameters.values())[2:]  # after (deltas | modules, weights)
    params = []
    for p in sig:
        if p.default is inspect.Parameter.empty:
            raise ValueError(f"merge method {name!r}: parameter {p.name!r} needs a default in the signature")
        if not help.get(p.name):
            raise ValueError(f"merge method {name!r}: parameter {p.name!r} needs a help text (register(help=...))")
        params.append(Param(p.name, p.default, help[p.name]))
    extra = sorted(set(help) - {p.name for p in params})
    if extra:
        raise ValueError(f"merge method {name!r}: help for unknown parameter(s) {extra}")
    if "scale" not in {p.name for p in params}:
        raise ValueError(f"merge method {name!r}: every method takes `scale` (λ)")
    return tuple(params)


def stack_factors(deltas: Sequence[LowRank], weights: Tensor | None = None) -> LowRank:
    """``[w_1 B_1 | … | w_T B_T] @ [A_1; …; A_T]``: the exact weighted sum as one LoRA of rank Σ r_t."""
    if weights is None:
        weights = torch.ones(len(deltas))
    B = torch.cat([w.to(d.B.dtype) * d.B for w, d in zip(weights, deltas)], dim=1)  # (d_out, Σr)
    A = torch.cat([d.A for d in deltas], dim=0)  # (Σr, d_in)
    return LowRank(B, A)


def check_same_shape(deltas: Sequence[LowRank]) -> None:
    if not deltas:
        raise ValueError("merge needs at least one adapter")
    shapes = {d.shape for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"adapters disagree on the module shape: {sorted(shapes)}")


# Help shared by every method's λ.
SCALE_HELP = "λ: multiplier on the merged update computed with the given weights (1 each by default)"

MergeDecorator = Callable[[Callable[..., Any]], Callable[..., Any]]
