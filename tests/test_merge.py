"""Merge methods: one table over every registered method, then each method's own maths."""

from __future__ import annotations

import time

import pytest
import torch

from tclora.merge import LowRank, dense, merge_adapters, registry
from tclora.merge.cp import cp_decompose, normalize_cp


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These problems are tiny: on a busy 2-core box, OpenMP threads spinning against other processes
    # make each small matmul ~25x slower, so run them on one thread and restore the setting after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_adapters(T=3, d_out=24, d_in=20, r=3, seed=0, dtype=torch.float32, modules=("q", "v")):
    g = torch.Generator().manual_seed(seed)
    return [
        {m: LowRank(torch.randn(d_out, r, generator=g, dtype=dtype), torch.randn(r, d_in, generator=g, dtype=dtype))
         for m in modules}
        for _ in range(T)
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    # Not torch.testing.assert_close: on torch 2.13 its first call imports torch.distributed (seconds).
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), f"max abs difference {err:.3g}"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- one table over every method
T, R_ADAPTER = 3, 3
# name: (output kind, rank with default params for T adapters of rank r, params that make one adapter an identity)
EXPECTED = {
    "linear": ("lowrank", T * R_ADAPTER, {}),
    "cat": ("lowrank", T * R_ADAPTER, {}),
    "ties": ("dense", None, {"density": 1.0}),
    "dare": ("dense", None, {"density": 1.0}),
    "svd": ("lowrank", 4, {"rank": R_ADAPTER}),
    "knots": ("lowrank", T * R_ADAPTER, {"density": 1.0}),
    "cp": ("lowrank", 4, {"rank": R_ADAPTER, "n_iter": 50}),
    "tsvm": ("lowrank", T * R_ADAPTER, {"fraction": 1.0}),
    "isoc": ("lowrank", T * R_ADAPTER, None),  # flattens the spectrum: identity only for rank-1 (tested below)
}
RANK_PARAM = {"cp", "svd"}  # the methods that take merge.cp_rank


def test_table_covers_every_registered_method():
    assert sorted(EXPECTED) == registry.names()


@pytest.mark.parametrize("name", registry.names())
def test_method_contract(name):
    kind, rank, identity_params = EXPECTED[name]
    spec = registry.get(name)
    assert spec.reference_url.startswith("https://")
    assert all(p.help for p in spec.params)

    adapters = make_adapters(T=T, r=R_ADAPTER)
    merged = merge_adapters(adapters, name)
    assert set(merged) == {"q", "v"}
    for delta in merged.values():
        assert isinstance(delta, LowRank if kind == "lowrank" else torch.Tensor)
        assert tuple(delta.shape) == (24, 20)
        if kind == "lowrank":
            assert delta.rank == rank
        assert dense(delta).dtype == torch.float32
        assert torch.isfinite(dense(delta)).all()

    assert spec.rank_param == (name in RANK_PARAM)
    if identity_params is None:
        return
    # One adapter at weight 1 comes back unchanged.
    one = make_adapters(T=1, r=R_ADAPTER, seed=1)
    back = merge_adapters(one, name, weights=[1.0], params=identity_params)
    for m, delta in back.items():
        assert rel(dense(delta), one[0][m].dense()) < 1e-4, name


# ---------------------------------------------------------------- linear / cat
def test_linear_and_cat_are_exact_weighted_sums():
    a, b = (x["q"] for x in make_adapters(T=2, dtype=torch.float64))
    for name in ("linear", "cat"):
        diff = merge_adapters([{"q": a}, {"q": b}], name, [1.0, -1.0], {"scale": 1.0})["q"]
        assert torch.equal(diff.B, torch.cat([a.B, -b.B], dim=1)) and torch.equal(diff.A, torch.cat([a.A, b.A]))
        assert_close(diff.dense(), a.dense() - b.dense(), rtol=0, atol=1e-12)

    adapters = make_adapters(T=3, dtype=torch.float64)
    w = [0.5, -0.25, 1.375]  # exact in float32, the dtype merge_adapters resolves weights to
    got = merge_adapters(adapters, "linear", weights=w, params={"scale": 1.0})["q"].dense()
    assert_close(got, sum(wt * x["q"].dense() for wt, x in zip(w, adapters)), rtol=0, atol=1e-12)
    # Default weights: linear averages, cat sums.
    mean = merge_adapters(adapters, "linear")["q"].dense()
    total = merge_adapters(adapters, "cat")["q"].dense()
    assert_close(total, 3 * mean)


