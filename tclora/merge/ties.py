"""TIES-Merging on the exact dense deltas."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import LowRank, Param, check_same_shape
from tclora.merge.registry import register
from tclora.merge.sparsify import ties_combine

DENSITY = Param("density", 0.2, "fraction of each task's entries kept by magnitude (TIES trim; paper: top 20%)")
SCALE = Param("scale", 1.0, "λ: multiplier on the merged task vector")


def dense_stack(deltas: Sequence[LowRank], dtype: torch.dtype = torch.float32) -> Tensor:
    """The exact deltas as one ``(T, d_out, d_in)`` tensor (for methods that work entry-wise)."""
    check_same_shape(deltas)
    return torch.stack([d.B.to(dtype) @ d.A.to(dtype) for d in deltas])  # (T, d_out, d_in)


@register("ties", reference_url="https://arxiv.org/abs/2306.01708", params=[DENSITY, SCALE], default_weights="ones")
def ties(deltas: Sequence[LowRank], weights: Tensor, density: float = 0.2, scale: float = 1.0) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, on each module's dense deltas.

    Each task keeps its top ``density`` entries by magnitude; the weights then multiply the trimmed
    task vectors (default 1 each, so the result is the paper's disjoint mean); the sign of each entry is
    elected by the summed mass; the entries agreeing with it are averaged; the mean is scaled by λ.
    Sparsification destroys low rank, so the result is a dense ``(d_out, d_in)`` tensor in the input
    dtype. ``density=1.0`` merging one adapter at weight 1 returns that adapter.
    """
    stack = dense_stack(deltas)  # (T, d_out, d_in)
    return ties_combine(stack, weights, density=density, scale=scale).to(deltas[0].B.dtype)
