"""``cluster.by: adapters``: model-based clustering (MBC, :mod:`tclora.mbc`) through the pipeline's own stages.

    tclora run --config configs/demo.yaml --set cluster.by=adapters [--until cluster]

In place of k-means on the embeddings (:mod:`pipelines.cluster`), the cluster stage
  [1] partitions the rows by ``task_name`` into ``<run_dir>/cluster/tasks-<key>/``, in the cluster
      stage's layout (one "cluster" per task, sorted by name; its centroid is the task's mean embedding),
      so the train stage reads it unchanged;
  [2] trains a short LoRA per task there with the train stage (``lori.mode: lora``,
      ``train.steps: cluster.mbc_steps``) into ``<run_dir>/cluster/tasks-<key>-adapters/``;
  [3] groups the tasks by the cosine similarity of those adapters' updates and writes the final stage,
      ``<run_dir>/cluster/mbc-k<k>-<key>/``, like a k-means one: rows by cluster, ``centroids.npy`` (each
      cluster's mean embedding, so routing held-out rows works as for text clusters), ``report.json``
      with NMI/ARI against ``task_name`` and, beside them, ``mbc.json`` (the similarity matrix and each
      task's cluster) and ``mbc_similarity.png``.
Every step is a stage with a manifest: a rerun reuses what finished, and a killed run keeps the short
adapters that had finished (the train stage's staged adapters). Whole tasks move together, so the
small-cluster rule does not apply.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipelines.cluster import stage_path, write_by_cluster, write_router
from pipelines.cluster_tasks import N_EXAMPLES, task_label_batch, task_summary_batch
from pipelines.io import read_parquet
from pipelines.train import run_train
from tclora import cluster as km
from tclora import mbc, storage
from tclora.adapters import load_factors
from tclora.artifacts import (
    StageResult,
    atomic_write_json,
    is_complete,
    read_manifest,
    short_hash,
    stage_dir,
    tree_digest,
)
from tclora.cluster_quality import report_markdown
from tclora.config import Config, ConfigError

log = logging.getLogger(__name__)


# ---- driver -------------------------------------------------------------------------------------------
def _task_summary(ds) -> dict[str, dict]:
    """Per task over every row (Ray pass 1): rows, mean embedding, a few examples.

    Raises:
        ConfigError: a row has no task_name (named by row_id), or there is only one task.
    """
    tasks: dict[str | None, dict] = {}
    for b in ds.map_batches(task_summary_batch, batch_format="pyarrow",
                            batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):
        for task, n, vec, examples, first in zip(*(b.column(c).to_pylist() for c in b.column_names)):
            e = tasks.setdefault(task, {"n": 0, "sum": 0.0, "examples": [], "first_row": first})
            e["n"] += n
            e["sum"] = e["sum"] + np.asarray(vec)
            e["examples"] = (e["examples"] + examples)[:N_EXAMPLES]
    if None in tasks:
        raise ConfigError(f"cluster.by=adapters groups rows by task_name, but {tasks[None]['n']} rows have none "
                          f"(e.g. {tasks[None]['first_row']}); add task_name or use cluster.by=text")
    if len(tasks) < 2:
        raise ConfigError(f"cluster.by=adapters needs at least 2 tasks, the corpus has {len(tasks)}")
    return {t: {**e, "mean": (e["sum"] / e["n"]).astype(np.float32)} for t, e in sorted(tasks.items())}


def _write_partition(ds, final: Path, key: dict, cfg: Config, run_dir: Path, embed_dir: Path,
                     summary: dict[str, dict], cluster_of: dict[str, int], extra_files=None) -> StageResult:
    """A cluster stage whose clusters are unions of whole tasks (``cluster_of``: task -> id)."""
    if is_complete(final, key):
        return StageResult(final, reused=True)
    k = max(cluster_of.values()) + 1
    n_rows = sum(e["n"] for e in summary.values())
    centroids = np.zeros((k, len(next(iter(summary.values()))["mean"])), np.float32)
    for c in range(k):  # row-weighted mean of the tasks' mean embeddings
        members = [t for t in summary if cluster_of[t] == c]
        weights = np.array([summary[t]["n"] for t in members], np.float64)
        centroids[c] = np.average([summary[t]["mean"] for t in members], axis=0, weights=weights)
    extra: dict = {}
    with stage_dir(final, key, extra) as tmp:
        store = storage.store_for(cfg, run_dir)
        labelled = ds.map_batches(task_label_batch, fn_kwargs={"cluster_of": cluster_of, "centroids": centroids},
                                  batch_format="pyarrow", batch_size=None)
        written = write_by_cluster(labelled, tmp, store, n_rows)
        counts = {(cluster_of[t], t): e["n"] for t, e in summary.items()}
        examples = {c: [x for t, e in summary.items() if cluster_of[t] == c for x in e["examples"]] for c in range(k)}
        report = km.report_from_counts(counts, examples, N_EXAMPLES)
        report["sizes"] = {str(i): written[i] for i in sorted(written)}
        mapping = {str(i): i for i in range(k)}
        report.update(k=k, k_auto=False, by="adapters", raw_sizes=dict(report["sizes"]), mapping=mapping,
                      policy=None)
        model = km.KMeansModel(centroids, inertia=None, n_rows=n_rows)  # no k-means objective: whole tasks
        kmeans_info = write_router(tmp, model, 1.0, {}, mapping, Path(embed_dir))
        atomic_write_json(tmp / "report.json", report)
        km.plot_cluster_sizes(report, tmp / "cluster_sizes.png")
        images = ["cluster_sizes.png", *(extra_files(tmp) if extra_files else [])]
        (tmp / "cluster_report.md").write_text(report_markdown(report, images), encoding="utf-8")
        extra.update(rows=n_rows, report=report, kmeans=kmeans_info)
    return StageResult(final, reused=False)


def run_mbc(cfg: Config, run_dir: Path, embed_dir: Path) -> StageResult:
    """Cluster the embed stage's rows by task adapters into ``<run_dir>/cluster/mbc-k<k>-<key>``.

    Raises:
        ConfigError: rows without task_name, fewer than 2 tasks, or ``cluster.k`` above the task count.
    """
    run_dir = Path(run_dir).resolve()
    final, key = stage_path(cfg, run_dir, embed_dir)
    if is_complete(final, key):
        log.info("cluster (by adapters): %s is complete, skipping", final)
        return StageResult(final, reused=True)
    store = storage.store_for(cfg, run_dir)
    ds = read_parquet(store.path(Path(embed_dir) / "embeddings"), store.filesystem)
    summary = _task_summary(ds)
    names = list(summary)
    if cfg.cluster.k > len(names):
        raise ConfigError(f"cluster.k={cfg.cluster.k} is more than the {len(names)} tasks of the corpus, and "
                          f"cluster.by=adapters moves whole tasks: use --set cluster.k={len(names)} or less")

    # [1] one cluster per task, [2] a short LoRA on each (the train stage, resumable)
    tasks_key = {"stage": "cluster-tasks", "embed": tree_digest(Path(embed_dir)), "seed": cfg.run.seed}
    tasks_dir = run_dir / "cluster" / f"tasks-{short_hash(tasks_key, 8)}"
    _write_partition(ds, tasks_dir, tasks_key, cfg, run_dir, embed_dir, summary, {t: i for i, t in enumerate(names)})
    store.publish(tasks_dir)  # the Tune trials read each task's rows from the run's store
    log.info("cluster (by adapters): a %d-step LoRA for each of %d tasks", cfg.cluster.mbc_steps, len(names))
    short = run_train(mbc.short_adapter_config(cfg), run_dir, tasks_dir, final=Path(f"{tasks_dir}-adapters")).dir
    store.publish(short)  # a restarted driver on another node finds them there
    adapters = read_manifest(short)["adapters"]

    # [3] tasks grouped by their adapters' similarity
    similarity = mbc.cosine_from_gram(mbc.update_gram([load_factors(short / adapters[str(i)])
                                                       for i in range(len(names))]))
    labels = mbc.cluster_tasks(similarity, cfg.cluster.k, seed=cfg.run.seed, n_init=cfg.cluster.n_init)
    cluster_of = {t: int(c) for t, c in zip(names, labels)}
    log.info("cluster (by adapters): %s", {c: [t for t in names if cluster_of[t] == c] for c in range(cfg.cluster.k)})

    def mbc_files(tmp: Path) -> list[str]:
        atomic_write_json(tmp / "mbc.json", {"tasks": names, "cluster_of": cluster_of, "steps": cfg.cluster.mbc_steps,
                                             "similarity": np.round(similarity, 6).tolist()})
        mbc.plot_similarity(similarity, names, labels.tolist(), tmp / "mbc_similarity.png")
        return ["mbc_similarity.png"]

    result = _write_partition(ds, final, key, cfg, run_dir, embed_dir, summary, cluster_of, mbc_files)
    log.info("cluster (by adapters): %d tasks in %d clusters (NMI %s) -> %s", len(names), cfg.cluster.k,
             read_manifest(final)["report"]["nmi"], final)
    return result
