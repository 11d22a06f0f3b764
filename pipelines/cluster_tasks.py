"""The cluster stage's Ray Data task functions (``map_batches``): stateless, centroids passed in, never re-fitted.

A module of their own, importing NumPy and PyArrow only, because a Ray worker runs a task by importing the
module that defines its function: defined in :mod:`pipelines.cluster` (k-means fitting, reports) or
:mod:`pipelines.mbc` (the train stage), they made every task worker process import torch (2.7 s of a core
each; four such processes in a tiny run, and every worker of every node that labels rows at scale). Pinned
by ``tests/test_config.py``. The k-means tasks are run by :mod:`pipelines.cluster`, the MBC ones by
:mod:`pipelines.mbc`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from tclora.centroids import assign

N_EXAMPLES = 3


def embedding_matrix(batch: pa.Table) -> np.ndarray:
    """The ``embedding`` column (fixed_size_list<float32>[d]) as an (n, d) array, without copies."""
    col = batch.column("embedding").combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def _row_hashes(row_ids: list[str], seed: int) -> np.ndarray:
    """Seeded 64-bit hash of each row id: uniform, and independent of how rows are laid out in blocks."""
    key = str(seed).encode()
    return np.array([int.from_bytes(hashlib.blake2b(r.encode(), digest_size=8, key=key).digest(), "big")
                     for r in row_ids], dtype=np.uint64)


# ---- worker functions (map_batches; stateless tasks, centroids passed in, never re-fitted) ----------
def sample_batch(batch: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The rows whose hash falls below ``fraction``: their hash (to order the sample), embedding and task."""
    hashes = _row_hashes(batch.column("row_id").to_pylist(), seed)
    cut = int(fraction * 2**64)
    mask = np.ones(len(hashes), bool) if cut >= 2**64 else hashes < np.uint64(cut)
    keep = pa.array(mask)
    return pa.table({"hash": pa.array(hashes[mask]), "embedding": batch.column("embedding").filter(keep),
                     "task_name": batch.column("task_name").filter(keep)})


def count_batch(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    """One row per batch: JSON of (k-means label, task) counts and the first few sources per label."""
    labels, _ = assign(embedding_matrix(batch), centroids)
    # Grouped in Arrow, not row by row in Python (the pass reads every row: 10M at scale).
    pairs = pa.table({"label": labels, "task": batch.column("task_name")})
    counts = pairs.group_by(["label", "task"]).aggregate([([], "count_all")])
    examples = {}
    for label in np.unique(labels).tolist():
        first = pa.array(np.flatnonzero(labels == label)[:N_EXAMPLES])
        examples[label] = [text[:200] for text in batch.column("source").take(first).to_pylist()]
    payload = {"counts": [[int(r["label"]), r["task"], r["count_all"]] for r in counts.to_pylist()],
               "examples": examples}
    return pa.table({"summary": [json.dumps(payload)]})


def with_labels(batch: pa.Table, labels: np.ndarray, dists: np.ndarray, final: np.ndarray) -> pa.Table:
    """``batch`` without its embeddings, plus ``kmeans_cluster`` (labels), ``distance`` (squared, to the
    row's centroid) and ``cluster`` (final id): the rows a cluster stage writes. All arrays (n,)."""
    out = batch.drop_columns(["embedding"])
    out = out.append_column("kmeans_cluster", pa.array(labels, pa.int32()))
    out = out.append_column("distance", pa.array(dists, pa.float32()))
    return out.append_column("cluster", pa.array(final, pa.int32()))


def label_batch(batch: pa.Table, centroids: np.ndarray, final_ids: np.ndarray) -> pa.Table:
    """Rows with their k-means label, final cluster id (after the small-cluster rule) and distance."""
    labels, dists = assign(embedding_matrix(batch), centroids)
    return with_labels(batch, labels, dists, final_ids[labels])


# ---- MBC (cluster.by: adapters) -----------------------------------------------------------------
def task_summary_batch(batch: pa.Table) -> pa.Table:
    """One row per task in the batch (None: rows without a task_name): row count, embedding sum, first sources."""
    tasks = batch.column("task_name").to_pylist()
    vectors = embedding_matrix(batch)
    sources, row_ids = batch.column("source").to_pylist(), batch.column("row_id").to_pylist()
    out: dict[str | None, dict] = {}
    for i, task in enumerate(tasks):
        entry = out.setdefault(task, {"n": 0, "sum": np.zeros(vectors.shape[1]), "examples": [],
                                      "first": row_ids[i]})
        entry["n"] += 1
        entry["sum"] += vectors[i]
        if len(entry["examples"]) < N_EXAMPLES:
            entry["examples"].append(sources[i][:200])
    return pa.table({"task": list(out), "n": [e["n"] for e in out.values()],
                     "sum": [e["sum"].tolist() for e in out.values()],
                     "examples": [e["examples"] for e in out.values()],
                     "first_row": [e["first"] for e in out.values()]})


def task_label_batch(batch: pa.Table, cluster_of: dict[str, int], centroids: np.ndarray) -> pa.Table:
    """Rows with their cluster (their task's) and squared distance to its centroid, as ``label_batch``."""
    labels = np.array([cluster_of[t] for t in batch.column("task_name").to_pylist()], dtype=np.int32)
    dists = ((embedding_matrix(batch) - centroids[labels]) ** 2).sum(axis=1)
    return with_labels(batch, labels, dists, labels)
