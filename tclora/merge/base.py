"""The one contract every merge method follows.

A merge method works on one adapted module at a time: it receives the T adapters' low-rank deltas for
that module (``ΔW_t = B_t @ A_t``, the LoRA scaling already folded into ``B_t``) and one weight per
adapter, and returns the merged delta, as factors (a LoRA of some rank) where the method allows it,
or as a dense ``(d_out, d_in)`` tensor where it does not (TIES, DARE). Merge code is pure tensors: no
PEFT model, no Ray, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor


@dataclass
class LowRank:
    """A low-rank update ``B @ A`` with the LoRA scaling folded into ``B``."""

    B: Tensor  # (d_out, r)
    A: Tensor  # (r, d_in)

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LowRank needs B (d_out, r) and A (r, d_in); got {tuple(self.B.shape)} and {tuple(self.A.shape)}")

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


@dataclass(frozen=True)
class Param:
    """A method parameter: name, default and help, the way mergekit declares them."""

    name: str
    default: Any
    help: str


class MergeFn(Protocol):
    def __call__(self, deltas: Sequence[LowRank], weights: Tensor, **params: Any) -> Delta: ...


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    reference_url: str
    params: tuple[Param, ...] = field(default_factory=tuple)
    # Default per-adapter weight: "ones" sums the task vectors, "uniform" averages them (1/T each).
    default_weights: str = "uniform"

    def resolve_params(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; an unknown name is an error naming the method."""
        given = dict(given or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"merge method {self.name!r} has no parameter(s) {unknown}; known: {sorted(known)}")
        return {p.name: given.get(p.name, p.default) for p in self.params}

    def resolve_weights(self, weights: Sequence[float] | None, n: int) -> Tensor:
        if weights is None:
            value = 1.0 if self.default_weights == "ones" else 1.0 / n
            return torch.full((n,), value)
        if len(weights) != n:
            raise ValueError(f"merge method {self.name!r}: got {len(weights)} weights for {n} adapters")
        return torch.tensor(list(weights), dtype=torch.float32)


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


MergeDecorator = Callable[[MergeFn], MergeFn]
