"""TC-LoRA's joint CP merge, with a factored CP-ALS that never builds the ``T x d_out x d_in`` tensor.

Per module, the T adapters' deltas form a tensor ``X[t] = B_t A_t`` (``T x d_out x d_in``) with
``X ≈ Σ_k λ_k c_k ∘ u_k ∘ v_k``: ``U`` and ``V`` are directions shared by all adapters and ``C`` says how
much of each one every adapter uses. Two backends compute the same CP-ALS (same init, update order,
error and stopping rule as ``tensorly.decomposition.parafac``):

- ``"factored"`` (default): every ALS product is formed from the ``B_t``/``A_t`` factors, never the
  tensor. Two QRs first move the stack into orthonormal bases of ``span(B)`` and ``span(Aᵀ)``, where
  it is a ``T x Σr x Σr`` core; ALS runs there at ``O(Σr² R)`` per iteration instead of
  ``O(T d_out d_in R)`` dense — seconds instead of hours over a 7B model;
- ``"tensorly"``: ``parafac`` on the dense tensor, the reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tclora.merge.base import SCALE_HELP, LowRank, check_same_shape
from tclora.merge.registry import register
from tclora.merge.svd import block_svd

HELP = {
    "rank": "CP rank R: number of rank-1 components shared by the adapters (TC-LoRA default 4)",
    "combine": "recombination: 'mean' (Σ_t w_t X̂_t / T), 'sum' (Σ_t w_t X̂_t) or 'shared' (TC-LoRA's "
               "reference: shared factors, task loadings dropped, Σ_k λ_k u_k v_kᵀ)",
    "n_iter": "maximum ALS iterations",
    "tol": "stop when the relative error changes by less than this between iterations (0: never)",
    "init": "'svd' (leading singular vectors of each unfolding, as tensorly) or 'random'",
    "seed": "seed for random init and for the columns tensorly fills at random when R > a mode's size",
    "backend": "'factored' (from B_t, A_t; never the dense tensor) or 'tensorly' (dense parafac)",
    "scale": SCALE_HELP,
}
COMBINE_RULES = ("mean", "sum", "shared")


@dataclass
class CPResult:
    """A normalised CP decomposition ``X ≈ Σ_k weights_k C[:, k] ∘ U[:, k] ∘ V[:, k]``."""

    weights: Tensor  # (R,) λ, non-negative, descending
    C: Tensor  # (T, R) task factors, unit columns
    U: Tensor  # (d_out, R) output directions, unit columns
    V: Tensor  # (d_in, R) input directions, unit columns
    errors: list[float]  # ‖X - X̂‖ / ‖X‖ after each ALS iteration

    @property
    def fit(self) -> float:
        """``1 - ‖X - X̂‖ / ‖X‖`` at the end."""
        return 1.0 - self.errors[-1]


def normalize_cp(weights: Tensor, C: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Remove CP's scale, sign and order ambiguity so two decompositions can be compared entry-wise.

    Columns get unit norm (norms go into λ); each task column ``c_k`` is flipped so its sum is
    non-negative (``u_k`` flips with it); each ``u_k`` is flipped so its largest-magnitude entry is positive
    (``v_k`` compensates); a negative ``λ_k`` flips ``v_k``; components are sorted by ``λ`` descending.
    Zero columns stay zero with ``λ_k = 0``.

    Returns:
        ``(λ (R,), C (T, R), U (d_out, R), V (d_in, R))``.
    """
    lam = weights.clone()
    C, U, V = C.clone(), U.clone(), V.clone()
    for F in (C, U, V):
        norms = F.norm(dim=0)  # (R,)
        lam *= norms
        F /= torch.where(norms > 0, norms, torch.ones_like(norms))
    s = _signs(C.sum(dim=0))
    C *= s
    U *= s
    s = _signs(U.gather(0, U.abs().argmax(dim=0, keepdim=True)).squeeze(0))
    U *= s
    V *= s
    s = _signs(lam)
    lam *= s
    V *= s
    order = torch.argsort(lam, descending=True, stable=True)
    return lam[order], C[:, order], U[:, order], V[:, order]


def _signs(x: Tensor) -> Tensor:
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


