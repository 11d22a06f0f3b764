"""Cluster stage: k-means on a sample of the embeddings, every row assigned in Ray Data, output by cluster.

Run alone, once the embed stage has finished (``python -m pipelines.embed``, same arguments):
    python -m pipelines.cluster --config configs/demo.yaml --set cluster.k=4

Output ``<run_dir>/cluster/k<k>-<key>/`` (one directory per cluster config, so a sweep over k keeps
every clustering and never overwrites one another trial is training on):
    clusters/cluster=<id>/*.parquet  row_id, source, target, task_name, kmeans_cluster, distance
                                     (cluster=-1 holds the rows of skipped tiny clusters)
    centroids.npy                    (k, dim) float32; kmeans.json: id mapping, inertia, sample size, and the
                                     embed stage's template view (null for whole sources)
    report.json, cluster_sizes.png   sizes, NMI/ARI vs task_name, top tasks and examples per cluster
    cluster_report.md                the same, readable, with the plots: cluster_pca.png (2-D PCA of the fit
                                     sample by cluster, task names), cluster_k_silhouette.png (k: auto)
    manifest.json                    key = embed digest + cluster section hash + seed; report; timings

Three passes, none holding all rows on the driver: (1) a seeded hash sample of row ids brings only the
sample's embeddings to the driver for the fit; (2) every row is assigned in ``map_batches`` and only
(cluster, task) counts come back, to apply the small-cluster rule and build the report; (3) rows are
assigned again with the final ids and written partitioned by cluster. The tasks' functions live in
:mod:`pipelines.cluster_tasks`, which never imports torch.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import session
from pipelines.cluster_tasks import N_EXAMPLES, count_batch, embedding_matrix, label_batch, sample_batch
from pipelines.io import read_parquet
from tclora import cluster as km
from tclora import storage, template_view
from tclora.artifacts import (
    StageResult,
    atomic_write_json,
    is_complete,
    read_manifest,
    short_hash,
    stage_dir,
    tree_digest,
)
from tclora.cluster_quality import choose_k, plot_criterion, plot_projection, report_markdown
from tclora.config import Config, ConfigError
from tclora.mbc import short_adapter_config

log = logging.getLogger(__name__)

PROJECTION_ROWS = 3000  # rows of the fit sample drawn in cluster_pca.png
# ---- driver ---------------------------------------------------------------------------------------
def _fit_on_sample(ds, cfg: Config, n_rows: int) -> tuple[km.KMeansModel, float, dict]:
    """k-means on a hash sample (:func:`tclora.cluster.fit_fraction`: every row of a corpus up to
    ``cluster.min_fit_rows``, at most ``cluster.max_fit_rows``), for ``cluster.k`` or, for ``auto``, the
    silhouette's choice in ``k_range``.

    Returns ``(model, fraction, info)``; info holds the first rows of the sample and their task names (for
    the projection plot) and, for ``auto``, the silhouette per k.
    """
    c = cfg.cluster
    km.check_k(c.k, n_rows)
    k_for_size = c.k_range[1] if c.k == "auto" else c.k
    fraction = km.fit_fraction(n_rows, k_for_size, c.sample_fraction, c.min_fit_rows, c.max_fit_rows)
    sampled = ds.map_batches(sample_batch, fn_kwargs={"fraction": fraction, "seed": cfg.run.seed},
                             batch_format="pyarrow", batch_size=None)  # Ray: only the sample's vectors travel
    hashes, chunks, tasks = [], [], []
    for b in sampled.iter_batches(batch_format="pyarrow", batch_size=None):
        if b.num_rows:
            hashes.append(b.column("hash").to_numpy())
            chunks.append(embedding_matrix(b))
            tasks += b.column("task_name").to_pylist()
    # Blocks arrive in any order: sorting by hash makes the fit input, hence the clustering, reproducible.
    # At most two copies of the sample at once, three during k auto's search on its distinct rows
    # (cluster.max_fit_rows: 1M x 384 is 1.5 GiB a copy).
    order = np.argsort(np.concatenate(hashes)) if chunks else np.zeros(0, np.int64)
    sample = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    del chunks
    sample = sample[order]
    # Only the projection plot needs rows after the fit: keep those, not the whole sample.
    info: dict = {"sample": sample[:PROJECTION_ROWS].copy(),
                  "task_names": [tasks[i] for i in order[:PROJECTION_ROWS]]}
    k = c.k
    if k == "auto":
        k, info["silhouette"] = choose_k(sample, *c.k_range, n_init=c.n_init, max_iter=c.max_iter,
                                         seed=cfg.run.seed)
    if len(sample) < k:  # an unlucky hash sample of a tiny corpus
        raise ValueError(f"cluster.sample_fraction={fraction:.3g} drew {len(sample)} rows, fewer than k={k}")
    log.info("cluster: fitting k=%d on %d sampled rows (fraction %.3g)", k, len(sample), fraction)
    model = km.fit_kmeans(sample, k, n_init=c.n_init, max_iter=c.max_iter, seed=cfg.run.seed)
    return model, fraction, info


def _write_views(tmp: Path, report: dict, model: km.KMeansModel, info: dict) -> None:
    """cluster_report.md, the PCA projection of the fit sample and, for k auto, silhouette against k."""
    images = ["cluster_sizes.png", "cluster_pca.png"]
    sample = info["sample"][:PROJECTION_ROWS]
    names = info["task_names"][:PROJECTION_ROWS]
    labels, _ = km.assign(sample, model.centroids)
    final = np.array([int(report["mapping"][str(i)]) for i in labels.tolist()])
    plot_projection(sample, final, tmp / "cluster_pca.png", names if any(t is not None for t in names) else None)
    if "silhouette" in info:
        plot_criterion(info["silhouette"], model.k, tmp / "cluster_k_silhouette.png")
        images.append("cluster_k_silhouette.png")
    (tmp / "cluster_report.md").write_text(report_markdown(report, images), encoding="utf-8")


def _count_labels(ds, centroids: np.ndarray) -> tuple[Counter, dict[int, list[str]]]:
    """(k-means label, task) counts and a few example sources per label, over every row (Ray: pass 2)."""
    counts: Counter = Counter()
    examples: dict[int, list[str]] = {}
    for batch in ds.map_batches(count_batch, fn_kwargs={"centroids": centroids}, batch_format="pyarrow",
                                batch_size=None).iter_batches(batch_format="pyarrow", batch_size=None):
        for text in batch.column("summary").to_pylist():
            payload = json.loads(text)
            counts.update({(label, t): n for label, t, n in payload["counts"]})
            for label, texts in payload["examples"].items():
                examples.setdefault(int(label), []).extend(texts)
    return counts, examples


def _relabel(counts: Counter, examples: dict[int, list[str]], mapping: dict[int, int]):
    """Counts and examples under the final cluster ids (after the small-cluster rule)."""
    final_counts: Counter = Counter()
    for (label, task), n in counts.items():
        final_counts[(mapping[label], task)] += n
    final_examples: dict[int, list[str]] = {}
    for label in sorted(examples):
        final_examples.setdefault(mapping[label], []).extend(examples[label])
    return final_counts, final_examples


def write_by_cluster(labelled, tmp: Path, store: storage.RunStore, n_rows: int) -> dict[int, int]:
    """Write a labelled dataset (a ``cluster`` column) to ``<tmp>/clusters/cluster=<id>/`` through the run's
    store (Ray: pass 3); returns rows written per cluster id.

    Raises:
        RuntimeError: the rows written are not ``n_rows``.
    """
    with store.remote_output(tmp / "clusters") as out:  # Ray: write by cluster, to the store
        labelled.write_parquet(out, filesystem=store.filesystem, partition_cols=["cluster"])
    written = {int(d.name.split("=", 1)[1]): sum(pq.read_metadata(f).num_rows for f in d.glob("*.parquet"))
               for d in (tmp / "clusters").glob("cluster=*")}
    if sum(written.values()) != n_rows:
        raise RuntimeError(f"cluster: wrote {sum(written.values())} rows, expected {n_rows}")
    return written


def stage_path(cfg: Config, run_dir: Path, embed_dir: Path) -> tuple[Path, dict]:
    """``(<run_dir>/cluster/k<k>-<hash of key>, key)``: key = embeddings digest, cluster section, seed;
    ``mbc-k<k>-...`` for ``cluster.by: adapters``, whose key adds the sections its short adapters train with."""
    key = {"stage": "cluster", "embed": tree_digest(Path(embed_dir)), "config": cfg.section_hash("cluster"),
           "seed": cfg.run.seed}
    if cfg.cluster.by == "adapters":  # model-based clustering (pipelines/mbc.py) also trains short adapters
        c = cfg.cluster  # only what MBC reads, and the config its short adapters really train with
        key["config"] = {"k": c.k, "mbc_steps": c.mbc_steps, "n_init": c.n_init}
        key["short_adapters"] = short_adapter_config(cfg).section_hash("model", "lori", "train")
        return Path(run_dir) / "cluster" / f"mbc-k{cfg.cluster.k}-{short_hash(key, 8)}", key
    return Path(run_dir) / "cluster" / f"k{cfg.cluster.k}-{short_hash(key, 8)}", key


def finished_cluster(cfg: Config, run_dir: Path) -> Path:
    """This config's finished cluster stage in ``run_dir`` (for a later stage run alone).

    Raises:
        pipelines.session.MissingStageError: the embed or cluster stage has not finished.
    """
    embed_dir = session.require_finished(Path(run_dir) / "embed", None, "embed")
    return session.require_finished(*stage_path(cfg, run_dir, embed_dir), "cluster")


def write_router(out: Path, model: km.KMeansModel, fraction: float, info: dict, mapping: dict[str, int],
                 embed_dir: Path) -> dict:
    """``centroids.npy`` and ``kmeans.json``: what routing a new row needs (``tclora.cluster.route_records``),
    including the embed stage's fitted template view (``embed.view: template``; None for whole sources)."""
    np.save(out / "centroids.npy", model.centroids, allow_pickle=False)
    view = embed_dir / template_view.FILE
    kmeans_info = {"k": model.k, "inertia_sample": model.inertia, "n_iter": model.n_iter,
                   "sample_rows": model.n_rows, "sample_fraction": fraction,
                   "restart_inertias": model.restart_inertias, "mapping": mapping,
                   "silhouette": {str(k): v for k, v in info.get("silhouette", {}).items()} or None,
                   "view": json.loads(view.read_text()) if view.is_file() else None}
    atomic_write_json(out / "kmeans.json", kmeans_info)
    return kmeans_info


