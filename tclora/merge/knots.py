"""KnOTS: align the adapters in one SVD basis, then TIES-merge their scaled coordinates there.

A whole-model method (see :mod:`tclora.merge.base`): the authors trim each task's coordinates over
every module at once (gstoica27/KnOTS, ``scope="model"``); ``scope="module"`` trims within each module.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape
from tclora.merge.registry import register
from tclora.merge.sparsify import linear_combine, ties_combine
from tclora.merge.svd import COMPUTE_DTYPE, block_svd, pad_rank

RELATIVE_TOL = 1e-10  # singular values below this fraction of the largest are numerical zeros

HELP = {
    "combine": "how the aligned per-task coordinates diag(S) V_tᵀ are merged: 'ties' (paper) or 'linear'",
    "density": "TIES trim: fraction of each task's coordinates kept by magnitude (ignored by 'linear'; "
               "the authors pick it on validation: 1.0 for Llama-3-8B, 0.2 for ViT-B)",
    "rank": "keep the top `rank` joint singular components (None: all Σ r_t) and pad to exactly it",
    "scope": "where the TIES trim ranks magnitudes: 'model' (every module at once, as the authors) or 'module'",
    "scale": SCALE_HELP,
}


def aligned(deltas: Sequence[LowRank], rank: int | None) -> tuple[Tensor, Tensor]:
    """One module's shared basis ``U (d_out, k)`` and per-task coordinates ``diag(S) V_tᵀ``, ``(T, k, d_in)``.

    ``[ΔW_1 | … | ΔW_T] = U S [V_1ᵀ | … | V_Tᵀ]`` (from QR of the stacked ``B_t`` and of each ``A_tᵀ``,
    ``block_svd``: nothing ``d_out x T·d_in`` is formed), so ``ΔW_t = U · (diag(S) V_tᵀ)``; components with
    ``s <= 1e-10 s_max`` are dropped, then at most ``rank`` kept.
    """
    check_same_shape(deltas)
    B = torch.cat([d.B.to(COMPUTE_DTYPE) for d in deltas], dim=1)  # (d_out, Σr)
    U, S, vh_blocks = block_svd(B, [d.A.to(COMPUTE_DTYPE) for d in deltas])  # (d_out, k), (k,), T x (k, d_in)
    # Numerically zero components carry no task content but would count in the trim's top-K budget: dropped,
    # as the authors keep only s > 1e-5 (relative here, so the cut does not depend on the deltas' scale).
    k = max(1, int((S > RELATIVE_TOL * S[0]).sum())) if S.numel() and S[0] > 0 else S.shape[0]
    k = k if rank is None else min(rank, k)
    coords = torch.stack([S[:k, None] * vh[:k] for vh in vh_blocks])  # (T, k, d_in): singular values applied
    return U[:, :k], coords


@register("knots", reference_url="https://arxiv.org/abs/2410.19735", help=HELP, whole_model=True)
def knots(
    modules: Mapping[str, Sequence[LowRank]],
    weights: Tensor,
    combine: str = "ties",
    density: float = 0.2,
    rank: int | None = None,
    scope: str = "model",
    scale: float = 1.0,
) -> dict[str, LowRank]:
    """KnOTS (Stoica et al. 2024): SVD the side-by-side deltas, merge each task's ``diag(S) V_tᵀ``.

    Each task is represented in the module's shared left basis ``U`` by ``diag(S) V_tᵀ`` (the singular
    values applied *before* trimming, as the authors do); these are merged with TIES (weights multiply
    them, sign election by summed mass, disjoint mean, times λ) or ``λ Σ_t w_t`` (``combine="linear"``),
    and the merged delta is ``U @ merged``, returned as ``LowRank(B = U, A = merged)``. With
    ``scope="model"`` the TIES trim keeps each task's top ``density`` of its coordinates over all modules
    together (each task's coordinates of every module flattened into one vector); sign election and the
    disjoint mean are entry-wise, so only the trim depends on the scope. With ``combine="linear"`` and
    every component kept this is exactly ``λ Σ_t w_t ΔW_t``.

    Args:
        modules: ``{module: [ΔW_1 … ΔW_T]}``.
        weights: ``(T,)``.

    Raises:
        ValueError: unknown ``combine`` or ``scope``, or ``rank < 1``.
    """
    if combine not in ("linear", "ties"):
        raise ValueError(f"knots: combine must be 'linear' or 'ties', got {combine!r}")
    if scope not in ("model", "module"):
        raise ValueError(f"knots: scope must be 'model' or 'module', got {scope!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"knots: rank must be >= 1 or None, got {rank}")
    w = weights.to(COMPUTE_DTYPE)
    parts = {name: aligned(deltas, rank) for name, deltas in modules.items()}  # U (d_out, k), coords (T, k, d_in)
    if combine == "linear":
        merged = {name: linear_combine(c, w, scale=scale) for name, (_, c) in parts.items()}
    elif scope == "module":
        merged = {name: ties_combine(c, w, density=density, scale=scale) for name, (_, c) in parts.items()}
    else:
        T = len(w)
        flat = torch.cat([c.reshape(T, -1) for _, c in parts.values()], dim=1)  # (T, Σ_m k_m d_in_m)
        chunks = ties_combine(flat, w, density=density, scale=scale).split(
            [c[0].numel() for _, c in parts.values()])
        merged = {name: chunk.reshape(c.shape[1:]) for (name, (_, c)), chunk in zip(parts.items(), chunks)}
    out = {}
    for name, (U, c) in parts.items():
        k = c.shape[1]
        dtype = modules[name][0].B.dtype
        out[name] = pad_rank(LowRank(U, merged[name]), rank if rank is not None else k).to(dtype)
    return out