class _Stack:
    """The T adapters of one module as stacked factors ``B = [B_1 | … | B_T]``, ``A = [A_1; …; A_T]``."""

    def __init__(self, B: Tensor, A: Tensor, ranks: Sequence[int]):
        self.T, self.ranks = len(ranks), list(ranks)
        self.B, self.A = B, A  # (d_out, Σr), (Σr, d_in)
        self.seg = torch.repeat_interleave(torch.arange(self.T, device=B.device),
                                           torch.tensor(self.ranks, device=B.device))  # (Σr,) task of each row
        self.blocks_A = list(A.split(self.ranks, dim=0))
        self.blocks_Bt = list(B.T.split(self.ranks, dim=0))

    @classmethod
    def of(cls, deltas: Sequence[LowRank], dtype: torch.dtype) -> "_Stack":
        B = torch.cat([d.B.to(dtype) for d in deltas], dim=1)
        A = torch.cat([d.A.to(dtype) for d in deltas], dim=0)
        return cls(B, A, [d.rank for d in deltas])

    def compressed(self) -> tuple["_Stack", Tensor, Tensor]:
        """The same tensor in orthonormal bases of its column spaces, ``X[t] = Q_out (R_out,t R_in,tᵀ) Q_inᵀ``.

        Every mode-2 and mode-3 vector ALS produces from an SVD init lies in ``span(B)`` and
        ``span(Aᵀ)``, so ALS on the ``T x k_out x k_in`` core (k <= Σr) makes the same iterates as on the
        full tensor, with ``U = Q_out U'`` and ``V = Q_in V'``: each iteration then costs ``O(Σr² R)``
        instead of ``O(Σr (d_out + d_in) R)``, and the only ``d``-sized work is two QRs.

        Returns:
            ``(core stack, Q_out (d_out, k_out), Q_in (d_in, k_in))``.
        """
        Q_out, R_out = torch.linalg.qr(self.B)  # (d_out, k_out), (k_out, Σr)
        Q_in, R_in = torch.linalg.qr(self.A.T)  # (d_in, k_in), (k_in, Σr)
        return _Stack(R_out, R_in.T, self.ranks), Q_out, Q_in

    def task_sum(self, rows: Tensor) -> Tensor:
        """Sum the rows ``(Σr, R)`` belonging to each task: ``(T, R)``."""
        return rows.new_zeros(self.T, rows.shape[1]).index_add_(0, self.seg, rows)

    def gram(self) -> Tensor:
        """``G_st = <ΔW_s, ΔW_t> = Σ_{a∈s, b∈t} (BᵀB)_ab (AAᵀ)_ab``: the mode-1 unfolding's Gram, ``(T, T)``."""
        H = (self.B.T @ self.B) * (self.A @ self.A.T)  # (Σr, Σr)
        return self.task_sum(self.task_sum(H).T)  # segment-sum rows, then columns (G is symmetric)


def _flip(U: Tensor, basis: Tensor | None = None) -> Tensor:
    """tensorly's ``svd_flip``: each column's largest-magnitude entry positive (of ``basis @ U``, if given)."""
    full = U if basis is None else basis @ U
    return U * _signs(full.gather(0, full.abs().argmax(dim=0, keepdim=True)).squeeze(0))