def run_cluster(cfg: Config, run_dir: Path, embed_dir: Path) -> StageResult:
    """Cluster the embed stage's rows into ``<run_dir>/cluster/k<k>-<key>``; skipped when already done.

    Changing ``cluster.*`` (or ``run.seed``) re-clusters; the embed stage is only read.

    Raises:
        ConfigError: ``cluster.by: adapters``, whose stage (:func:`pipelines.mbc.run_mbc`) trains adapters.
    """
    c = cfg.cluster
    if c.by == "adapters":
        raise ConfigError("cluster.by=adapters trains a short adapter per task: run it with "
                          "`tclora run --config ... --set cluster.by=adapters --until cluster`")
    if (rows := (read_manifest(Path(embed_dir)) or {}).get("rows")) is not None:
        km.check_k(c.k, rows)  # before any Ray work or output directory
    final, key = stage_path(cfg, run_dir, embed_dir)
    if is_complete(final, key):
        log.info("cluster: %s is complete for this config and embeddings, skipping", final)
        return StageResult(final, reused=True)

    extra: dict = {}
    with stage_dir(final, key, extra) as tmp:
        started = time.perf_counter()
        # Ray: lazy, streamed, read by tasks on any node: from the run's store, not this driver's disk.
        store = storage.store_for(cfg, run_dir)
        ds = read_parquet(store.path(Path(embed_dir) / "embeddings"), store.filesystem)
        n_rows = (read_manifest(Path(embed_dir)) or {}).get("rows") or ds.count()  # count() costs a Ray pass
        model, fraction, info = _fit_on_sample(ds, cfg, n_rows)
        fitted = time.perf_counter()

        counts, examples = _count_labels(ds, model.centroids)
        raw_sizes = Counter()
        for (label, _), n in counts.items():
            raw_sizes[label] += n
        mapping = km.handle_small_clusters(raw_sizes, model.centroids, c.min_cluster_size, c.small_cluster_policy)
        final_counts, final_examples = _relabel(counts, examples, mapping)
        counted = time.perf_counter()

        final_ids = np.array([mapping[i] for i in range(model.k)], dtype=np.int32)
        labelled = ds.map_batches(label_batch, fn_kwargs={"centroids": model.centroids, "final_ids": final_ids},
                                  batch_format="pyarrow", batch_size=None)
        written = write_by_cluster(labelled, tmp, store, n_rows)

        report = km.report_from_counts(final_counts, final_examples, N_EXAMPLES)
        report["sizes"] = {str(i): written[i] for i in sorted(written)}  # authoritative: what was written
        report.update(k=model.k, k_auto=c.k == "auto", raw_sizes={str(i): raw_sizes.get(i, 0) for i in range(model.k)},
                      mapping={str(i): j for i, j in mapping.items()}, policy=c.small_cluster_policy)
        kmeans_info = write_router(tmp, model, fraction, info, report["mapping"], Path(embed_dir))
        atomic_write_json(tmp / "report.json", report)
        km.plot_cluster_sizes(report, tmp / "cluster_sizes.png")
        _write_views(tmp, report, model, info)
        extra.update(rows=n_rows, report=report, kmeans=kmeans_info,
                     seconds_fit=round(fitted - started, 3), seconds_count=round(counted - fitted, 3),
                     seconds_write=round(time.perf_counter() - counted, 3))
    log.info("cluster: %d rows in %d clusters (NMI %s) -> %s", n_rows, report["n_clusters"], report["nmi"], final)
    return StageResult(final, reused=False)


