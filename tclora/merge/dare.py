"""DARE: random drop-and-rescale of each task vector, then a linear or TIES combine."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank
from tclora.merge.registry import register
from tclora.merge.sparsify import linear_combine, random_drop, ties_combine
from tclora.merge.ties import dense_stack

HELP = {
    "density": "keep probability per entry (1 - drop rate); survivors are rescaled by 1/density",
    "combine": "how the sparsified task vectors are combined: 'linear' (weighted sum) or 'ties'",
    "seed": "seed of the drop masks, so a merge is reproducible",
    "scale": SCALE_HELP,
}


@register("dare", reference_url="https://arxiv.org/abs/2311.03099", help=HELP)
def dare(
    deltas: Sequence[LowRank],
    weights: Tensor,
    density: float = 0.5,
    combine: str = "linear",
    seed: int = 0,
    scale: float = 1.0,
) -> Tensor:
    """DARE (Yu et al. 2024): drop each delta entry with probability ``1 - density``, rescale by ``1/density``.

    ``combine="linear"`` then returns ``λ Σ_t w_t τ̃_t`` (DARE + task arithmetic, unbiased for the
    weighted sum); ``combine="ties"`` elects signs and takes the disjoint mean of the weighted
    ``τ̃_t`` without a further magnitude trim (mergekit's ``dare_ties``). Weights default to 1 as in
    the paper. The masks come from a generator seeded with ``seed``, drawn task by task, so a merge is
    deterministic; every module uses the same seed (same-shaped modules get the same pattern, which
    leaves each entry's drop independent of its value). Returns a dense ``(d_out, d_in)`` tensor.

    Raises:
        ValueError: unknown ``combine``.
    """
    if combine not in ("linear", "ties"):
        raise ValueError(f"dare: combine must be 'linear' or 'ties', got {combine!r}")
    stack = dense_stack(deltas)  # (T, d_out, d_in)
    generator = torch.Generator(device=stack.device).manual_seed(int(seed))
    dropped = random_drop(stack, density, generator)
    if combine == "linear":
        merged = linear_combine(dropped, weights, scale=scale)
    else:
        merged = ties_combine(dropped, weights, density=1.0, scale=scale)
    return merged.to(deltas[0].B.dtype)
