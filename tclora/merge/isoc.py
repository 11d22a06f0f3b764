"""Iso-C: isotropic merging in the common subspace (Marczak et al., 2025)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape, stack_factors
from tclora.merge.registry import register
from tclora.merge.svd import COMPUTE_DTYPE, factored_svd

# Singular values below this fraction of the largest are numerical zeros of a sum of rank Σr.
RELATIVE_TOL = 1e-10


@register("isoc", reference_url="https://arxiv.org/abs/2502.04959", help={"scale": SCALE_HELP})
def isoc(deltas: Sequence[LowRank], weights: Tensor, scale: float = 1.0) -> LowRank:
    """Iso-C: flatten the spectrum of the task-vector sum to its mean singular value.

    ``Σ_t w_t ΔW_t = U S Vᵀ`` (from the stacked factors, ``factored_svd``); every singular value is
    replaced by their mean ``s̄``, so the merge is ``λ · s̄ · U Vᵀ``: every direction of the common
    subspace is amplified equally. The spectrum is that of the sum's own span (its ``k <= Σ r_t``
    non-zero singular values): the reference, written for full-rank task vectors, averages all
    ``min(d_out, d_in)`` values and recombines with the full ``U``, ``V``, which for a low-rank sum would
    add arbitrary null-space directions; on a full-rank sum the two are the same. Returned as a LoRA of
    rank ``k``.
    """
    check_same_shape(deltas)
    stacked = stack_factors([d.to(COMPUTE_DTYPE) for d in deltas], weights.to(COMPUTE_DTYPE))
    U, S, Vh = factored_svd(stacked.B, stacked.A)  # (d_out, Σr), (Σr,), (Σr, d_in)
    k = max(1, int((S > RELATIVE_TOL * S.max().clamp(min=1e-300)).sum()))
    return LowRank(U[:, :k] * (S[:k].mean() * scale), Vh[:k]).to(deltas[0].B.dtype)