def _complete(U: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Extend orthonormal columns ``U (m, k)`` to ``n <= m`` columns with random orthonormal ones.

    A full SVD of the dense unfolding would return arbitrary null-space vectors here; any will do.
    """
    m, k = U.shape
    if k >= n:
        return U[:, :n]
    extra = torch.randn(m, n - k, generator=generator, dtype=U.dtype).to(U.device)
    extra -= U @ (U.T @ extra)  # project out span(U)
    return torch.cat([U, torch.linalg.qr(extra)[0]], dim=1)


def _init_factors(stack: _Stack, shape: tuple[int, int, int], rank: int, init: str, seed: int,
                  bases: tuple[Tensor, Tensor] | None = None) -> list[Tensor]:
    """tensorly's ``initialize_cp`` (svd or random), computed from the factors.

    ``bases``: the ``(Q_out, Q_in)`` of a :meth:`_Stack.compressed` stack, whose factors are returned in
    core coordinates (signs still chosen on the full-size vectors, as tensorly does).
    """
    rng = np.random.RandomState(seed)  # the same stream tensorly draws its random columns from
    dtype, device = stack.B.dtype, stack.B.device
    if init == "random":
        return [torch.from_numpy(rng.random_sample((n, rank))).to(dtype=dtype, device=device) for n in shape]
    if init != "svd":
        raise ValueError(f"cp: init must be 'svd' or 'random', got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode, size in enumerate(shape):
        if mode == 0:  # tasks: eigenvectors of the T x T Gram are the left singular vectors of X_(1)
            evals, evecs = torch.linalg.eigh(stack.gram())  # ascending
            n = min(rank, size)
            F = _flip(evecs.flip(1)[:, :n]) * evals.flip(0)[:n].clamp(min=0).sqrt()  # scaled by S, as tensorly
        else:  # d_out: [B_t A_t]_t = B·blockdiag(A_t); d_in: [A_tᵀ B_tᵀ]_t = Aᵀ·blockdiag(B_tᵀ)
            left, blocks = (stack.B, stack.blocks_A) if mode == 1 else (stack.A.T, stack.blocks_Bt)
            basis = None if bases is None else bases[mode - 1]
            F = _complete(_flip(block_svd(left, blocks)[0][:, :rank], basis), min(rank, size), gen)
        if size < rank:  # tensorly's fill for R larger than the mode: uniform random columns
            fill = torch.from_numpy(rng.random_sample((size, rank - size))).to(dtype=dtype, device=device)
            F = torch.cat([F, fill], dim=1)
        factors.append(F)
    return factors


def initial_factors(deltas: Sequence[LowRank], rank: int, init: str = "svd", seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> list[Tensor]:
    """The CP-ALS starting point ``[C (T, R), U (d_out, R), V (d_in, R)]``, computed from the factors.

    Equals ``tensorly.decomposition.initialize_cp(X, rank, init, random_state=seed)`` on the dense
    stack (up to the arbitrary null-space columns used when R exceeds the deltas' total rank), so it
    can also seed a dense ``parafac`` run for a like-for-like comparison.
    """
    check_same_shape(deltas)
    return _init_factors(_Stack.of(deltas, dtype), (len(deltas), *deltas[0].shape), rank, init, seed)


def _least_norm_solve(a: Tensor, b: Tensor) -> Tensor:
    """``x`` with ``a x = b`` for a symmetric ALS Gram ``a`` (R, R); where ``a`` is singular, ``a⁺ b``.

    The Gram is singular when the stacked deltas have rank below R (a LoRI-S mask can leave a module's
    B almost empty, or several adapters can be zero there); the least-norm solution through the
    pseudo-inverse then keeps ALS going where a plain solve would raise. Both backends use it (the
    dense one through tensorly's ``solve``), so they treat degenerate stacks alike.
    """
    solution, info = torch.linalg.solve_ex(a, b)
    if int(info) == 0 and bool(torch.isfinite(solution).all()):
        return solution
    return torch.linalg.pinv(a, hermitian=True) @ b


def _solve(gram: Tensor, mttkrp: Tensor) -> Tensor:
    """``mttkrp @ gram⁻¹``, as tensorly writes it (through :func:`_least_norm_solve`)."""
    return _least_norm_solve(gram.T, mttkrp.T).T


def _als_factored(stack: _Stack, factors: list[Tensor], n_iter: int, tol: float) -> tuple[list[Tensor], list[float]]:
    """CP-ALS on ``X[t] = B_t A_t`` from the factors alone (tensorly's update order, error and stop rule)."""
    C, U, V = factors
    norm_x2 = stack.gram().trace()  # ‖X‖² = Σ_t ‖B_t A_t‖²
    errors: list[float] = []
    for it in range(n_iter):
        P, Q = stack.B.T @ U, stack.A @ V  # (Σr, R): B_tᵀu_k and A_t v_k, row-blocks per task
        # mode 1, X_(1)(V ⊙ U): row t, col k = u_kᵀ B_t A_t v_k = Σ_rows (B_tᵀu_k)(A_t v_k)
        C = _solve((U.T @ U) * (V.T @ V), stack.task_sum(P * Q))
        Cr = C[stack.seg]  # (Σr, R): c_tk repeated over task t's rows
        # mode 2: col k = Σ_t c_tk B_t (A_t v_k)
        U = _solve((C.T @ C) * (V.T @ V), stack.B @ (Q * Cr))
        # mode 3: col k = Σ_t c_tk A_tᵀ (B_tᵀ u_k), with the new U
        M = stack.A.T @ ((stack.B.T @ U) * Cr)  # (d_in, R)
        V = _solve((C.T @ C) * (U.T @ U), M)
        # ‖X - X̂‖² = ‖X‖² + ‖X̂‖² - 2<X, X̂>, where <X, X̂> = Σ M ∘ V (tensorly's shortcut)
        norm_rec2 = ((C.T @ C) * (U.T @ U) * (V.T @ V)).sum()
        errors.append(float((norm_x2 + norm_rec2 - 2 * (M * V).sum()).abs().sqrt() / norm_x2.sqrt()))
        if tol and it >= 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    return [C, U, V], errors


def _als_tensorly(deltas: Sequence[LowRank], rank: int, n_iter: int, tol: float, init: str, seed: int,
                  dtype: torch.dtype) -> tuple[Tensor, list[Tensor], list[float]]:
    import tensorly as tl
    from tensorly.backend.pytorch_backend import PyTorchBackend
    from tensorly.decomposition import parafac

    X = torch.stack([d.B.to(dtype) @ d.A.to(dtype) for d in deltas])  # (T, d_out, d_in): the dense reference
    # parafac's one solve per mode is torch.linalg.solve, which raises on the singular Grams of a
    # rank-deficient stack; for the call, it takes the factored backend's pseudo-inverse fallback (the
    # same answer wherever the Gram is invertible; a process-wide class attribute, restored after).
    plain_solve = PyTorchBackend.solve
    PyTorchBackend.register_method("solve", _least_norm_solve)
    try:
        with tl.backend_context("pytorch"), warnings.catch_warnings():  # scoped: the global backend is untouched
            # tensorly warns whenever R exceeds a mode's size (T < R is normal here) and then fills at random.
            warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
            (weights, factors), errors = parafac(X, rank, n_iter_max=n_iter, init=init, tol=tol,
                                                 random_state=seed, return_errors=True)
    finally:
        PyTorchBackend.register_method("solve", plain_solve)
    return weights, list(factors), [float(e) for e in errors]


def cp_decompose(
    deltas: Sequence[LowRank],
    rank: int = 4,
    n_iter: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    seed: int = 0,
    backend: str = "factored",
    dtype: torch.dtype | None = None,
) -> CPResult:
    """Normalised CP decomposition of the stack of the adapters' deltas ``X[t] = B_t A_t``.

    Args:
        deltas: the T adapters' factors for one module.
        rank, n_iter, tol, init, seed, backend: see the ``cp`` merge parameters.
        dtype: compute dtype, float64 by default for both backends. The factored products are
            factor-sized, so it costs little; for ``"tensorly"`` it doubles the dense tensor's memory but
            keeps the reported errors honest: torch's float32 norm of a ~10⁸-entry tensor can be ~1% off,
            which shifts tensorly's float32 error by about as much.

    Raises:
        ValueError: bad ``rank``, ``n_iter``, ``init`` or ``backend``.
    """
    check_same_shape(deltas)
    if rank < 1 or n_iter < 1:
        raise ValueError(f"cp: rank and n_iter must be >= 1, got rank={rank}, n_iter={n_iter}")
    shape = (len(deltas), *deltas[0].shape)
    if backend not in ("factored", "tensorly"):
        raise ValueError(f"cp: backend must be 'factored' or 'tensorly', got {backend!r}")
    if init not in ("svd", "random"):
        raise ValueError(f"cp: init must be 'svd' or 'random', got {init!r}")
    stack = _Stack.of(deltas, dtype or torch.float64)
    if float(stack.gram().trace()) == 0.0:  # all-zero deltas: nothing to fit, the exact zero update (both backends)
        zeros = [stack.B.new_zeros(n, rank) for n in shape]
        return CPResult(stack.B.new_zeros(rank), *zeros, errors=[0.0])
    if backend == "factored":
        total_rank = stack.B.shape[1]
        if init == "svd" and rank <= min(total_rank, *shape[1:]):
            # The usual case (R <= Σr): ALS on the compressed core. Otherwise the init has columns outside
            # span(B) / span(Aᵀ) (random ones, or null-space fill when R > Σr) and ALS runs full size.
            core, Q_out, Q_in = stack.compressed()
        else:
            core, Q_out, Q_in = stack, None, None
        bases = None if Q_out is None else (Q_out, Q_in)
        factors, errors = _als_factored(core, _init_factors(core, shape, rank, init, seed, bases), n_iter, tol)
        if bases is not None:
            factors = [factors[0], Q_out @ factors[1], Q_in @ factors[2]]
        weights = stack.B.new_ones(rank)
    else:
        weights, factors, errors = _als_tensorly(deltas, rank, n_iter, tol, init, seed, dtype or torch.float64)
    return CPResult(*normalize_cp(weights, *factors), errors=errors)


def recombine(res: CPResult, combine: str, weights: Tensor, scale: float = 1.0) -> LowRank:
    """The merged delta from a normalised CP decomposition, as a rank-R LoRA ``(U diag(g), Vᵀ)``.

    With ``X ≈ Σ_k λ_k c_k ∘ u_k ∘ v_k`` (unit ``c_k, u_k, v_k``, :func:`normalize_cp`):

    - ``"sum"``: ``Σ_t w_t X̂_t = Σ_k λ_k (Σ_t w_t c_tk) u_k v_kᵀ``, every adapter's reconstruction
      through the shared directions; components used with opposite signs cancel, shared ones add up;
    - ``"mean"``: the same divided by T (TC-LoRA's merge of equally important clusters at w_t = 1);
    - ``"shared"``: ``Σ_k λ_k u_k v_kᵀ``, TC-LoRA's reference recombination (keep the shared output and
      input factors, drop the task loadings). The reference multiplies the raw, unnormalised ALS
      factors, so its size follows the random initialisation (measured ~1e3 to ~1e5 whatever the
      adapters). Here each component gets its CP weight ``λ_k = ‖c_k‖‖u_k‖‖v_k‖`` of the normalised
      decomposition, i.e. the norm of the task-mode loadings once the shared factors have unit norm.
      The reconstruction ALS converges to does not depend on how its initialisation is scaled (each
      update is a least-squares solve that absorbs any per-column scale), and after normalisation
      neither do ``λ_k, u_k, v_k``, so the result is invariant to the init's scale; and ``X → cX``
      scales every ``λ_k`` by ``|c|`` (a negative ``c`` flips ``v_k`` through the sign convention), so
      ``shared(cX) = c·shared(X)``. For identical adapters ``X_t = D`` it gives ``√T·D`` (the mean gives
      ``D``, the sum ``T·D``), which λ then tunes. The weights enter the decomposition instead
      (:func:`cp` decomposes ``w_t X_t`` for this rule), as there are no loadings left to weight.

    Raises:
        ValueError: unknown ``combine``.
    """
    if combine == "shared":
        coeffs = res.weights  # (R,)
    elif combine in ("mean", "sum"):
        coeffs = res.weights * (weights.to(res.C) @ res.C)  # (R,) λ_k Σ_t w_t c_tk
        if combine == "mean":
            coeffs = coeffs / res.C.shape[0]
    else:
        raise ValueError(f"cp: combine must be one of {COMBINE_RULES}, got {combine!r}")
    return LowRank(res.U * (coeffs * scale), res.V.T.contiguous())


@register("cp", reference_url="https://arxiv.org/abs/2508.03999", help=HELP, rank_param=True)
def cp(
    deltas: Sequence[LowRank],
    weights: Tensor,
    rank: int = 4,
    combine: str = "mean",
    n_iter: int = 100,
    tol: float = 1e-8,
    init: str = "svd",
    seed: int = 0,
    backend: str = "factored",
    scale: float = 1.0,
) -> LowRank:
    """TC-LoRA joint CP merge: decompose the stacked deltas, recombine them through the shared factors.

    The factors are normalised first (:func:`normalize_cp`) so the output is deterministic, then
    recombined by ``combine`` (:func:`recombine`; the default ``"mean"`` is ``Σ_t w_t X̂_t / T``) and
    multiplied by λ. Returns ``LowRank(B (d_out, R), A = Vᵀ (R, d_in))`` in the input dtype, a rank-R LoRA.

    Raises:
        ValueError: unknown ``combine`` (and see :func:`cp_decompose`).
    """
    if combine not in COMBINE_RULES:
        raise ValueError(f"cp: combine must be one of {COMBINE_RULES}, got {combine!r}")
    if combine == "shared":  # no task loadings to weight afterwards: weight the adapters themselves
        deltas = [LowRank(d.B * w.to(d.B.dtype), d.A) for d, w in zip(deltas, weights)]
    res = cp_decompose(deltas, rank=rank, n_iter=n_iter, tol=tol, init=init, seed=seed, backend=backend)
    return recombine(res, combine, weights, scale).to(deltas[0].B.dtype)