@pytest.mark.slow  # importing peft costs seconds; the maths itself is instant
def test_cat_matches_peft_add_weighted_adapter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(model, config, adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    ours = [{"0": LowRank(layer.lora_B[n].weight * layer.scaling[n], layer.lora_A[n].weight)}
            for n in ("first", "second")]
    model.add_weighted_adapter(["first", "second"], [0.7, -1.5], "both", combination_type="cat")
    expected = layer.get_delta_weight("both")
    got = merge_adapters(ours, "cat", weights=[0.7, -1.5])["0"].dense()
    assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ties / dare
def as_lowrank(matrix):
    return LowRank(torch.tensor(matrix, dtype=torch.float64), torch.eye(len(matrix[0]), dtype=torch.float64))


def test_ties_hand_computed():
    # density 0.5 keeps each task's 2 largest of 4 entries:
    #   τ1 → [[3, 0], [0, 2]]   τ2 → [[-4, 1.5], [0, 0]]   τ3 → [[2, -3], [0, 0]]
    # summed mass [[1, -1.5], [0, 2]] elects signs [[+, -], [+, +]];
    # disjoint mean: (3+2)/2, -3 alone (1.5 disagrees), nothing kept, 2 alone.
    tasks = [[[3, -1], [0.5, 2]], [[-4, 1.5], [1, -0.2]], [[2, -3], [0.1, 1]]]
    adapters = [{"m": as_lowrank(t)} for t in tasks]
    got = merge_adapters(adapters, "ties", params={"density": 0.5})["m"]
    assert_close(got, torch.tensor([[2.5, -3.0], [0.0, 2.0]], dtype=torch.float64))
    scaled = merge_adapters(adapters, "ties", params={"density": 0.5, "scale": 0.5})["m"]
    assert_close(scaled, 0.5 * got)


def test_dare_is_seeded_and_unbiased():
    adapters = make_adapters(T=3, d_out=16, d_in=16, r=2, modules=("m",))
    w = [0.5, 0.3, 0.2]
    run = lambda seed, combine="linear": merge_adapters(adapters, "dare", w, {"seed": seed, "combine": combine})["m"]  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert torch.equal(run(3, "ties"), run(3, "ties"))
    # E[drop-and-rescale] is the task vector, so the mean over seeds approaches the linear merge.
    mean = torch.stack([run(s) for s in range(400)]).mean(0)
    assert rel(mean, merge_adapters(adapters, "cat", w)["m"].dense()) < 0.1


def test_dare_rejects_unknown_combine():
    with pytest.raises(ValueError, match="combine"):
        merge_adapters(make_adapters(T=2), "dare", params={"combine": "mean"})


# ---------------------------------------------------------------- svd / knots
def test_svd_matches_dense_truncation():
    adapters = make_adapters(T=3, d_out=32, d_in=28, r=3, dtype=torch.float64)
    w = [0.4, 0.4, -0.2]
    total = sum(wt * x["q"].dense() for wt, x in zip(w, adapters))
    U, S, Vh = torch.linalg.svd(total)
    for k in (2, 5):
        got = merge_adapters(adapters, "svd", w, {"rank": k, "scale": 1.0})["q"]
        assert got.rank == k
        assert_close(torch.linalg.svdvals(got.dense())[:k], S[:k])
        assert_close(got.dense(), U[:, :k] @ torch.diag(S[:k]) @ Vh[:k])
    # the sum has rank 9: zero-padded to 12
    padded = merge_adapters(adapters, "svd", w, {"rank": 12, "scale": 1.0})["q"]
    assert padded.rank == 12 and padded.B[:, 9:].abs().max() == 0
    assert_close(padded.dense(), total)


def test_knots_linear_full_rank_is_linear():
    adapters = make_adapters(T=4, d_out=20, d_in=24, r=2, dtype=torch.float64)
    w = [0.3, 0.1, -0.4, 0.8]
    got = merge_adapters(adapters, "knots", w, {"combine": "linear"})["q"].dense()
    assert_close(got, merge_adapters(adapters, "cat", w)["q"].dense())
    truncated = merge_adapters(adapters, "knots", w, {"rank": 3})["q"]
    assert truncated.rank == 3 and torch.isfinite(truncated.dense()).all()


# ---------------------------------------------------------------- cp
def stack(adapters, module="q"):
    return torch.stack([x[module].dense() for x in adapters])  # (T, d_out, d_in)


def reconstruct(res):
    return torch.einsum("k,tk,ik,jk->tij", res.weights, res.C, res.U, res.V)  # (T, d_out, d_in)


def test_cp_full_rank_reconstructs_the_stack():
    adapters = make_adapters(T=3, d_out=16, d_in=18, r=2, dtype=torch.float64)
    deltas = [x["q"] for x in adapters]
    res = cp_decompose(deltas, rank=6, n_iter=300)  # R = T·r: the stack's CP rank is at most 6
    assert rel(reconstruct(res), stack(adapters)) < 1e-4
    assert abs(res.errors[-1] - rel(reconstruct(res), stack(adapters))) < 1e-6  # the factored error is the true one


def test_cp_merge_is_weighted_sum_of_reconstructions():
    adapters = make_adapters(T=3, dtype=torch.float64)
    deltas, w = [x["q"] for x in adapters], torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    res = cp_decompose(deltas, rank=4, n_iter=30)
    merged = merge_adapters(adapters, "cp", w.tolist(), {"n_iter": 30, "combine": "sum"})["q"]
    assert_close(merged.dense(), torch.einsum("t,tij->ij", w, reconstruct(res)))
    mean = merge_adapters(adapters, "cp", w.tolist(), {"n_iter": 30})["q"]  # the default rule divides by T
    assert_close(mean.dense(), merged.dense() / 3)


@pytest.mark.parametrize("rank", [2, 5])  # 5 > T: tensorly fills the extra task columns at random
def test_cp_factored_matches_tensorly(rank):
    pytest.importorskip("tensorly")
    deltas = [x["q"] for x in make_adapters(T=4, d_out=20, d_in=16, r=2, dtype=torch.float64)]
    kw = dict(rank=rank, n_iter=25, tol=0.0, seed=7, dtype=torch.float64)
    fac, ref = cp_decompose(deltas, backend="factored", **kw), cp_decompose(deltas, backend="tensorly", **kw)
    assert len(fac.errors) == len(ref.errors) == 25
    assert abs(fac.fit - ref.fit) < 1e-3
    assert_close(reconstruct(fac), reconstruct(ref), rtol=1e-6, atol=1e-6)
    # A float32 dense run still agrees on the fit at this size.
    assert abs(cp_decompose(deltas, rank=rank, n_iter=25, backend="tensorly", dtype=torch.float32).fit - fac.fit) < 1e-3


def test_cp_normalisation_removes_scale_sign_and_order():
    deltas = [x["q"] for x in make_adapters(T=3, dtype=torch.float64)]
    res = cp_decompose(deltas, rank=3, n_iter=20)
    lam, C, U, V = res.weights, res.C, res.U, res.V
    a, b, c = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.5, -1.0]), torch.tensor([-1.0, 4.0, 1.0])
    scale = torch.tensor([1.0, -2.0, 1.5])  # λ·a·b·c must stay λ: compensate in the weights
    perm = torch.tensor([2, 0, 1])
    messy = ((lam / (a * b * c) * scale)[perm], (C * a)[:, perm], (U * b)[:, perm], (V * c / scale)[:, perm])
    for x, y in zip(normalize_cp(*messy), (lam, C, U, V)):
        assert_close(x, y)
    assert (lam >= 0).all() and (lam[:-1] >= lam[1:]).all() and (C.sum(0) >= 0).all()


