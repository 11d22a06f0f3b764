"""KnOTS: align the adapters in one SVD basis, then merge their coordinates there."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import LowRank, Param, check_same_shape
from tclora.merge.registry import register
from tclora.merge.sparsify import linear_combine, ties_combine
from tclora.merge.svd import COMPUTE_DTYPE, block_svd, pad_rank
from tclora.merge.ties import SCALE

PARAMS = [
    Param("combine", "ties", "how the aligned per-task V blocks are merged: 'ties' (paper default) or 'linear'"),
    Param("density", 0.2, "TIES trim: fraction of each task's V entries kept (ignored by 'linear')"),
    Param("rank", None, "keep the top `rank` joint singular components (None: all Σ r_t) and pad to exactly it"),
    SCALE,
]


@register("knots", reference_url="https://arxiv.org/abs/2410.19735", params=PARAMS, default_weights="ones")
def knots(
    deltas: Sequence[LowRank],
    weights: Tensor,
    combine: str = "ties",
    density: float = 0.2,
    rank: int | None = None,
    scale: float = 1.0,
) -> LowRank:
    """KnOTS (Stoica et al. 2024): SVD the side-by-side deltas, merge the per-task right factors.

    ``[ΔW_1 | … | ΔW_T] = U S [V_1ᵀ | … | V_Tᵀ]`` puts every adapter in one shared left basis ``U S``,
    where ``ΔW_t = U S V_tᵀ``; the ``V_tᵀ`` (``k x d_in`` each) are then merged entry-wise with TIES
    (the paper's default, weights multiplying the ``V_tᵀ``) or a weighted sum, and the result is
    ``U S V_mergedᵀ``, returned as ``LowRank(B = U S, A = V_mergedᵀ)``. The SVD is computed from QR of
    the stacked ``B_t`` and of each ``A_tᵀ`` (``block_svd``); nothing ``d_out x T·d_in`` is formed.
    With ``combine="linear"`` and all components kept this is exactly ``Σ_t w_t ΔW_t``.

    Raises:
        ValueError: unknown ``combine``, or ``rank < 1``.
    """
    check_same_shape(deltas)
    if combine not in ("linear", "ties"):
        raise ValueError(f"knots: combine must be 'linear' or 'ties', got {combine!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"knots: rank must be >= 1 or None, got {rank}")
    B = torch.cat([d.B.to(COMPUTE_DTYPE) for d in deltas], dim=1)  # (d_out, Σr)
    U, S, vh_blocks = block_svd(B, [d.A.to(COMPUTE_DTYPE) for d in deltas])  # (d_out, k), (k,), T x (k, d_in)
    k = S.shape[0] if rank is None else min(rank, S.shape[0])
    coords = torch.stack([vh[:k] for vh in vh_blocks])  # (T, k, d_in): each task in the shared basis
    w = weights.to(COMPUTE_DTYPE)
    if combine == "ties":
        merged_vh = ties_combine(coords, w, density=density, scale=scale)
    else:
        merged_vh = linear_combine(coords, w, scale=scale)
    merged = LowRank(U[:, :k] * S[:k], merged_vh)  # (d_out, k), (k, d_in)
    return pad_rank(merged, rank if rank is not None else k).to(deltas[0].B.dtype)
