"""TSV-M, Iso-C, KnOTS and CP's `shared` rule against dense references written from the papers.

Each reference works on the dense ``d_out x d_in`` deltas with plain ``torch.linalg.svd``, following
the description in /work/shared/REFERENCES.md (read from the authors' code), not our factored code.
"""

from __future__ import annotations

import pytest
import torch

from tclora.merge import LowRank, merge_adapters
from tclora.merge.cp import normalize_cp, recombine
from tests.test_merge import _one_thread, assert_close, make_adapters  # noqa: F401  (fixture re-used)


def dense_deltas(adapters, module="q"):
    return [x[module].dense() for x in adapters]  # T x (d_out, d_in)


# ---------------------------------------------------------------- TSV-M
def tsvm_reference(deltas, k, lam):
    """Per task top-k SVD; concatenate U's and V's; polar factor of each; recombine with the S's; times λ."""
    us, ss, vs = [], [], []
    for d in deltas:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        n = min(k, int((S > 1e-9 * S[0]).sum()))  # a LoRA delta has only r non-zero singular values
        us.append(U[:, :n]), ss.append(S[:n]), vs.append(Vh[:n].T)
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    P, _, Qh = torch.linalg.svd(U, full_matrices=False)
    P2, _, Qh2 = torch.linalg.svd(V, full_matrices=False)
    return lam * (P @ Qh) @ torch.diag(S) @ (P2 @ Qh2).T


@pytest.mark.parametrize("fraction,k", [(None, 3), (0.05, 1)])  # None: min(d)/T = 20/3 -> 6, capped at r = 3
def test_tsvm_matches_dense_reference(fraction, k):
    adapters = make_adapters(T=3, d_out=24, d_in=20, r=3, dtype=torch.float64)
    got = merge_adapters(adapters, "tsvm", params={"fraction": fraction, "scale": 0.25})["q"]
    assert_close(got.dense(), tsvm_reference(dense_deltas(adapters), k, 0.25), rtol=1e-9, atol=1e-10)
    assert got.rank == 3 * k


def test_tsvm_decorrelates_tasks():
    # Two tasks sharing one direction: TSV-M's orthogonalised bases make the kept vectors orthonormal.
    adapters = make_adapters(T=2, d_out=16, d_in=16, r=2, dtype=torch.float64)
    adapters[1]["q"] = LowRank(torch.cat([adapters[0]["q"].B[:, :1], adapters[1]["q"].B[:, 1:]], 1), adapters[1]["q"].A)
    got = merge_adapters(adapters, "tsvm")["q"]
    U = got.B / got.B.norm(dim=0)
    assert_close(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-9)


# ---------------------------------------------------------------- Iso-C
def test_isoc_matches_dense_reference():
    adapters = make_adapters(T=3, d_out=24, d_in=20, r=2, dtype=torch.float64)
    w = [1.0, 0.5, -1.0]
    total = sum(wt * d for wt, d in zip(w, dense_deltas(adapters)))
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    k = int((S > 1e-9 * S[0]).sum())
    assert k == 6
    expected = 0.3 * S[:k].mean() * U[:, :k] @ Vh[:k]
    got = merge_adapters(adapters, "isoc", w, {"scale": 0.3})["q"]
    assert_close(got.dense(), expected, rtol=1e-9, atol=1e-10)
    assert_close(torch.linalg.svdvals(got.dense())[:k],
                 torch.full((k,), 0.3 * float(S[:k].mean()), dtype=torch.float64))