def test_cp_factored_never_builds_the_dense_tensor():
    # d = 100k: one dense d x d delta alone would need 40 GB (the T x d x d stack 400 GB), more than
    # this machine has, so finishing at all (and fast) shows every product came from the factors.
    d, T, r = 100_000, 10, 4
    g = torch.Generator().manual_seed(0)
    deltas = [LowRank(torch.randn(d, r, generator=g) / d**0.5, torch.randn(r, d, generator=g) / d**0.5)
              for _ in range(T)]
    start = time.process_time()  # CPU time of this process: robust to other jobs sharing the machine
    merged = merge_adapters([{"m": x} for x in deltas], "cp", params={"rank": 4, "n_iter": 5})["m"]
    assert time.process_time() - start < 10
    assert merged.shape == (d, d) and merged.rank == 4 and torch.isfinite(merged.B).all()


def test_cp_handles_stacks_of_lower_rank_than_r():
    # A LoRI-S mask can leave a module's B almost empty: here one adapter is rank 1 and two are zero,
    # so every ALS Gram is singular for R = 2. The merge must still fit the one direction there is.
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(12, 1, generator=g, dtype=torch.float64), torch.randn(1, 10, generator=g, dtype=torch.float64)
    zero = LowRank(torch.zeros(12, 1, dtype=torch.float64), torch.zeros(1, 10, dtype=torch.float64))
    deltas = [LowRank(u, v), zero, zero]
    res = cp_decompose(deltas, rank=2, n_iter=20)
    assert all(torch.isfinite(x).all() for x in (res.weights, res.C, res.U, res.V))
    assert res.fit > 1 - 1e-6  # the stack is exactly rank 1
    merged = merge_adapters([{"m": d} for d in deltas], "cp", params={"rank": 2, "n_iter": 20})["m"]
    assert_close(merged.dense(), (u @ v) / 3, atol=1e-9)


def test_cp_rejects_bad_settings():
    deltas = [x["q"] for x in make_adapters(T=2)]
    for bad in ({"backend": "dense"}, {"init": "nvecs"}, {"rank": 0}):
        with pytest.raises(ValueError):
            cp_decompose(deltas, **bad)


