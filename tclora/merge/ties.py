"""TIES-Merging on the exact dense deltas."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape
from tclora.merge.registry import register
from tclora.merge.sparsify import ties_combine

DENSITY_HELP = "fraction of each task's entries kept by magnitude (TIES trim; paper: top 20%)"


def dense_stack(deltas: Sequence[LowRank], dtype: torch.dtype | None = None) -> Tensor:
    """The exact deltas as one ``(T, d_out, d_in)`` tensor (for methods that work entry-wise).

    ``dtype`` None: the factors' dtype, at least float32 (half-precision factors are multiplied in float32).
    """
    check_same_shape(deltas)
    dtype = dtype or torch.promote_types(deltas[0].B.dtype, torch.float32)
    return torch.stack([d.B.to(dtype) @ d.A.to(dtype) for d in deltas])  # (T, d_out, d_in)


@register("ties", reference_url="https://arxiv.org/abs/2306.01708",
          help={"density": DENSITY_HELP, "scale": SCALE_HELP})
def ties(deltas: Sequence[LowRank], weights: Tensor, density: float = 0.2, scale: float = 1.0) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, on each module's dense deltas.

    Each task keeps its top ``density`` entries by magnitude; the weights then multiply the trimmed
    task vectors (default 1 each, so the result is the paper's disjoint mean); the sign of each entry is
    elected by the summed mass; the entries agreeing with it are averaged; the mean is scaled by λ
    (the paper picks λ on validation from 0.8 … 2.5). Sparsification destroys low rank, so the result
    is a dense ``(d_out, d_in)`` tensor in the input dtype. ``density=1.0`` merging one adapter at
    weight 1 returns that adapter.
    """
    stack = dense_stack(deltas)  # (T, d_out, d_in)
    return ties_combine(stack, weights, density=density, scale=scale).to(deltas[0].B.dtype)
