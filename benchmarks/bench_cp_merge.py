"""Factored CP-ALS vs tensorly's dense ``parafac`` for the TC-LoRA merge, at Phi-3-mini shapes.

    python benchmarks/bench_cp_merge.py                 # a few minutes on 2 idle cores
    python benchmarks/bench_cp_merge.py --smoke         # seconds: tiny shapes, checks the script runs
    python benchmarks/bench_cp_merge.py --dense-modules 2 --dense-iters 30 --threads 1

Per module the T adapters' deltas form a ``T x d_out x d_in`` tensor. The factored path runs every ALS
product from the ``B_t``/``A_t`` factors; the dense path materialises the tensor (float32) and runs
``tensorly.decomposition.parafac`` on it. What is measured, and what is extrapolated (all in the JSON):

- factored: the full run (init + ``--iters`` iterations) on each of one layer's seven modules;
- dense: only the first ``--dense-modules`` modules, started from the *same* initial factors (so the
  fits are comparable; tensorly's own SVD init of the 3072 x 30720 unfoldings alone takes minutes, and
  is left out, which flatters dense), run for ``--dense-iters`` iterations; every ALS iteration does
  the same work, so its time for ``--iters`` is tensor build + per-iteration time x ``--iters``;
- whole model: factored summed over the layer's modules x ``--layers``; dense per tensor element
  from the measured modules, scaled linearly by ``T·d_out·d_in`` to every module x ``--layers``.

Fits are ``1 - ‖X - X̂‖/‖X‖`` evaluated in float64 (torch's float32 ``norm`` of a 10⁸-entry tensor is
~1% off, so tensorly's own float32 error report is not used). Adapters are synthetic: a shared rank-R
CP structure plus per-adapter rank-(r - R) parts, so the fit is neither trivial nor zero.
Writes ``bench_cp_merge[_smoke].json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from tclora.merge import LowRank
from tclora.merge.cp import cp_decompose, initial_factors, normalize_cp

# Phi-3-mini-4k: hidden 3072, MLP 8192, 32 layers; (d_out, d_in) of each adapted linear module.
PHI3_MODULES = {"q_proj": (3072, 3072), "k_proj": (3072, 3072), "v_proj": (3072, 3072), "o_proj": (3072, 3072),
                "gate_proj": (8192, 3072), "up_proj": (8192, 3072), "down_proj": (3072, 8192)}
SMOKE_MODULES = {"q_proj": (256, 256), "o_proj": (256, 256), "up_proj": (512, 256), "down_proj": (256, 512)}


def synthetic_adapters(T: int, d_out: int, d_in: int, r: int, R: int, seed: int) -> list[LowRank]:
    """T rank-r deltas sharing R directions (with per-adapter strengths) plus private rank-(r-R) parts."""
    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(d_out, R, generator=g), torch.randn(d_in, R, generator=g)  # shared directions
    deltas = []
    for _ in range(T):
        strength = torch.randn(R, generator=g)
        private = max(r - R, 0)
        B = torch.cat([U * strength, 0.5 * torch.randn(d_out, private, generator=g)], dim=1)  # (d_out, r)
        A = torch.cat([V.T, 0.5 * torch.randn(private, d_in, generator=g)], dim=0)  # (r, d_in)
        deltas.append(LowRank(B / d_out**0.5, A / d_in**0.5))
    return deltas


def true_fit(deltas: list[LowRank], lam, C, U, V) -> float:
    """``1 - ‖X - X̂‖/‖X‖`` in float64, one task slice at a time (no float64 copy of the whole tensor)."""
    lam, C, U, V = (x.double() for x in (lam, C, U, V))
    err2 = norm2 = 0.0
    for t, d in enumerate(deltas):
        X_t = d.B.double() @ d.A.double()  # (d_out, d_in)
        err2 += float((X_t - (U * (lam * C[t])) @ V.T).pow(2).sum())
        norm2 += float(X_t.pow(2).sum())
    return 1.0 - (err2 / norm2) ** 0.5


def clocks() -> dict[str, float]:
    """Wall and process-CPU time: CPU time is the robust number on a shared machine (with --threads 1)."""
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def since(start: dict[str, float]) -> dict[str, float]:
    now = clocks()
    return {k: now[k] - start[k] for k in start}


def dense_parafac(deltas: list[LowRank], rank: int, n_iter: int, seed: int) -> tuple[dict, dict, tuple]:
    """tensorly parafac on the float32 dense stack from the factored init.

    Returns:
        (time to build the tensor, time of ``n_iter`` ALS iterations, normalisable factors).
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    init = initial_factors(deltas, rank, seed=seed, dtype=torch.float32)  # not timed: shared start point
    start = clocks()
    X = torch.stack([d.dense() for d in deltas])  # (T, d_out, d_in): part of the dense path's cost
    build = since(start)
    start = clocks()
    with tl.backend_context("pytorch"):
        weights, factors = parafac(X, rank, n_iter_max=n_iter, init=(torch.ones(rank), init), tol=0.0)
    return build, since(start), (weights, *factors)