# ---- readers for the later stages -----------------------------------------------------------------
def list_clusters(cluster_dir: Path) -> dict[int, int]:
    """Rows per final cluster id (-1 = skipped rows, trained by no adapter), from the stage manifest."""
    manifest = read_manifest(Path(cluster_dir))
    if manifest is None:
        raise FileNotFoundError(f"{cluster_dir}: not a finished cluster stage (no manifest.json)")
    return {int(i): int(n) for i, n in manifest["report"]["sizes"].items()}


def read_cluster(cluster_dir: Path | str, cluster_id: int, filesystem: pafs.FileSystem | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """One cluster's rows (row_id, source, target, task_name, ...) as an Arrow table, read in this process.

    ``cluster_dir`` is a finished cluster stage: a local directory, or a path on ``filesystem`` (the run's
    store, :meth:`tclora.storage.RunStore.path`) for a caller on another node such as a Tune trial. Not a
    Ray Data read: a cluster is one adapter's training set, and a Ray Data job per cluster cost the demo
    ~60 s of task and actor start-up per Train run on 2 cores for a few hundred rows.

    Raises:
        ValueError: the cluster has no rows there.
    """
    fs = filesystem or pafs.LocalFileSystem()
    root = str(Path(cluster_dir).resolve()) if isinstance(fs, pafs.LocalFileSystem) else str(cluster_dir)
    part = f"{root}/clusters/cluster={cluster_id}"
    if fs.get_file_info(part).type != pafs.FileType.Directory:
        raise ValueError(f"{cluster_dir}: cluster {cluster_id} has no rows (no {part})")
    # partitioning=None: no string "cluster" column from the directory name
    return pads.dataset(part, filesystem=fs, format="parquet", partitioning=None).to_table(columns=columns)


def _run_alone(cfg: Config, run_dir: Path) -> StageResult:
    embed_dir = session.require_finished(Path(run_dir) / "embed", None, "embed")
    return run_cluster(cfg, run_dir, embed_dir)


def main(argv: list[str] | None = None) -> int:
    return session.stage_main("cluster", _run_alone, argv)


if __name__ == "__main__":
    sys.exit(main())