def test_isoc_of_one_rank_one_adapter_is_that_adapter():
    g = torch.Generator().manual_seed(0)
    one = LowRank(torch.randn(12, 1, generator=g, dtype=torch.float64),
                  torch.randn(1, 10, generator=g, dtype=torch.float64))
    assert_close(merge_adapters([{"m": one}], "isoc")["m"].dense(), one.dense(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- KnOTS
def ties_reference(tasks, density, lam):
    """TIES on (T, n): per-task top-k by magnitude, sign of the summed value, disjoint mean, times λ."""
    k = int(density * tasks.shape[1])
    trimmed = torch.zeros_like(tasks)
    for t in range(tasks.shape[0]):
        idx = tasks[t].abs().argsort(descending=True)[:k]
        trimmed[t, idx] = tasks[t, idx]
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(tasks.dtype)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def knots_reference(adapters, modules, density, lam, scope):
    """[ΔW_1 | … | ΔW_T] = U S [V_1ᵀ … V_Tᵀ] (components with s > 1e-5); TIES on diag(S) V_tᵀ; U @ merged."""
    parts = {}
    for m in modules:
        deltas = dense_deltas(adapters, m)
        U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
        keep = S > 1e-5
        U, S, Vh = U[:, keep], S[keep], Vh[keep]
        d_in = deltas[0].shape[1]
        coords = torch.stack([S[:, None] * Vh[:, t * d_in:(t + 1) * d_in] for t in range(len(deltas))])  # (T, k, d_in)
        parts[m] = (U, coords)
    if scope == "module":
        return {m: U @ ties_reference(c.flatten(1), density, lam).reshape(c.shape[1:]) for m, (U, c) in parts.items()}
    flat = torch.cat([c.flatten(1) for _, c in parts.values()], dim=1)
    merged = ties_reference(flat, density, lam).split([c[0].numel() for _, c in parts.values()])
    return {m: U @ x.reshape(c.shape[1:]) for (m, (U, c)), x in zip(parts.items(), merged)}


@pytest.mark.parametrize("scope", ["model", "module"])
def test_knots_matches_dense_reference(scope):
    # Module "v" is 10x larger, so a whole-model trim keeps mostly its coordinates and a per-module one does not.
    adapters = make_adapters(T=3, d_out=16, d_in=14, r=2, dtype=torch.float64)
    for a in adapters:
        a["v"] = LowRank(10 * a["v"].B, a["v"].A)
    got = merge_adapters(adapters, "knots", params={"density": 0.3, "scale": 0.7, "scope": scope})
    expected = knots_reference(adapters, ["q", "v"], 0.3, 0.7, scope)
    for m in ("q", "v"):
        assert_close(got[m].dense(), expected[m], rtol=1e-8, atol=1e-9)
    if scope == "model":
        per_module = merge_adapters(adapters, "knots", params={"density": 0.3, "scale": 0.7, "scope": "module"})
        assert (got["q"].dense() - per_module["q"].dense()).abs().max() > 1e-3  # the scope matters


# ---------------------------------------------------------------- CP `shared`
def _shared_from_parafac(X, init_scales):
    """TC-LoRA's path (tensorly parafac, random init) from a rescaled init, then our normalised `shared`."""
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac
    from tensorly.decomposition._cp import initialize_cp

    with tl.backend_context("pytorch"):
        w0, f0 = initialize_cp(X, 3, init="random", random_state=42)
        init = (w0, [f * s for f, s in zip(f0, init_scales)])
        weights, (C, U, V) = parafac(X, 3, init=init, n_iter_max=200, tol=1e-12)
    raw = U @ V.T  # the reference's Σ_k a_k b_kᵀ: its size follows the init
    from tclora.merge.cp import CPResult

    res = CPResult(*normalize_cp(weights, C, U, V), errors=[0.0])
    return recombine(res, "shared", torch.ones(X.shape[0], dtype=X.dtype)).dense(), raw


def test_cp_shared_is_invariant_to_rescaling_the_als_init():
    X = torch.stack(dense_deltas(make_adapters(T=3, d_out=12, d_in=10, r=1, dtype=torch.float64)))  # (T, d_out, d_in)
    a, raw_a = _shared_from_parafac(X, (1.0, 1.0, 1.0))
    b, raw_b = _shared_from_parafac(X, (1e3, 1e-2, 7.0))
    assert (raw_a - raw_b).norm() / raw_a.norm() > 0.5  # the unnormalised reference moves with the init
    assert_close(b, a, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("c", [2.5, -0.3])
def test_cp_shared_scales_linearly_with_the_adapters(c):
    adapters = make_adapters(T=3, d_out=16, d_in=12, r=2, dtype=torch.float64)
    scaled = [{m: LowRank(c * x.B, x.A) for m, x in a.items()} for a in adapters]
    kw = {"combine": "shared", "rank": 3, "n_iter": 60}
    one, other = merge_adapters(adapters, "cp", params=kw)["q"], merge_adapters(scaled, "cp", params=kw)["q"]
    assert_close(other.dense(), c * one.dense(), rtol=1e-8, atol=1e-10)


def test_cp_shared_of_identical_adapters_is_sqrt_t_times_one():
    one = make_adapters(T=1, d_out=10, d_in=8, r=1, dtype=torch.float64)[0]
    got = merge_adapters([one] * 4, "cp", params={"combine": "shared", "rank": 1})["q"]
    assert_close(got.dense(), 2.0 * one["q"].dense(), rtol=1e-9, atol=1e-12)  # √T·D, T = 4


def test_knots_drops_numerically_zero_components_before_trimming():
    # Two identical adapters: [ΔW | ΔW] has rank r, not 2r; the zero components must not eat the top-K budget.
    one = make_adapters(T=1, d_out=16, d_in=14, r=2, dtype=torch.float64)[0]
    adapters = [one, {m: LowRank(x.B.clone(), x.A.clone()) for m, x in one.items()}]
    got = merge_adapters(adapters, "knots", params={"density": 0.3, "scale": 0.7, "scope": "module"})
    expected = knots_reference(adapters, ["q", "v"], 0.3, 0.7, "module")
    for m in ("q", "v"):
        assert got[m].rank == 2
        assert_close(got[m].dense(), expected[m], rtol=1e-8, atol=1e-9)