def run(args: argparse.Namespace) -> dict:
    modules = SMOKE_MODULES if args.smoke else PHI3_MODULES
    kw = dict(rank=args.cp_rank, tol=0.0, seed=args.seed)  # tol 0: every iteration runs
    # Warm up both paths (lazy LAPACK init, the tensorly import) so no module's time includes them.
    tiny = synthetic_adapters(3, 16, 16, 2, 2, seed=args.seed)
    cp_decompose(tiny, n_iter=2, **dict(kw, rank=2))
    dense_parafac(tiny, 2, 2, args.seed)
    rows = []
    for i, (name, (d_out, d_in)) in enumerate(modules.items()):
        deltas = synthetic_adapters(args.tasks, d_out, d_in, args.rank, args.cp_rank, seed=args.seed + i)
        start = clocks()
        fac = cp_decompose(deltas, n_iter=args.iters, **kw)
        row = {"module": name, "d_out": d_out, "d_in": d_in, "factored_s": since(start),
               "factored_fit": fac.fit,  # the factored float64 error is exact (the tests check it)
               "dense_s": None, "speedup": None}
        if i < args.dense_modules:
            # Every ALS iteration does the same work: time k of them and scale to --iters.
            k = args.dense_iters
            build, als, cp_k = dense_parafac(deltas, args.cp_rank, k, args.seed)
            check = cp_decompose(deltas, n_iter=k, **kw)  # factored after the same k iterations
            dense_fit = true_fit(deltas, *normalize_cp(*cp_k))
            row["dense_s"] = {c: build[c] + als[c] / k * args.iters for c in build}
            row["speedup"] = {c: row["dense_s"][c] / row["factored_s"][c] for c in build}
            row.update(dense_build_s=build, dense_per_iter_s={c: als[c] / k for c in als}, dense_measured_iters=k,
                       fit_check={"iters": k, "factored": check.fit, "dense": dense_fit,
                                  "abs_diff": abs(check.fit - dense_fit)})
        rows.append(row)
        fs = row["factored_s"]
        print(f"{name:10s} {d_out}x{d_in}: factored {fs['wall']:.3g}s (cpu {fs['cpu']:.3g}s) fit {fac.fit:.4f}"
              + (f" | dense {row['dense_s']['wall']:.3g}s (cpu {row['dense_s']['cpu']:.3g}s) for {args.iters} it;"
                 f" fit after {k} it: factored {check.fit:.5f} dense {dense_fit:.5f}" if row["dense_s"] else ""),
              flush=True)

    measured = [r for r in rows if r["dense_s"] is not None]
    elements = lambda r: args.tasks * r["d_out"] * r["d_in"]  # noqa: E731
    projection = {}
    for c in ("wall", "cpu"):
        dense_per_element = sum(r["dense_s"][c] for r in measured) / sum(elements(r) for r in measured)
        factored = args.layers * sum(r["factored_s"][c] for r in rows)
        dense = args.layers * sum(dense_per_element * elements(r) for r in rows)
        projection[c] = {"factored_s": factored, "dense_s": dense, "speedup": dense / factored}
    return {
        "benchmark": "cp_merge_factored_vs_dense",
        "smoke": args.smoke,
        "config": {"tasks_T": args.tasks, "lora_rank_r": args.rank, "cp_rank_R": args.cp_rank, "als_iters": args.iters,
                   "tol": 0.0, "init": "svd (computed from the factors; shared by both paths)",
                   "layers": args.layers, "modules_per_layer": len(rows), "dense_modules_measured": len(measured),
                   "dense_iters_measured": args.dense_iters, "threads": torch.get_num_threads(), "seed": args.seed,
                   "factored_dtype": "float64", "dense_dtype": "float32", "fit_evaluated_in": "float64",
                   "adapters": "synthetic: shared rank-R CP structure + private rank-(r-R) parts",
                   "clocks": "wall = perf_counter; cpu = process_time (robust to other jobs when threads=1)"},
        "modules": rows,
        "projection": {
            **projection,
            "factored_method": f"measured on all {len(rows)} modules of one layer (init + {args.iters} iterations), "
                               f"x {args.layers} layers",
            "dense_method": (f"extrapolated: tensor build + per-iteration time (measured over {args.dense_iters} "
                             f"iterations) x {args.iters}, excluding tensorly's own SVD init; seconds per tensor "
                             f"element from {len(measured)} measured module(s), scaled linearly by T*d_out*d_in "
                             f"to {len(rows)} modules x {args.layers} layers"),
        },
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
    }


