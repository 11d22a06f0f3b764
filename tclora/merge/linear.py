"""Task arithmetic (``linear``) and LoRI's concatenated merge (``cat``), both exact on the factors.

The two are the same maths, ``λ Σ_t w_t B_t A_t`` returned as one LoRA of rank ``Σ_t r_t``; they
differ only in the default λ (``linear`` averages: λ = 1/T; ``cat`` sums: λ = 1). Unlike PEFT's
``add_weighted_adapter(combination_type="linear")``, which averages the A's and the B's separately and
so adds cross terms ``B_s A_t`` (huggingface/peft#3004), nothing here mixes one adapter's B with
another's A.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape, stack_factors
from tclora.merge.registry import register


def weighted_sum(deltas: Sequence[LowRank], weights: Tensor, scale: float) -> LowRank:
    """``λ Σ_t w_t ΔW_t`` as factors ``[λ w_1 B_1 | … | λ w_T B_T] @ [A_1; …; A_T]`` (rank ``Σ r_t``)."""
    check_same_shape(deltas)
    # float64 product, so λ·w_t is not rounded to float32 before reaching float64 factors
    return stack_factors(deltas, weights.to(torch.float64) * scale)  # B (d_out, Σr), A (Σr, d_in)


@register("linear", reference_url="https://arxiv.org/abs/2212.04089",
          help={"scale": SCALE_HELP + "; None: 1/T, the mean of the task vectors"})
def linear(deltas: Sequence[LowRank], weights: Tensor, scale: float | None = None) -> LowRank:
    """Task arithmetic (Ilharco et al. 2023): ``λ Σ_t w_t ΔW_t``, by default the mean (λ = 1/T, w_t = 1).

    The paper tunes λ on the sum of task vectors on validation data (0.1 … 1.0). Returns the exact sum
    as factors (rank ``Σ r_t``); negative weights subtract.
    """
    return weighted_sum(deltas, weights, 1.0 / len(deltas) if scale is None else scale)


@register("cat", reference_url="https://arxiv.org/abs/2504.07448", help={"scale": SCALE_HELP})
def cat(deltas: Sequence[LowRank], weights: Tensor, scale: float = 1.0) -> LowRank:
    """LoRI's concatenated merge: the factors of every adapter side by side, ``λ Σ_t w_t ΔW_t``.

    Mathematically identical to :func:`linear`; it is registered separately because LoRI (and PEFT's
    ``combination_type="cat"``) default to summing the adapters (λ = 1) rather than averaging them,
    and because pipelines and reports name it as LoRI's method.
    """
    return weighted_sum(deltas, weights, scale)
