"""Rank-truncated SVD merge, and the factored SVD helpers that KnOTS and the CP init share.

Every SVD here is of a product of thin factors, so it is computed from QR decompositions of the
factors and an SVD of a small core, never from the ``d_out x d_in`` matrix: for
``B (m, n) @ A (n, p)`` with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the
SVD of the ``n x n`` core gives the SVD of the product.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape, stack_factors
from tclora.merge.registry import register

# Factor-sized work is cheap, so it runs in float64: truncation and ALS then do not lose digits.
COMPUTE_DTYPE = torch.float64


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` without forming it.

    Args:
        B: ``(m, n)``.
        A: ``(n, p)``.

    Returns:
        ``U (m, k)``, ``S (k,)`` descending, ``Vh (k, p)`` with ``k = min(m, n, p)`` and
        ``U @ diag(S) @ Vh == B @ A``.
    """
    Q_B, R_B = torch.linalg.qr(B)  # (m, k1), (k1, n)
    Q_A, R_A = torch.linalg.qr(A.T)  # (p, k2), (k2, n)
    Um, S, Wh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # core (k1, k2)
    return Q_B @ Um, S, Wh @ Q_A.T


def block_svd(B: Tensor, blocks: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Thin SVD of ``[B_1 A_1 | … | B_T A_T] = B @ blockdiag(A_1, …, A_T)`` without forming it.

    This is the SVD of the adapters' deltas side by side (KnOTS), and of a CP tensor's mode-2 unfolding.

    Args:
        B: ``(m, Σ r_t)``, the stacked ``[B_1 | … | B_T]``.
        blocks: the ``A_t``, each ``(r_t, p)``.

    Returns:
        ``U (m, k)``, ``S (k,)`` descending, and per task ``Vh_t (k, p)`` such that
        ``B_t A_t == U @ diag(S) @ Vh_t``.
    """
    # A_tᵀ = Q_t R_t, so B·blockdiag(A_t) = [B_t R_tᵀ]_t · blockdiag(Q_tᵀ) and blockdiag(Q_t) is orthonormal.
    qrs = [torch.linalg.qr(a.T) for a in blocks]  # Q_t (p, r'_t), R_t (r'_t, r_t)
    cols, start = [], 0
    for a, (_, R) in zip(blocks, qrs):
        cols.append(B[:, start : start + a.shape[0]] @ R.T)  # (m, r'_t)
        start += a.shape[0]
    Q, R = torch.linalg.qr(torch.cat(cols, dim=1))  # (m, k), (k, Σr')
    Um, S, Wh = torch.linalg.svd(R, full_matrices=False)  # R (k, Σr'): the small core
    U = Q @ Um  # (m, k)
    vh_blocks, start = [], 0
    for c, (Q, _) in zip(cols, qrs):
        vh_blocks.append(Wh[:, start : start + c.shape[1]] @ Q.T)  # (k, p)
        start += c.shape[1]
    return U, S, vh_blocks


def pad_rank(delta: LowRank, rank: int) -> LowRank:
    """Zero-pad (or cut) a LowRank to exactly ``rank`` components, so every module exports the same r."""
    have = delta.rank
    if have >= rank:
        return LowRank(delta.B[:, :rank], delta.A[:rank])
    B = torch.cat([delta.B, delta.B.new_zeros(delta.B.shape[0], rank - have)], dim=1)  # (d_out, rank)
    A = torch.cat([delta.A, delta.A.new_zeros(rank - have, delta.A.shape[1])], dim=0)  # (rank, d_in)
    return LowRank(B, A)


@register(
    "svd",
    reference_url="https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/model.py",
    help={"rank": "rank of the merged LoRA (the pipeline passes merge.cp_rank, to compare like with like)",
          "scale": SCALE_HELP + "; None: 1/T, the truncated mean"},
    rank_param=True,
)
def svd(deltas: Sequence[LowRank], weights: Tensor, rank: int = 4, scale: float | None = None) -> LowRank:
    """Best rank-``rank`` approximation (Eckart–Young) of ``λ Σ_t w_t B_t A_t`` (default: of the mean).

    This is PEFT's ``svd`` combination computed on the exact deltas, and the baseline TC-LoRA compares
    against. The SVD comes from QR of the stacked ``[w_t B_t]`` and ``[A_t]ᵀ`` and an SVD of the
    ``Σr x Σr`` core, never the dense ``d_out x d_in`` sum. All singular values go into ``B``
    (``B = U_k diag(S_k)``, ``A = V_kᵀ``), as PEFT does and as the LoRA scaling is folded into ``B``.
    When the sum has fewer than ``rank`` components the factors are zero-padded to exactly ``rank``.
    """
    check_same_shape(deltas)
    if rank < 1:
        raise ValueError(f"svd: rank must be >= 1, got {rank}")
    lam = 1.0 / len(deltas) if scale is None else scale
    stacked = stack_factors([d.to(COMPUTE_DTYPE) for d in deltas], weights.to(COMPUTE_DTYPE))
    U, S, Vh = factored_svd(stacked.B, stacked.A)  # (d_out, k), (k,), (k, d_in)
    k = min(rank, S.shape[0])
    merged = LowRank(U[:, :k] * (S[:k] * lam), Vh[:k])
    return pad_rank(merged, rank).to(deltas[0].B.dtype)
