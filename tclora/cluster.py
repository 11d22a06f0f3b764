"""k-means at scale (Ray-free): k-means++ restarts, chunked Lloyd, small clusters, reports (assignment:
:mod:`tclora.centroids`, torch-free, re-exported here).

Distances are squared Euclidean, computed as ``|x|^2 - 2 x.c + |c|^2`` with one BLAS matmul per chunk of
rows, so memory stays at ``chunk_rows x k`` however many rows there are. Embeddings are unit vectors, so
Euclidean k-means is cosine k-means up to a monotone transform.

Restarts are cheap by design: the ``n_init`` greedy k-means++ seedings and their Lloyd runs happen on a
subsample of ``init_size`` rows; the best of them (lowest inertia) is refined with Lloyd on all of ``x``.
Measured (``benchmarks/bench_kmeans.py``) at 1M x 384, k=64, fit on a 20% sample then assign all rows:
14.0 s of single-thread CPU (fit 12.1, assign 1.9 with the torch assignment of then) for an inertia 1.0%
*below* scikit-learn ``KMeans`` on all rows (347 s single-thread CPU; its one k-means++ run lands in a worse
local minimum), while ``MiniBatchKMeans`` took 18.2 s for 0.7% below, and 0.8% *above* at 100k rows.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from tclora.centroids import assign, check_finite, nearest_chunks
from tclora.config import ConfigError
from tclora.plots import pyplot, save_figure

log = logging.getLogger(__name__)

MIN_ROWS_PER_CLUSTER_IN_SAMPLE = 50  # a fit sample never has fewer than this many rows per cluster (if it can)


def check_k(k: int | str, n_rows: int) -> None:
    """Fail, naming ``cluster.k``, when there are fewer valid rows than clusters (``"auto"`` passes: the
    range is clipped to the fit sample's distinct rows by :func:`tclora.cluster_quality.choose_k`).

    Raises:
        ConfigError: ``k > n_rows``.
    """
    if k == "auto":
        return
    if k > n_rows:
        raise ConfigError(
            f"cluster.k={k} is more than the {n_rows} valid rows of the corpus (after quarantine), and k-means "
            f"needs at least one row per cluster: lower it (--set cluster.k={max(1, n_rows)} or less) or add data"
        )


def fit_fraction(n_rows: int, k: int, sample_fraction: float, min_fit_rows: int,
                 max_fit_rows: int | None = None) -> float:
    """Fraction of a corpus's rows k-means is fitted on: ``sample_fraction``, but never fewer than
    ``min_fit_rows`` rows (so a corpus of up to ``min_fit_rows`` rows is fitted on every row) nor fewer
    than :data:`MIN_ROWS_PER_CLUSTER_IN_SAMPLE` x ``k``, and never more than ``max_fit_rows`` rows (the
    sample is gathered and fitted on the driver: 10M x 384 at 20% held 9.7 GiB there, issue 16). In (0, 1].

    Why a floor: on a small corpus a 20% sample (TC-LoRA's rule, meant for large corpora) can have a
    different lowest-inertia clustering than the corpus itself. Measured on the demo (issue 17; 1,200
    rows, 12 templates, 4 families): the 249-row hash sample's best of 10 restarts put one sort_words
    template with reverse_words (NMI 0.874), while k-means on all 1,200 rows recovers the families
    (NMI 1.000, the family partition being the lowest inertia found by 2,000 scikit-learn restarts).

    Raises:
        ValueError: ``n_rows`` < 1 or ``sample_fraction`` not in (0, 1].
    """
    if n_rows < 1 or not 0 < sample_fraction <= 1:
        raise ValueError(f"fit_fraction: need n_rows >= 1 and 0 < sample_fraction <= 1, "
                         f"got {n_rows}, {sample_fraction}")
    floor = max(min_fit_rows, MIN_ROWS_PER_CLUSTER_IN_SAMPLE * k)
    fraction = max(sample_fraction, floor / n_rows)
    if max_fit_rows is not None:
        fraction = min(fraction, max(max_fit_rows, floor) / n_rows)
    return min(1.0, fraction)


@dataclass
class KMeansModel:
    """A fitted k-means: ``centroids`` (k, d) float32 and the ``inertia`` (sum of squared distances)
    of the rows it was fitted on."""

    centroids: np.ndarray
    inertia: float | None  # None when the clusters did not come from k-means (cluster.by: adapters)
    n_iter: int = 0
    n_rows: int = 0
    restart_inertias: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return assign(x, self.centroids)


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).contiguous()
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).square_()  # (n,); 6x faster than (x * x).sum(1)


def _nearest(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor):
    """:func:`tclora.centroids.nearest_chunks` on tensors (shared memory, no copies): ``(start, labels, sq_dists)``
    per chunk of rows of ``x`` (n, d) against ``c`` (k, d), as tensors for the Lloyd loop's ``index_add_``."""
    for start, labels, d2 in nearest_chunks(x.numpy(), c.numpy(), x_sq.numpy()):
        yield start, torch.from_numpy(labels), torch.from_numpy(d2)


def _kmeans_plusplus(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn: 2 + ln k candidates per step, keep the best)."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, x.shape[1])
    centers[0] = x[int(torch.randint(n, (1,), generator=gen))]
    closest = torch.addmv(x_sq + float(centers[0] @ centers[0]), x, centers[0], alpha=-2.0).clamp_(min=0)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: duplicates are the only choice left
            cand = torch.randint(n, (trials,), generator=gen)
        else:
            cand = torch.multinomial(closest / total, trials, replacement=True, generator=gen)
        cx = x[cand]  # (trials, d)
        d2 = torch.addmm(_sq_norms(cx), x, cx.T, alpha=-2.0).add_(x_sq[:, None]).clamp_(min=0)  # (n, trials)
        d2 = torch.minimum(d2, closest[:, None], out=d2)
        best = int(d2.sum(0).argmin())
        centers[i], closest = cx[best], d2[:, best].contiguous()
    return centers


def _lloyd(
    x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float, rtol: float,
) -> tuple[torch.Tensor, float, int]:
    """Lloyd iterations from ``centers``; returns (centers, inertia of those centers, iterations).

    Stops when the summed squared centre shift is <= ``tol`` (scikit-learn's rule) or the inertia fell by
    less than ``rtol`` (relative) in the last iteration: what is left to gain is then below measurement.
    """
    k, d = centers.shape
    prev = math.inf
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        sums = torch.zeros(k, d)
        counts = torch.zeros(k, dtype=torch.int64)
        inertia = 0.0  # of the current centers, found on the way
        for start, labels, d2 in _nearest(x, centers, x_sq):
            sums.index_add_(0, labels, x[start : start + len(labels)])
            counts += torch.bincount(labels, minlength=k)
            inertia += float(d2.sum(dtype=torch.float64))
        if prev - inertia <= rtol * inertia:
            return centers, inertia, n_iter
        prev = inertia
        new = sums / counts.clamp(min=1)[:, None]
        empty = counts == 0
        if empty.any():  # re-seed empty clusters at the rows farthest from their centre
            far = torch.cat([d2 for _, _, d2 in _nearest(x, centers, x_sq)])
            new[empty] = x[far.topk(int(empty.sum())).indices]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    inertia = sum(float(d2.sum(dtype=torch.float64)) for _, _, d2 in _nearest(x, centers, x_sq))
    return centers, inertia, n_iter


def fit_kmeans(
    x: np.ndarray, k: int, *, n_init: int = 10, max_iter: int = 100, seed: int = 0, tol: float = 1e-4,
    rtol: float = 1e-5, init_size: int | None = None,
) -> KMeansModel:
    """k-means with ``n_init`` k-means++ restarts; the lowest inertia wins.

    Args:
        x: (n, d) rows to fit on (float32 is used throughout).
        k: number of clusters; must be <= n.
        n_init: k-means++ restarts, each run to convergence on an ``init_size`` subsample.
        max_iter: Lloyd iterations per run.
        seed: seeds the subsample and every restart.
        tol: converged when the summed squared centre shift is <= tol x mean per-feature variance
            (scikit-learn's rule) ...
        rtol: ... or when one iteration lowered the inertia by less than this fraction.
        init_size: rows the restarts run on; None uses max(20000, 100 k). The winner is then refined on
            all of ``x``. With n <= init_size the restarts see every row and nothing is left to refine.

    Raises:
        ValueError: ``x`` is not 2-D, has fewer rows than ``k``, or a row that is not finite (named by index).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of rows ({n})")
    xt = _as_tensor(x)
    check_finite(xt.numpy(), "fit_kmeans: x")
    gen = torch.Generator().manual_seed(seed)
    abs_tol = tol * float(xt.var(0).mean()) if n > 1 else 0.0
    m = min(n, init_size or max(20000, 100 * k))
    sub = xt if m == n else xt[torch.randperm(n, generator=gen)[:m]]
    sub_sq = _sq_norms(sub)

    best, restart_inertias = None, []
    for _ in range(n_init):
        start = _kmeans_plusplus(sub, sub_sq, k, gen)
        centers, inertia, n_iter = _lloyd(sub, sub_sq, start, max_iter, abs_tol, rtol)
        restart_inertias.append(inertia)
        if best is None or inertia < best[1]:
            best = (centers, inertia, n_iter)
    centers, inertia, n_iter = best
    if m < n:
        centers, inertia, refine_iter = _lloyd(xt, _sq_norms(xt), centers, max_iter, abs_tol, rtol)
        n_iter += refine_iter
    log.info("k-means k=%d on %d rows: inertia %.6g (%d restarts on %d rows)", k, n, inertia, n_init, m)
    return KMeansModel(centers.numpy(), inertia, n_iter, n, restart_inertias)


def handle_small_clusters(
    sizes: Mapping[int, int] | Sequence[int], centroids: np.ndarray, min_size: int,
    policy: Literal["merge", "skip"] = "merge",
) -> dict[int, int]:
    """Map every cluster id to its final id: itself, its nearest large cluster, or -1 (skipped).

    Rule: a cluster with fewer than ``min_size`` rows is *small*.
      - ``"merge"``: its rows move to the nearest cluster (by centroid distance) that is not small.
        Ids are not renumbered, so ``centroids[i]`` still describes cluster ``i``. If every cluster is
        small, the largest one is kept and the others merge into it.
      - ``"skip"``: it maps to -1. Its rows are kept with ``cluster = -1``, counted in the report and
        trained on by no adapter: never silently lost.
    Each small cluster is logged as a warning.
    """
    if policy not in ("merge", "skip"):
        raise ValueError(f"policy must be 'merge' or 'skip', got {policy!r}")
    sizes = dict(sizes) if isinstance(sizes, Mapping) else dict(enumerate(sizes))
    ids = range(len(centroids))
    small = [i for i in ids if sizes.get(i, 0) < min_size]
    keep = [i for i in ids if i not in small] or [max(ids, key=lambda i: sizes.get(i, 0))]
    mapping = {i: i for i in ids}
    for i in small:
        if i in keep:
            log.warning("every cluster has < %d rows: keeping the largest, cluster %d", min_size, i)
            continue
        if policy == "skip":
            mapping[i] = -1
        else:
            dist = ((centroids[keep] - centroids[i]) ** 2).sum(1)
            mapping[i] = keep[int(np.argmin(dist))]
        log.warning("cluster %d has %d rows (< %d): %s", i, sizes.get(i, 0), min_size,
                    "skipped, rows kept with cluster=-1" if mapping[i] == -1 else f"merged into {mapping[i]}")
    return mapping


def contingency_counts(labels: Sequence[int], task_names: Sequence[str | None] | None) -> Counter:
    """Counts of ``(cluster, task_name)`` pairs (task None where unknown): all a report needs."""
    tasks = task_names if task_names is not None else [None] * len(labels)
    return Counter(zip((int(v) for v in labels), tasks))


def _nmi_ari(table: np.ndarray) -> tuple[float, float]:
    """NMI (arithmetic mean normalisation, as sklearn's default) and ARI of a (tasks x clusters) table."""
    from sklearn.metrics import mutual_info_score

    n = table.sum()
    rows, cols = table.sum(1), table.sum(0)
    if table.shape == (1, 1):  # neither labelling splits the data: a perfect match (sklearn's rule)
        return 1.0, 1.0

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0] / n
        return float(-(p * np.log(p)).sum())

    mi = mutual_info_score(None, None, contingency=table)
    nmi = 0.0 if mi <= 0 else float(mi / ((entropy(rows) + entropy(cols)) / 2))

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    index, expected = pairs(table.ravel()), pairs(rows) * pairs(cols) / (n * (n - 1) / 2)
    max_index = (pairs(rows) + pairs(cols)) / 2
    ari = 1.0 if max_index == expected else float((index - expected) / (max_index - expected))
    return nmi, ari


def report_from_counts(
    counts: Mapping[tuple[int, str | None], int], examples: Mapping[int, Sequence[str]] | None = None,
    n_examples: int = 3, top_tasks: int = 5,
) -> dict:
    """Cluster report from ``(cluster, task) -> rows`` counts (so millions of rows never meet in memory).

    Returns sizes per cluster (-1 = skipped rows), NMI and ARI of clusters vs task names over the rows
    that have one (None when no row has a task name), each cluster's top tasks and a few examples.
    """
    sizes: dict[int, int] = defaultdict(int)
    per_task: dict[int, Counter] = defaultdict(Counter)
    for (label, task), c in counts.items():
        sizes[label] += c
        if task is not None:
            per_task[label][task] += c
    labelled = {key: c for key, c in counts.items() if key[1] is not None}
    nmi = ari = None
    if labelled:
        clusters = sorted({label for label, _ in labelled})
        tasks = sorted({task for _, task in labelled})
        table = np.zeros((len(tasks), len(clusters)), dtype=np.int64)
        for (label, task), c in labelled.items():
            table[tasks.index(task), clusters.index(label)] += c
        nmi, ari = _nmi_ari(table)
    ids = sorted(sizes)
    return {
        "n_rows": int(sum(sizes.values())),
        "n_clusters": len([i for i in ids if i != -1]),
        "sizes": {str(i): int(sizes[i]) for i in ids},
        "skipped_rows": int(sizes.get(-1, 0)),
        "n_labelled_rows": int(sum(labelled.values())),
        "nmi": nmi,
        "ari": ari,
        "top_tasks": {str(i): dict(per_task[i].most_common(top_tasks)) for i in ids if per_task[i]},
        "examples": {str(i): list((examples or {}).get(i, []))[:n_examples] for i in ids},
    }


def cluster_report(
    labels: Sequence[int], task_names: Sequence[str | None] | None = None,
    examples: Sequence[str] | None = None, n_examples: int = 3,
) -> dict:
    """Report for in-memory ``labels`` (see :func:`report_from_counts`); ``examples`` aligns with labels."""
    picked: dict[int, list[str]] = defaultdict(list)
    for label, text in zip(labels, examples or []):
        if len(picked[int(label)]) < n_examples:
            picked[int(label)].append(text)
    return report_from_counts(contingency_counts(labels, task_names), picked, n_examples)


def plot_cluster_sizes(report: Mapping, path: str | Path) -> Path:
    """Bar chart of rows per cluster (skipped rows in grey) as a PNG."""
    plt = pyplot()
    ids = sorted(report["sizes"], key=int)
    values = [report["sizes"][i] for i in ids]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(ids) + 2), 3.2))
    ax.bar(range(len(ids)), values, color=["0.6" if i == "-1" else "tab:blue" for i in ids])
    ax.set_xticks(range(len(ids)), ["skip" if i == "-1" else i for i in ids], fontsize=8)
    ax.set_xlabel("cluster")
    ax.set_ylabel("rows")
    scores = f"NMI {report['nmi']:.3f}, ARI {report['ari']:.3f}" if report.get("nmi") is not None else ""
    ax.set_title(f"{report['n_rows']} rows in {report['n_clusters']} clusters  {scores}", fontsize=9)
    return save_figure(fig, path)


