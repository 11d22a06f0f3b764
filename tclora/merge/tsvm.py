"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape
from tclora.merge.registry import register
from tclora.merge.svd import COMPUTE_DTYPE, factored_svd

HELP = {
    "fraction": "fraction of min(d_out, d_in) singular components kept per task (None: 1/T, the paper's choice)",
    "scale": SCALE_HELP + " (the reference uses 0.25 on full fine-tunes)",
}


def polar(M: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``M = P Σ Qᵀ`` (the nearest matrix with orthonormal columns)."""
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def kept(deltas: Sequence[LowRank], fraction: float | None) -> int:
    """Components kept per task: ``floor(fraction · min(d_out, d_in))``, at least 1 (``fraction=None``: 1/T)."""
    f = 1.0 / len(deltas) if fraction is None else fraction
    if not 0.0 < f <= 1.0:
        raise ValueError(f"tsvm: fraction must be in (0, 1], got {fraction}")
    return max(1, int(f * min(deltas[0].shape)))


@register("tsvm", reference_url="https://arxiv.org/abs/2412.00081", help=HELP)
def tsvm(deltas: Sequence[LowRank], weights: Tensor, fraction: float | None = None, scale: float = 1.0) -> LowRank:
    """TSV-M: per task, keep the top singular components, decorrelate across tasks, recombine.

    Per task ``ΔW_t = U_t S_t V_tᵀ`` (from the factors, ``factored_svd``), its top ``k`` components are
    kept (``k = min(d_out, d_in) / T`` in the paper); the kept ``U_t`` are concatenated,
    ``U = [U_1 | … | U_T]`` (d_out x Σk), and replaced by their orthogonal polar factor (``U = P Σ Qᵀ``
    → ``P Qᵀ``, Procrustes), likewise ``V``; the merge is ``λ · U_⊥ diag(w_1 S_1, …, w_T S_T) V_⊥ᵀ``,
    returned as a LoRA of rank ``Σ_t k_t``. A LoRA delta has only ``r_t`` non-zero singular values, so
    ``k_t = min(k, r_t)``: the reference, working on the dense matrix, would also keep null-space
    vectors with zero singular values, which add nothing to the sum but would, arbitrarily, change the
    polar factors. One adapter (and fraction 1) returns that adapter: a single ``U_t`` is orthonormal.

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    check_same_shape(deltas)
    k = kept(deltas, fraction)
    us, ss, vs = [], [], []
    for d, w in zip(deltas, weights.to(COMPUTE_DTYPE)):
        U, S, Vh = factored_svd(d.B.to(COMPUTE_DTYPE), d.A.to(COMPUTE_DTYPE))  # (d_out, r), (r,), (r, d_in)
        n = min(k, S.shape[0])
        us.append(U[:, :n])
        ss.append(w * S[:n])
        vs.append(Vh[:n].T)
    U, S, V = polar(torch.cat(us, dim=1)), torch.cat(ss), polar(torch.cat(vs, dim=1))  # (d_out, Σk), (Σk,), (d_in, Σk)
    return LowRank(U * (S * scale), V.T.contiguous()).to(deltas[0].B.dtype)
