"""Choosing k from the embeddings alone, and showing clusters (Ray-free; scikit-learn + matplotlib).

- :func:`choose_k`: ``cluster.k: auto``. For each k in a range, :func:`tclora.cluster.fit_kmeans` on the
  *distinct* rows of the fit sample, scored by the mean silhouette coefficient (Rousseeuw 1987,
  "Silhouettes: a graphical aid to the interpretation and validation of cluster analysis";
  ``sklearn.metrics.silhouette_score``, Euclidean, which on unit vectors orders pairs like cosine). The k
  with the highest silhouette wins; ties go to the smaller k (fewer adapters).
- :func:`report_markdown`: ``cluster_report.md`` from the stage's ``report.json`` dict.
- :func:`plot_projection`: a 2-D PCA (``sklearn.decomposition.PCA``) of a sample, coloured by cluster,
  task names at their rows' mean position when labels exist.
- :func:`plot_criterion`: silhouette against k, the chosen k marked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from tclora.cluster import assign, fit_kmeans
from tclora.plots import pyplot, save_figure

log = logging.getLogger(__name__)

SILHOUETTE_MAX_ROWS = 5000  # silhouette is O(n^2): scored on at most this many rows of the fit sample


def choose_k(x: np.ndarray, k_min: int, k_max: int, *, n_init: int = 10, max_iter: int = 100, seed: int = 0,
             max_rows: int = SILHOUETTE_MAX_ROWS) -> tuple[int, dict[int, float]]:
    """The k in ``[k_min, k_max]`` whose k-means clustering of the distinct rows of ``x`` has the highest
    mean silhouette.

    Duplicates count once. A template view repeats each template hundreds of times: with every copy
    counted, splitting into the distinct templates has zero within-cluster distance, so the silhouette
    climbs to 1 at k = number of templates (the demo's 3 templates x 4 families: 0.26 at k=2 rising to
    1.00 at k=12) whatever the templates' grouping. On distinct rows a template alone in its cluster
    scores 0, as Rousseeuw defines singletons, and the criterion measures how the formats group (the
    demo: maximum 0.21 at k=4, its families). Corpora without repeats are unaffected.

    Args:
        x: (n, d) fit sample (unit embeddings).
        k_min, k_max: the range tried; k_min >= 2 (silhouette is undefined for one cluster). ``k_max`` is
            lowered to the number of distinct rows minus one when it is larger.
        max_rows: silhouette is computed on a seeded subsample of this many rows (it is O(n^2) memory).

    Returns:
        ``(chosen k, {k: silhouette})``.

    Raises:
        ValueError: naming ``cluster.k_range``, when ``k_min < 2``, ``k_min > k_max``, or ``x`` has at
            most ``k_min`` distinct rows.
    """
    from sklearn.metrics import silhouette_score

    distinct = np.unique(x, axis=0)
    n = len(distinct)
    if k_min < 2 or k_min > k_max or k_min >= n:
        raise ValueError(f"cluster.k_range [{k_min}, {k_max}] must satisfy 2 <= min <= max and min < distinct "
                         f"rows of the fit sample ({n} of {len(x)})")
    k_max = min(k_max, n - 1)
    x = distinct
    scores: dict[int, float] = {}
    for k in range(k_min, k_max + 1):
        model = fit_kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed)
        labels, _ = assign(x, model.centroids)
        if len(np.unique(labels)) < 2:
            scores[k] = -1.0
            continue
        scores[k] = float(silhouette_score(x, labels, sample_size=min(n, max_rows), random_state=seed))
    best = max(scores, key=lambda k: (round(scores[k], 6), -k))
    log.info("cluster.k auto: silhouette %s -> k=%d", {k: round(v, 4) for k, v in scores.items()}, best)
    return best, scores


def plot_criterion(scores: Mapping[int, float], chosen: int, path: str | Path, name: str = "silhouette") -> Path:
    """PNG of the criterion against k, the chosen k marked."""
    plt = pyplot()
    ks = sorted(scores)
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    ax.plot(ks, [scores[k] for k in ks], "o-")
    ax.axvline(chosen, color="tab:red", ls="--", label=f"chosen k={chosen}")
    ax.set_xlabel("k")
    ax.set_ylabel(f"mean {name}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_projection(x: np.ndarray, labels: Sequence[int], path: str | Path,
                    task_names: Sequence[str | None] | None = None, seed: int = 0) -> Path:
    """PNG of a 2-D PCA projection of ``x`` (n, d), points coloured by cluster ``labels`` (n,).

    With ``task_names``, each task's name is written at the mean position of its rows.
    """
    from sklearn.decomposition import PCA

    plt = pyplot()
    labels = np.asarray(labels)
    xy = (PCA(2, random_state=seed).fit_transform(np.asarray(x, dtype=np.float64)) if len(x) > 2
          else np.zeros((len(x), 2)))
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(np.unique(labels)):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color="0.6" if c == -1 else cmap(i % 20),
                   label="skipped" if c == -1 else f"cluster {c}")
    if task_names is not None:
        names = np.array([t if t is not None else "" for t in task_names], dtype=object)
        for t in sorted(set(names) - {""}):
            cx, cy = xy[names == t].mean(0)
            ax.annotate(t, (cx, cy), fontsize=7, ha="center", bbox={"boxstyle": "round", "fc": "white", "alpha": 0.7})
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"PCA of {len(x)} sampled rows, coloured by cluster", fontsize=9)
    ax.legend(fontsize=6, markerscale=2, loc="best")
    return save_figure(fig, path)


def report_markdown(report: Mapping, images: Sequence[str] = ()) -> str:
    """``cluster_report.md``: scores, then per cluster its size, top tasks and examples (from report.json)."""
    lines = ["# Cluster report", ""]
    lines.append(f"{report['n_rows']} rows in {report['n_clusters']} clusters"
                 + (f" (k chosen automatically: {report['k']})" if report.get("k_auto") else "") + ".")
    if report.get("nmi") is not None:
        lines.append(f"Against task_name ({report['n_labelled_rows']} labelled rows): "
                     f"NMI {report['nmi']:.3f}, ARI {report['ari']:.3f}.")
    if report.get("skipped_rows"):
        lines.append(f"{report['skipped_rows']} rows are in skipped small clusters (cluster -1).")
    lines += [""] + [f"![{Path(i).stem}]({i})" for i in images] + [""]
    lines += ["| cluster | rows | top tasks |", "|---:|---:|---|"]
    for cid in sorted(report["sizes"], key=int):
        tops = ", ".join(f"{t} ({n})" for t, n in report.get("top_tasks", {}).get(cid, {}).items()) or "-"
        lines.append(f"| {cid} | {report['sizes'][cid]} | {tops} |")
    for cid in sorted(report["sizes"], key=int):
        examples = report.get("examples", {}).get(cid) or []
        if examples:
            lines += ["", f"## Cluster {cid}", ""] + [f"- `{e[:160].replace('`', chr(39))}`" for e in examples]
    return "\n".join(lines) + "\n"