def plot(result: dict, path: Path, clock: str = "cpu") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["modules"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["module"] for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["factored_s"][clock] for r in rows], width=0.4, label="factored")
    ax1.bar([i + 0.2 for i in x], [(r["dense_s"] or {}).get(clock, 0) for r in rows], width=0.4,
            label=f"dense tensorly ({result['config']['als_iters']} it, from measured iterations)")
    ax1.set_xticks(list(x), names, rotation=30)
    ax1.set_yscale("log")
    ax1.set_ylabel(f"{clock} seconds per module")
    ax1.set_title("CP-ALS time per module")
    ax1.legend()
    proj = result["projection"][clock]
    ax2.bar(["factored", "dense (extrapolated)"], [proj["factored_s"], proj["dense_s"]], color=["C0", "C1"])
    ax2.set_yscale("log")
    ax2.set_ylabel(f"{clock} seconds")
    ax2.set_title(f"Whole model ({result['config']['layers']} layers), {proj['speedup']:.0f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for JSON + PNG")
    p.add_argument("--tasks", type=int, default=10, help="T: adapters (clusters) merged")
    p.add_argument("--rank", type=int, default=16, help="r: LoRA rank of each adapter")
    p.add_argument("--cp-rank", type=int, default=4, help="R: CP rank")
    p.add_argument("--iters", type=int, default=30, help="ALS iterations (run in full: tol 0)")
    p.add_argument("--layers", type=int, default=32, help="layers the per-layer time is projected to")
    p.add_argument("--dense-modules", type=int, default=1, help="modules also run through dense tensorly parafac")
    p.add_argument("--dense-iters", type=int, default=3,
                   help="dense ALS iterations actually run; the time for --iters is scaled from them")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); on a busy machine use 1: OpenMP threads "
                        "competing for cores make the factored path's small products many times slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (T=4, r=6, 10 iterations, 5 dense iterations, 2 layers)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tasks, args.rank, args.iters, args.layers, args.dense_iters = 4, 6, 10, 2, 5
    if args.dense_modules < 1 or args.dense_iters < 1:
        p.error("--dense-modules and --dense-iters must be >= 1 (the projection needs a measured dense module)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_cp_merge_smoke" if args.smoke else "bench_cp_merge"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"{stem}.png")
    for c in ("wall", "cpu"):
        proj = result["projection"][c]
        print(f"whole model ({c}): factored {proj['factored_s']:.3g} s, dense {proj['dense_s']:.3g} s (extrapolated), "
              f"speedup {proj['speedup']:.0f}x")
    print(f"-> {args.out / stem}.json")
    return result


if __name__ == "__main__":
    main()