# ---------------------------------------------------------------- errors from merge_adapters
def test_unknown_method_lists_known_names():
    with pytest.raises(KeyError, match="known: .*'cp'.*'ties'"):
        merge_adapters(make_adapters(T=2), "fisher")


def test_unknown_param_is_named():
    with pytest.raises(ValueError, match="densty"):
        merge_adapters(make_adapters(T=2), "ties", params={"densty": 0.5})


def test_mismatched_modules_and_shapes_raise():
    a, b = make_adapters(T=2)
    with pytest.raises(ValueError, match="same modules"):
        merge_adapters([a, {"q": b["q"]}], "linear")
    b = dict(b, q=LowRank(torch.randn(8, 3), torch.randn(3, 20)))
    with pytest.raises(ValueError, match="module shape"):
        merge_adapters([a, b], "linear")


def test_weights_length_must_match():
    with pytest.raises(ValueError, match="weights"):
        merge_adapters(make_adapters(T=3), "linear", weights=[1.0, 2.0])


# ---------------------------------------------------------------- λ and the registry contract
@pytest.mark.parametrize("name", registry.names())
@pytest.mark.parametrize("lam", [0.37, -2.0])
def test_scale_multiplies_every_methods_update_exactly(name, lam):
    # λ has one meaning: the update computed with weights 1, times λ (so linear at 1/T is the mean).
    adapters = make_adapters(T=T, r=R_ADAPTER, dtype=torch.float64)
    base = {"n_iter": 20} if name == "cp" else {}
    one = merge_adapters(adapters, name, params={**base, "scale": 1.0})
    got = merge_adapters(adapters, name, params={**base, "scale": lam})
    for m in one:
        assert_close(dense(got[m]), lam * dense(one[m]), rtol=1e-10, atol=1e-12)


def test_default_scale_of_linear_is_the_mean_and_of_cat_the_sum():
    adapters = make_adapters(T=3, dtype=torch.float64)
    total = sum(x["q"].dense() for x in adapters)
    assert_close(merge_adapters(adapters, "linear")["q"].dense(), total / 3, rtol=0, atol=1e-12)
    assert_close(merge_adapters(adapters, "linear", params={"scale": 1 / 3})["q"].dense(), total / 3,
                 rtol=0, atol=1e-12)
    assert_close(merge_adapters(adapters, "cat")["q"].dense(), total, rtol=0, atol=1e-12)


def test_parameters_and_defaults_come_from_the_signature(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # leave the real registry untouched

    @registry.register("toy", reference_url="https://example.org", help={"k": "a knob", "scale": "λ"})
    def toy(deltas, weights, k: int = 3, scale: float = 1.0):
        return deltas[0]

    assert ([(p.name, p.default, p.help) for p in registry.get("toy").params]
            == [("k", 3, "a knob"), ("scale", 1.0, "λ")])
    assert registry.get("ties").resolve_params(None) == {"density": 0.2, "scale": 1.0}
    with pytest.raises(ValueError, match="needs a help"):
        registry.register("nohelp", reference_url="u", help={"scale": "λ"})(lambda d, w, k=1, scale=1.0: d)
    with pytest.raises(ValueError, match="needs a default"):
        registry.register("nodefault", reference_url="u", help={"k": "x", "scale": "λ"})(lambda d, w, k, scale=1.0: d)
    with pytest.raises(ValueError, match="scale"):
        registry.register("noscale", reference_url="u", help={})(lambda d, w: d)
    with pytest.raises(ValueError, match="rank_param"):
        registry.register("norank", reference_url="u", help={"scale": "λ"}, rank_param=True)(lambda d, w, scale=1.0: d)
    with pytest.raises(ValueError, match="unknown parameter"):
        registry.register("extra", reference_url="u", help={"scale": "λ", "zz": "?"})(lambda d, w, scale=1.0: d)


def test_whole_model_methods_see_every_module(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    seen = []

    @registry.register("whole", reference_url="https://example.org", help={"scale": "λ"}, whole_model=True)
    def whole(modules, weights, scale: float = 1.0):
        seen.append({m: len(d) for m, d in modules.items()})
        return {m: d[0] for m, d in modules.items()}

    adapters = make_adapters(T=2)
    out = merge_adapters(adapters, "whole")
    assert seen == [{"q": 2, "v": 2}] and list(out) == ["q", "v"]  # one call, every module, T deltas each

    @registry.register("lossy", reference_url="https://example.org", help={"scale": "λ"}, whole_model=True)
    def lossy(modules, weights, scale: float = 1.0):
        return {"q": modules["q"][0]}

    with pytest.raises(ValueError, match="lossy"):
        merge_adapters(adapters, "lossy")
