"""Sparsifiers and sign-consensus merging shared by TIES, DARE and KnOTS.

Every function works on a stack of dense task vectors ``(T, ...)`` (one row per adapter) and is pure
tensor code. The conventions follow PEFT's ``merge_utils`` (weights multiply the task vectors before
sign election; the disjoint mean divides by the number of agreeing, non-zero entries), so with unit
weights the result is exactly the TIES paper's disjoint mean.
"""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_trim(tasks: Tensor, density: float) -> Tensor:
    """Keep each task's top ``density`` fraction of entries by magnitude, zero the rest (TIES "trim").

    Args:
        tasks: ``(T, ...)`` task vectors.
        density: fraction kept per task, in ``[0, 1]``.
    """
    _check_density(density)
    if density >= 1.0:
        return tasks
    flat = tasks.reshape(tasks.shape[0], -1)  # (T, n)
    k = int(density * flat.shape[1])
    if k == 0:
        return torch.zeros_like(tasks)
    # topk picks exactly k per row, so ties at the threshold cannot keep more than the budget.
    idx = flat.abs().topk(k, dim=1).indices  # (T, k)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    return (flat * mask).reshape(tasks.shape)


def random_drop(tasks: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: drop each entry with probability ``1 - density`` and rescale survivors by ``1 / density``.

    The rescale keeps every task vector unbiased: ``E[random_drop(x)] == x``.

    Args:
        tasks: ``(T, ...)`` task vectors.
        density: keep probability, in ``(0, 1]``.
        generator: source of randomness; pass a seeded one for reproducible masks.
    """
    _check_density(density)
    if density <= 0.0:
        raise ValueError("density must be > 0 for random_drop (1/density rescale)")
    if density >= 1.0:
        return tasks
    keep = torch.rand(tasks.shape, generator=generator, device=tasks.device) < density
    return tasks * keep / density


def elect_sign(tasks: Tensor) -> Tensor:
    """TIES "elect": per entry, the sign of the summed (weighted) mass across tasks; ties go to +1.

    Args:
        tasks: ``(T, ...)`` weighted, trimmed task vectors.

    Returns:
        ``(...)`` tensor of +1 / -1.
    """
    total = tasks.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(tasks.dtype)


def disjoint_merge(tasks: Tensor, sign: Tensor) -> Tensor:
    """TIES "disjoint mean": average, per entry, only the non-zero values that agree with ``sign``.

    Entries where no task agrees stay zero.
    """
    agree = torch.sign(tasks) == sign  # (T, ...); zeros have sign 0 and never agree
    total = (tasks * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def ties_combine(tasks: Tensor, weights: Tensor, density: float = 1.0, scale: float = 1.0) -> Tensor:
    """Trim (top ``density`` per task), weight, elect signs, disjoint mean, times ``scale``.

    ``density=1.0`` skips the trim; DARE-TIES calls it that way after its own random drop.

    Args:
        tasks: ``(T, ...)`` task vectors.
        weights: ``(T,)`` per-task weights, applied to the task vectors before sign election.
        density: fraction of entries kept per task by :func:`magnitude_trim`.
        scale: the TIES paper's λ.
    """
    trimmed = magnitude_trim(tasks, density)
    weighted = trimmed * weights.to(tasks).reshape(-1, *([1] * (tasks.ndim - 1)))  # (T, ...)
    return scale * disjoint_merge(weighted, elect_sign(weighted))


def linear_combine(tasks: Tensor, weights: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · Σ_t w_t τ_t`` on dense task vectors."""
    return scale * torch.einsum("t,t...->...", weights.to(tasks), tasks)


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