def routing_vectors(sources: Sequence[str], kmeans_info: Mapping, embed_model: str) -> np.ndarray:
    """Embeddings (n, dim) float32 of ``sources`` as the embed stage embedded the rows the centroids were
    fitted on: through its template view when it used one (``kmeans_info["view"]``), else whole."""
    from tclora.embed import Embedder
    from tclora.template_view import TemplateMiner

    view = kmeans_info.get("view")
    texts = TemplateMiner.from_json(view).views(sources) if view else list(sources)
    return Embedder(embed_model).encode(texts, 64)


def routing_accuracy(records: Sequence[Mapping], top_tasks: Mapping[str, Mapping[str, int]]) -> dict | None:
    """How often a record went to the right adapter: the cluster holding most of its task's training rows.

    ``top_tasks`` is the cluster report's ``{cluster id: {task: training rows}}``. Records whose task no
    training row had (out-of-domain tasks) have no right adapter and are not counted.

    Returns:
        ``{"accuracy": fraction, "n": records counted}``, or None when no record has such a task.
    """
    best: dict[str, tuple[int, int]] = {}  # task -> (rows, cluster)
    for cluster, tasks in top_tasks.items():
        for task, rows in tasks.items():
            best[task] = max(best.get(task, (-1, -1)), (rows, int(cluster)))
    counted = [r for r in records if r.get("task_name") in best]
    if not counted:
        return None
    hits = sum(int(r["cluster"]) == best[r["task_name"]][1] for r in counted)
    return {"accuracy": hits / len(counted), "n": len(counted)}


