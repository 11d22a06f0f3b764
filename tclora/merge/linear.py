"""Task arithmetic (``linear``) and LoRI's concatenated merge (``cat``), both exact on the factors.

The two are the same maths, ``Σ_t w_t B_t A_t`` returned as one LoRA of rank ``Σ_t r_t``; they
differ only in the default weights (``linear`` averages, ``cat`` sums). Unlike PEFT's
``add_weighted_adapter(combination_type="linear")``, which averages the A's and the B's separately and
so adds cross terms ``B_s A_t`` (huggingface/peft#3004), nothing here mixes one adapter's B with
another's A.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from tclora.merge.base import LowRank, check_same_shape, stack_factors
from tclora.merge.registry import register


def _weighted_sum(deltas: Sequence[LowRank], weights: Tensor) -> LowRank:
    check_same_shape(deltas)
    return stack_factors(deltas, weights)  # B (d_out, Σr), A (Σr, d_in)


@register("linear", reference_url="https://arxiv.org/abs/2212.04089")
def linear(deltas: Sequence[LowRank], weights: Tensor) -> LowRank:
    """Task arithmetic (Ilharco et al. 2023): ``Σ_t w_t ΔW_t``, by default the mean (``w_t = 1/T``).

    Returns the exact sum as factors ``[w_1 B_1 | … | w_T B_T] @ [A_1; …; A_T]`` (rank ``Σ r_t``);
    negative weights subtract.
    """
    return _weighted_sum(deltas, weights)


@register("cat", reference_url="https://arxiv.org/abs/2504.07448", default_weights="ones")
def cat(deltas: Sequence[LowRank], weights: Tensor) -> LowRank:
    """LoRI's concatenated merge: the factors of every adapter side by side, ``Σ_t w_t ΔW_t``.

    Mathematically identical to :func:`linear`; it is registered separately because LoRI (and PEFT's
    ``combination_type="cat"``) default to summing the adapters (``w_t = 1``) rather than averaging
    them, and because pipelines and reports name it as LoRI's method.
    """
    return _weighted_sum(deltas, weights)
