"""Degenerate CP stacks (issue 14): the dense reference (tensorly) and the factored backend agree.

Zero stacks, rank-deficient stacks (singular ALS Grams) and R above the stack's total rank: both backends
give the same merged update and the same reconstruction error; the CP factors themselves may differ
there (components of a rank-deficient fit are not unique). Expected updates come from the maths: when R
is at least the stack's CP rank the fit is exact, so the mean rule gives ``Σ_t w_t X_t / T``.
"""

from __future__ import annotations

import pytest
import torch

from tclora.merge import LowRank, merge_adapters
from tclora.merge.cp import cp_decompose

pytest.importorskip("tensorly")
D = torch.float64
BACKENDS = ("factored", "tensorly")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()  # tiny problems: OpenMP threads only contend on a shared 2-core box
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _e(n: int, i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), n).to(D)


def _rank1(u: torch.Tensor, v: torch.Tensor) -> LowRank:
    return LowRank(u[:, None], v[None, :])


def _zero(r: int = 1) -> LowRank:
    return LowRank(torch.zeros(12, r, dtype=D), torch.zeros(r, 10, dtype=D))


_g = torch.Generator().manual_seed(0)
_u, _v = torch.randn(12, generator=_g, dtype=D), torch.randn(10, generator=_g, dtype=D)
_R2 = [LowRank(torch.randn(12, 2, generator=_g, dtype=D), torch.randn(2, 10, generator=_g, dtype=D)) for _ in range(2)]

# name: (deltas, CP ranks to try). Every R here is >= the stack's CP rank, so the fit is exact.
STACKS = {
    "zero": ([_zero(), _zero(2), _zero()], (1, 3, 6)),
    "rank1_and_zeros": ([_rank1(_u, _v), _zero(), _zero()], (2, 4)),
    # one-hot directions: the unfoldings' trailing singular values are exactly 0, so the Grams of the
    # SVD init are exactly singular (tensorly's plain solve raised here)
    "one_hot": ([_rank1(_e(12, 0), _e(10, 0)), _zero(), _zero()], (2, 4)),
    "one_hot_pair": ([_rank1(_e(12, 0), _e(10, 0)), _rank1(_e(12, 1), _e(10, 1))], (2, 4)),
    "duplicates": ([_rank1(2 * _e(12, 0), _e(10, 3))] * 2, (1, 2, 4)),
    "single_adapter": ([_rank1(_e(12, 0), _e(10, 0))], (2, 4)),
    "r_above_total_rank": (_R2, (6,)),  # total rank 2 + 2 = 4 < R = 6
}
CASES = [(name, rank) for name, (_, ranks) in STACKS.items() for rank in ranks]


@pytest.mark.parametrize("name,rank", CASES)
def test_backends_agree_on_degenerate_stacks(name, rank):
    deltas, _ = STACKS[name]
    T = len(deltas)
    exact_mean = sum(d.dense() for d in deltas) / T  # the "mean" rule at w_t = 1: Σ_t X_t / T
    params = dict(rank=rank, n_iter=200, tol=0.0)
    merged, errors = {}, {}
    for backend in BACKENDS:
        res = cp_decompose(deltas, backend=backend, **params)
        assert all(torch.isfinite(x).all() for x in (res.weights, res.C, res.U, res.V)), backend
        errors[backend] = res.errors[-1]
        for combine in ("mean", "sum"):
            out = merge_adapters([{"m": d} for d in deltas], "cp", weights=[1.0] * T,
                                 params={**params, "backend": backend, "combine": combine})["m"]
            merged[backend, combine] = out.dense()
    for backend in BACKENDS:  # the maths: an exact fit, so the merge is the exact mean / sum
        assert errors[backend] < 1e-6, (backend, errors)
        assert torch.allclose(merged[backend, "mean"], exact_mean, atol=1e-9), backend
        assert torch.allclose(merged[backend, "sum"], T * exact_mean, atol=1e-9), backend
    assert abs(errors["factored"] - errors["tensorly"]) < 1e-6
    if name == "zero":  # the exact zero update and error, not 0/0
        assert all(torch.equal(m, torch.zeros_like(m)) for m in merged.values())
        assert errors == {"factored": 0.0, "tensorly": 0.0}


def test_backends_agree_below_the_rank_of_a_rank_deficient_stack():
    # Two copies of one rank-2 adapter and a zero one (total rank 6, CP rank 2), fitted at R = 1: a
    # genuine approximation whose Grams are still singular on the way. Same fit, same merged update.
    deltas = [_R2[0], _R2[0], _zero(2)]
    params = dict(rank=1, n_iter=100, tol=0.0)
    res = {b: cp_decompose(deltas, backend=b, **params) for b in BACKENDS}
    assert abs(res["factored"].errors[-1] - res["tensorly"].errors[-1]) < 1e-8
    assert res["factored"].errors[-1] > 0.1  # rank 1 cannot fit a rank-2 adapter
    out = {b: merge_adapters([{"m": d} for d in deltas], "cp", params={**params, "backend": b})["m"].dense()
           for b in BACKENDS}
    assert torch.allclose(out["factored"], out["tensorly"], atol=1e-8)