def route_records(records: list[dict], cluster_dir: Path, embed_model: str) -> list[dict]:
    """Held-out records with ``cluster``: the final id of their nearest centroid (embedded in this process).

    ``cluster_dir`` is a finished cluster stage (``centroids.npy``: (k, dim) float32; ``kmeans.json``:
    k-means label -> final cluster id after the small-cluster rule, and the embed stage's template view);
    ``embed_model`` the embed stage's model, so held-out sources land in the space the centroids were
    fitted in (:func:`routing_vectors`).

    Raises:
        ValueError: a record's embedding is not finite, naming its ``row_id`` (file:line).
    """
    from tclora.embed import nonfinite_rows

    cluster_dir = Path(cluster_dir)
    centroids = np.load(cluster_dir / "centroids.npy", allow_pickle=False)
    info = json.loads((cluster_dir / "kmeans.json").read_text())
    mapping = {int(i): j for i, j in info["mapping"].items()}
    sources = [r["source"] for r in records]
    vectors = routing_vectors(sources, info, embed_model)
    # Held-out rows are not dropped (that would change the test set): name the first one, as the embed
    # stage would have quarantined it.
    _, bad = nonfinite_rows([r.get("row_id", f"record:{i}") for i, r in enumerate(records)], sources, vectors)
    if bad:
        where = f"{bad[0]['file']}:{bad[0].get('line', bad[0].get('row'))}"
        raise ValueError(f"held-out record {where}: {bad[0]['reason']} ({len(bad)} such record(s))")
    labels, _ = assign(vectors, centroids)
    return [{**r, "cluster": mapping[int(label)]} for r, label in zip(records, labels)]
