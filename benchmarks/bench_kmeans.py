"""tclora's k-means vs scikit-learn KMeans and MiniBatchKMeans on N x 384 clustered data, k=64.

    python benchmarks/bench_kmeans.py                    # N=100k: a few minutes on 2 cores
    python benchmarks/bench_kmeans.py --rows 1000000     # the target: fit+assign <= 15 s, inertia within 0.5%
    python benchmarks/bench_kmeans.py --rows 20000 --skip sklearn_sample   # quick check
    python benchmarks/bench_kmeans.py --threads 1        # stable timings on a busy machine (cpu_seconds ~ wall)

Each method produces centroids; every method's *inertia* is then measured the same way, on all N rows
(tclora.cluster.assign), and divided by scikit-learn ``KMeans`` fitted on all rows (``n_init='auto'``,
i.e. one k-means++ run: its default, the ~93 s reference at 1M). Timings are fit + assignment of all
N rows. Methods:

- ``tclora``: ``fit_kmeans`` on a uniform random ``--sample-fraction`` sample (n_init restarts on a
  subsample, best refined on the sample), then ``assign`` of all rows: what ``pipelines.cluster`` runs.
- ``sklearn_full``: ``KMeans(k).fit(x)``; its labels come with the fit.
- ``sklearn_sample``: ``KMeans(k, n_init=--n-init)`` on the same sample, then ``predict`` on all rows.
- ``minibatch``: ``MiniBatchKMeans(k, batch_size=4096)`` on all rows, then ``predict``.

Data: 64 unit-norm centres with Dirichlet-distributed sizes and per-cluster spreads, rows
L2-normalised like sentence embeddings; clusters overlap enough that k-means has local minima.
Writes ``bench_kmeans_<rows>.json`` and ``.png`` to ``--out``. Wall times on a shared machine are
noisy: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from tclora.cluster import assign, fit_kmeans

METHODS = ("tclora", "sklearn_full", "sklearn_sample", "minibatch")


def clustered_data(n: int, d: int = 384, centres: int = 64, noise: float = 0.9, seed: int = 0) -> np.ndarray:
    """(n, d) float32 unit rows around ``centres`` unit centres, cluster sizes ~ Dirichlet(2)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, d)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    labels = rng.choice(centres, size=n, p=rng.dirichlet(np.full(centres, 2.0)))
    spread = rng.uniform(0.5, 1.5, centres).astype(np.float32) * noise / np.sqrt(d)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in slabs: the noise temporaries stay small
        lab = labels[s : s + 100_000]
        x[s : s + len(lab)] = means[lab] + rng.standard_normal((len(lab), d), dtype=np.float32) * spread[lab, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def run_method(name: str, x: np.ndarray, sample: np.ndarray, k: int, n_init: int, seed: int) -> dict:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    started, cpu = time.perf_counter(), time.process_time()
    if name == "tclora":
        model = fit_kmeans(sample, k, n_init=n_init, seed=seed)
        fitted = time.perf_counter()
        centroids, extra = model.centroids, {"n_iter": model.n_iter}
        assign(x, centroids)
    elif name == "sklearn_full":
        km = KMeans(k, random_state=seed).fit(x)
        fitted = time.perf_counter()
        centroids, extra = km.cluster_centers_, {"n_iter": int(km.n_iter_)}
    elif name == "sklearn_sample":
        km = KMeans(k, n_init=n_init, random_state=seed).fit(sample)
        fitted = time.perf_counter()
        centroids, extra = km.cluster_centers_, {"n_iter": int(km.n_iter_)}
        km.predict(x)
    else:
        km = MiniBatchKMeans(k, batch_size=4096, random_state=seed).fit(x)
        fitted = time.perf_counter()
        centroids, extra = km.cluster_centers_, {"n_iter": int(km.n_iter_)}
        km.predict(x)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    inertia = float(assign(x, np.asarray(centroids, np.float32))[1].sum(dtype=np.float64))
    return {"seconds": round(seconds, 2), "fit_seconds": round(fitted - started, 2), "cpu_seconds": round(cpu, 2),
            "inertia": inertia, **extra}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.bar(names, [result["methods"][m]["seconds"] for m in names], color="tab:blue")
    a.set_ylabel("fit + assign seconds")
    b.bar(names, [result["methods"][m].get("inertia_ratio", np.nan) for m in names], color="tab:orange")
    b.axhline(1.005, color="k", ls="--", lw=0.8)
    b.set_ylim(0.98, max(1.02, *[result["methods"][m].get("inertia_ratio", 1) for m in names]) + 0.005)
    b.set_ylabel("inertia / sklearn_full (all rows)")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(f"k-means: {result['rows']} x {result['dim']}, k={result['k']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sample-fraction", type=float, default=0.2)
    parser.add_argument("--n-init", type=int, default=10, help="restarts for tclora and sklearn_sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=METHODS)
    parser.add_argument("--threads", type=int, default=None,
                        help="cap torch/BLAS/OpenMP threads (1 gives stable timings on a shared machine)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()

    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    x = clustered_data(args.rows, args.dim, args.k, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    sample = x[np.sort(rng.choice(args.rows, int(args.rows * args.sample_fraction), replace=False))]
    result = {"rows": args.rows, "dim": args.dim, "k": args.k, "sample_fraction": args.sample_fraction,
              "n_init": args.n_init, "cpus": len(os.sched_getaffinity(0)), "threads": args.threads,
              "machine": platform.processor(), "load_before": os.getloadavg(), "methods": {}}
    for name in METHODS:
        if name in args.skip:
            continue
        result["methods"][name] = run_method(name, x, sample, args.k, args.n_init, args.seed)
        print(name, result["methods"][name], flush=True)
    ref = result["methods"].get("sklearn_full", {}).get("inertia")
    for m in result["methods"].values():
        m["inertia_ratio"] = round(m["inertia"] / ref, 5) if ref else None
    result["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_kmeans_{args.rows}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
