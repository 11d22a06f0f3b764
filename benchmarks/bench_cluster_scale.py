"""Clustering at 10M rows: the real cluster stage on N x 384 embeddings read from Parquet, on real Ray.

    python -m benchmarks.bench_cluster_scale                  # 1M and 10M rows x 384, k = 64 (10M: ~18 GiB of disk)
    python -m benchmarks.bench_cluster_scale --smoke          # 20,000 rows, k = 16: checks the script runs
    python -m benchmarks.bench_cluster_scale --rows 1000000 --work /data/bench-cluster   # keep the Parquet for reruns

Per size, ``--tasks`` Gaussian blobs on the unit sphere (centres of norm 1, Dirichlet(2) sizes, per-blob
spread as in ``bench_kmeans``, rows L2-normalised like sentence embeddings) are written as an embed stage
would leave them: ``<run>/embed/embeddings/*.parquet`` with ``row_id, source, target, task_name`` and a
``fixed_size_list<float32>[dim]`` ``embedding``, ``--rows-per-file`` rows per file in row groups of at most
100k rows, generated one row group at a time (10M x 384 float32 is 15 GB: never in memory at once), and
a real embed-stage manifest (``tclora.artifacts.stage_dir``: rows, output hashes) so ``run_cluster``
takes it as a finished embed stage. ``task_name`` is the blob, so the stage's own report scores NMI
against the truth over every row.

Then ``pipelines.cluster.run_cluster`` runs as a pipeline runs it (hash sample -> k-means on the driver
-> count pass -> labelled write pass, all three over the Parquet in Ray Data), in a Ray instance started
for that size (``address="local"``, ``2 x cores`` logical CPUs as ``pipelines.session``; never an
existing cluster). Measured:

- rows/s: rows / the stage's wall seconds (the manifest splits them into fit, count and write);
- peak memory per process: a thread samples, every 0.2 s, the resident set of this process (the
  driver) and of every process below it (the Ray instance it started: GCS, raylet, workers). Reported:
  the driver's peak, the largest peak of any worker, and the peak of the sum over all of them. RSS
  counts the object store's shared pages in every process that touched them, so the JSON also gives
  ``private`` (RSS minus shared pages) peaks, whose sum does not double count;
- quality, on a uniform ``--subsample`` of rows kept aside while writing, split in two halves: the mean
  squared distance of the second half's rows to their nearest stage centroid over that to the nearest
  centroid of scikit-learn ``KMeans(k, n_init=--ref-n-init)`` fitted in float32 on the first half
  (scored on its own rows the reference gains ~2k/rows: 0.6% at 20k rows and k=64; that ratio is in the
  JSON too); NMI against the blobs of the stage's labels read back from its output (and checked
  against the nearest centroid) and of the reference's; and the stage report's NMI over all rows.

Data are deleted after each size unless ``--work`` is given (then reused when complete: generating 10M
rows takes minutes). Free disk is checked before anything is written. Writes
``bench_cluster_scale[_smoke].json`` and ``.png`` (rows/s and peak RSS against rows) to ``--out``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result

log = logging.getLogger("benchmarks.cluster_scale")

NOISE = 0.9  # per-dimension spread of a blob: uniform(0.5, 1.5) x NOISE / sqrt(dim), as bench_kmeans
ROW_GROUP = 100_000  # rows generated, held and written at a time
STRING_BYTES = 80  # row_id, source, target and task_name of one synthetic row in Parquet, about
CLUSTER_ROW_BYTES = 100  # one row of the cluster stage's output (strings, label, distance), about
SPARE_BYTES = 2 << 30  # Ray's logs and spilled objects, the plots, ...
MIB = 2**20


# ---- synthetic embed stage --------------------------------------------------------------------------
class Blobs:
    """``tasks`` unit centres in ``dim`` dimensions, their probabilities and spreads; rows by position."""

    def __init__(self, tasks: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.means = rng.standard_normal((tasks, dim)).astype(np.float32)
        self.means /= np.linalg.norm(self.means, axis=1, keepdims=True)
        self.probs = rng.dirichlet(np.full(tasks, 2.0))
        self.spread = (rng.uniform(0.5, 1.5, tasks) * NOISE / np.sqrt(dim)).astype(np.float32)
        self.seed = seed

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start .. start + n``: ``(x (n, dim) float32 unit rows, blob labels (n,))``, the same
        whichever order or chunking they are generated in."""
        rng = np.random.default_rng([self.seed, start])
        labels = rng.choice(len(self.probs), size=n, p=self.probs)
        x = rng.standard_normal((n, self.means.shape[1]), dtype=np.float32)
        x *= self.spread[labels, None]
        x += self.means[labels]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, labels


def row_ids(idx: np.ndarray) -> list[str]:
    """The embed stage's ``row_id`` (``<file>:<line>``) of rows ``idx`` of the synthetic corpus."""
    return [f"synthetic.jsonl:{i + 1}" for i in idx.tolist()]


def embed_schema(dim: int) -> pa.Schema:
    from tclora.corpus import CLEAN_SCHEMA

    return CLEAN_SCHEMA.append(pa.field("embedding", pa.list_(pa.float32(), dim)))


def rows_table(x: np.ndarray, labels: np.ndarray, start: int, schema: pa.Schema) -> pa.Table:
    idx = np.arange(start, start + len(x))
    tasks = [f"task-{t:03d}" for t in labels.tolist()]
    return pa.table({
        "row_id": row_ids(idx), "source": [f"synthetic row {i} of {t}" for i, t in zip(idx.tolist(), tasks)],
        "target": [f"answer {t}" for t in tasks], "task_name": tasks,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
    }, schema=schema)


def needed_bytes(rows: int, dim: int) -> int:
    """Disk one size needs: its embeddings, the cluster stage's output and room for Ray."""
    return rows * (dim * 4 + STRING_BYTES + CLUSTER_ROW_BYTES) + SPARE_BYTES


def check_disk(path: Path, need: int, what: str) -> None:
    """Fail before writing anything when ``path``'s filesystem has less than ``need`` bytes free.

    Raises:
        SystemExit: naming the path, what needs the space, and how much is missing.
    """
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise SystemExit(f"bench_cluster_scale: {what} needs ~{need / 2**30:.1f} GiB of disk under {path}, only "
                         f"{free / 2**30:.1f} GiB free: pass --work DIR on a larger disk, or fewer --rows")


def synthetic_embed_stage(run_dir: Path, rows: int, args) -> tuple[Path, float]:
    """``<run_dir>/embed``, a finished embed stage of ``rows`` blob rows, written a row group at a time,
    with ``subsample.npz`` (the subsample's row indices, embeddings and blobs) beside ``embeddings/``;
    reused when a complete one with the same parameters is there. Returns (directory, seconds)."""
    from tclora.artifacts import is_complete, short_hash, stage_dir

    final = run_dir / "embed"
    params = {"rows": rows, "dim": args.dim, "tasks": args.tasks, "noise": NOISE, "seed": args.seed,
              "rows_per_file": args.rows_per_file, "subsample": args.subsample}
    key = {"stage": "embed", "config": short_hash({"synthetic_blobs": params}), "inputs": short_hash(params)}
    if is_complete(final, key):
        log.info("%d rows: reusing the synthetic embed stage in %s", rows, final)
        return final, 0.0
    check_disk(run_dir, needed_bytes(rows, args.dim), f"{rows:,} x {args.dim} embeddings")
    blobs, schema = Blobs(args.tasks, args.dim, args.seed), embed_schema(args.dim)
    m = min(args.subsample, rows)
    sub_idx = np.sort(np.random.default_rng([args.seed, 1]).choice(rows, m, replace=False))
    sub_x, sub_labels = np.empty((m, args.dim), np.float32), np.empty(m, np.int64)
    group = min(ROW_GROUP, args.rows_per_file)
    started = time.perf_counter()
    extra: dict = {"synthetic": params}
    with stage_dir(final, key, extra) as tmp:
        (tmp / "embeddings").mkdir()
        for part, first in enumerate(range(0, rows, args.rows_per_file)):
            end = min(rows, first + args.rows_per_file)
            with pq.ParquetWriter(tmp / "embeddings" / f"part-{part:05d}.parquet", schema) as writer:
                for start in range(first, end, group):
                    x, labels = blobs.rows(start, min(group, end - start))
                    lo, hi = np.searchsorted(sub_idx, [start, start + len(x)])
                    sub_x[lo:hi], sub_labels[lo:hi] = x[sub_idx[lo:hi] - start], labels[sub_idx[lo:hi] - start]
                    writer.write_table(rows_table(x, labels, start, schema), row_group_size=group)
            log.info("%d rows: wrote %d of %d", rows, end, rows)
        np.savez(tmp / "subsample.npz", idx=sub_idx, x=sub_x, labels=sub_labels)
        extra.update(rows=rows, quarantined=0, duplicates=0, seconds_embed=round(time.perf_counter() - started, 3))
    seconds = time.perf_counter() - started  # with the manifest's hashing of every file
    log.info("%d rows: synthetic embed stage written in %.0f s (%.0f rows/s)", rows, seconds, rows / seconds)
    return final, seconds


# ---- memory ----------------------------------------------------------------------------------------
class ProcessPeaks:
    """Peak memory of this process (the driver) and of every process below it (the Ray instance it
    started), sampled every ``interval`` seconds in a thread. ``rss`` is the resident set; ``private``
    the resident set less its shared pages (the object store's, libraries'), which does not double count
    in a sum."""

    def __init__(self, interval: float = 0.2):
        self.root, self.interval = psutil.Process(), interval
        self.procs: dict[int, dict] = {}  # pid -> role, titles seen (tasks run), peak rss, peak private (bytes)
        self.peak_sum_rss = self.peak_sum_private = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _role(self, proc: psutil.Process, cmdline: list[str]) -> tuple[str, str]:
        if proc.pid == self.root.pid:
            return "driver", "driver"
        text = " ".join(cmdline)
        if (cmdline and cmdline[0].startswith("ray::")) or "default_worker.py" in text:
            return "worker", cmdline[0] if cmdline and cmdline[0].startswith("ray::") else "ray::worker"
        name = next((Path(a).name for a in cmdline if a.endswith(".py") or ("/" in a and "python" not in a)),
                    proc.name())
        return "ray", name

    def sample(self) -> None:
        total_rss = total_private = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                mem, cmdline = proc.memory_info(), proc.cmdline()
            except psutil.Error:  # exited between the listing and the read
                continue
            private = mem.rss - getattr(mem, "shared", 0)
            total_rss, total_private = total_rss + mem.rss, total_private + private
            entry = self.procs.setdefault(proc.pid, {"rss": 0, "private": 0, "ran": []})
            entry["role"], title = self._role(proc, cmdline)
            if title != "ray::IDLE" and title not in entry["ran"]:
                entry["ran"].append(title)  # a worker's title is the task it runs: what it ran up to its peak
            entry["rss"], entry["private"] = max(entry["rss"], mem.rss), max(entry["private"], private)
        self.peak_sum_rss = max(self.peak_sum_rss, total_rss)
        self.peak_sum_private = max(self.peak_sum_private, total_private)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "ProcessPeaks":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict:
        """Peaks in MiB: the driver, the largest worker (and the tasks it ran), Ray's other processes, the sums."""
        def peak(role: str, kind: str) -> dict:
            entries = [e for e in self.procs.values() if e["role"] == role]
            top = max(entries, key=lambda e: e[kind], default=None)
            return {"mib": round(top[kind] / MIB, 1) if top else None, "ran": top["ran"] if top else None}

        worker, system = peak("worker", "rss"), peak("ray", "rss")
        return {"driver_peak_rss_mib": peak("driver", "rss")["mib"],
                "driver_peak_private_mib": peak("driver", "private")["mib"],
                "worker_peak_rss_mib": worker["mib"], "worker_peak_ran": worker["ran"],
                "worker_peak_private_mib": peak("worker", "private")["mib"],
                "ray_system_peak_rss_mib": system["mib"], "ray_system_peak_process": (system["ran"] or [None])[0],
                "workers_seen": sum(e["role"] == "worker" for e in self.procs.values()),
                "sum_peak_rss_mib": round(self.peak_sum_rss / MIB, 1),
                "sum_peak_private_mib": round(self.peak_sum_private / MIB, 1), "samples": self.samples}


# ---- one size --------------------------------------------------------------------------------------
def cluster_config(run_dir: Path, args):
    from tclora.config import validate

    cluster = {"k": args.k}
    if args.sample_fraction is not None:
        cluster["sample_fraction"] = args.sample_fraction
    return validate({"run": {"dir": str(run_dir), "seed": args.seed}, "cluster": cluster})


def quality(cluster_dir: Path, embed_dir: Path, args) -> dict:
    """Inertia of the stage's centroids against a float32 scikit-learn ``KMeans``, and NMI against the blobs
    of the stage's labels (read back from its output) and of the reference's.

    The subsample is split in two at random: the reference is fitted on one half and both are scored on
    the other (``inertia_ratio``), so neither is scored on rows it was fitted on. ``inertia_ratio_fit_half``
    scores on the reference's own rows, where it has the advantage (about 2 k / rows; 0.6% at 20k rows, k=64).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    from tclora.cluster import assign

    sub = np.load(embed_dir / "subsample.npz")
    x, truth = sub["x"], sub["labels"]
    ids = row_ids(sub["idx"])
    table = pads.dataset(cluster_dir / "clusters", format="parquet", partitioning="hive").to_table(
        columns=["row_id", "kmeans_cluster"], filter=pc.field("row_id").isin(pa.array(ids)))
    written = dict(zip(table.column("row_id").to_pylist(), table.column("kmeans_cluster").to_pylist()))
    stage_labels = np.array([written.get(i, -1) for i in ids])
    nearest, stage_d2 = assign(x, np.load(cluster_dir / "centroids.npy"))
    fit = np.zeros(len(x), bool)
    fit[np.random.default_rng([args.seed, 2]).permutation(len(x))[: len(x) // 2]] = True
    started = time.perf_counter()
    ref = KMeans(args.k, n_init=args.ref_n_init, random_state=args.seed).fit(x[fit])
    ref_seconds = time.perf_counter() - started
    ref_labels, ref_d2 = assign(x, ref.cluster_centers_.astype(np.float32))

    def ratio(rows: np.ndarray) -> float:
        return round(float(stage_d2[rows].mean(dtype=np.float64) / ref_d2[rows].mean(dtype=np.float64)), 5)

    scored = ~fit
    return {"subsample_rows": len(x), "reference_rows": int(fit.sum()), "scored_rows": int(scored.sum()),
            "stage_mse": float(stage_d2[scored].mean(dtype=np.float64)),
            "reference_mse": float(ref_d2[scored].mean(dtype=np.float64)),
            "inertia_ratio": ratio(scored), "inertia_ratio_fit_half": ratio(fit),
            "reference": f"sklearn KMeans(n_init={args.ref_n_init}), float32",
            "reference_seconds": round(ref_seconds, 1), "reference_n_iter": int(ref.n_iter_),
            "labels_found": int((stage_labels >= 0).sum()),
            "labels_match_nearest_centroid": round(float((stage_labels == nearest).mean()), 6),
            "nmi_stage": round(float(normalized_mutual_info_score(truth[scored], stage_labels[scored])), 4),
            "nmi_reference": round(float(normalized_mutual_info_score(truth[scored], ref_labels[scored])), 4)}


def run_size(rows: int, root: Path, args) -> dict:
    """Synthetic embed stage, then the cluster stage timed in a fresh Ray instance, then its quality."""
    import ray

    from pipelines.cluster import run_cluster
    from tclora.artifacts import read_manifest

    run_dir = root / f"rows-{rows}"
    embed_dir, gen_seconds = synthetic_embed_stage(run_dir, rows, args)
    shutil.rmtree(run_dir / "cluster", ignore_errors=True)  # a finished stage would be reused, not timed
    cfg = cluster_config(run_dir, args)
    ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        object_store = ray.cluster_resources().get("object_store_memory")
        with ProcessPeaks() as peaks:
            started = time.perf_counter()
            stage = run_cluster(cfg, run_dir, embed_dir)
            seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    manifest = read_manifest(stage.dir)
    files = list((stage.dir / "clusters").rglob("*.parquet"))
    out = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
           "stage": {key: manifest[key] for key in ("seconds_fit", "seconds_count", "seconds_write")},
           "fit_sample_rows": manifest["kmeans"]["sample_rows"], "fit_fraction": manifest["kmeans"]["sample_fraction"],
           "kmeans_n_iter": manifest["kmeans"]["n_iter"], "nmi_all_rows": manifest["report"]["nmi"],
           "clusters": manifest["report"]["n_clusters"], "output_files": len(files),
           "output_mib": round(sum(f.stat().st_size for f in files) / MIB, 1),
           "embeddings_mib": round(sum(f.stat().st_size for f in (embed_dir / "embeddings").glob("*.parquet")) / MIB,
                                   1),
           "generate_seconds": round(gen_seconds, 1), "object_store_mib": round((object_store or 0) / MIB),
           "memory": peaks.summary()}
    out["quality"] = quality(stage.dir, embed_dir, args)
    mem, q = out["memory"], out["quality"]
    log.info("%d rows: %.1f s (%.0f rows/s; fit %.1f, count %.1f, write %.1f); driver peak %.0f MiB, worker peak "
             "%.0f MiB, sum %.0f MiB; inertia %.4fx sklearn, NMI %.3f (all rows %.3f)", rows, seconds,
             out["rows_per_s"], *out["stage"].values(), mem["driver_peak_rss_mib"], mem["worker_peak_rss_mib"] or 0,
             mem["sum_peak_rss_mib"], q["inertia_ratio"], q["nmi_stage"], out["nmi_all_rows"] or 0)
    if args.work is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ---- report ----------------------------------------------------------------------------------------
def size_name(rows: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if rows >= div and rows % div == 0:
            return f"{rows // div}{unit}"
    return f"{rows:,}"


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = result["runs"]
    rows = [r["rows"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(rows, [r["rows_per_s"] for r in runs], "o-", color="#3b7dd8")
    left.set_ylabel("rows/s (whole stage)")
    left.set_title("cluster stage throughput", fontsize=10)
    for label, key in (("driver", "driver_peak_rss_mib"), ("largest worker", "worker_peak_rss_mib"),
                       ("sum, RSS", "sum_peak_rss_mib"), ("sum, private", "sum_peak_private_mib")):
        right.plot(rows, [r["memory"][key] or 0 for r in runs], "o-", label=label)
    right.set_ylabel("peak memory (MiB)")
    right.set_title("peak memory per process", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel(f"rows (x {result['config']['dim']})")
        ax.set_ylim(bottom=0)
    c = result["config"]
    fig.suptitle(f"pipelines.cluster at k={c['k']}, {c['tasks']} blobs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def headlines(runs: list[dict], dim: int, k: int) -> list[dict]:
    rows = []
    for r in runs:
        size, mem, stage = size_name(r["rows"]), r["memory"], r["stage"]
        rows += [
            headline(f"cluster stage: {size} x {dim}, k={k}, rows/s", r["rows_per_s"],
                     f"{r['rows_per_s']:,.0f} rows/s ({r['seconds']:.0f} s: fit {stage['seconds_fit']:.0f}, count "
                     f"{stage['seconds_count']:.0f}, write {stage['seconds_write']:.0f})"),
            headline(f"cluster stage: {size}, driver peak RSS", mem["driver_peak_rss_mib"],
                     f"{mem['driver_peak_rss_mib']:,.0f} MiB (fit sample {r['fit_sample_rows']:,} rows; "
                     f"embeddings {r['embeddings_mib']:,.0f} MiB)"),
            headline(f"cluster stage: {size}, largest worker peak RSS", mem["worker_peak_rss_mib"],
                     f"{mem['worker_peak_rss_mib'] or 0:,.0f} MiB ({mem['workers_seen']} workers; all processes "
                     f"{mem['sum_peak_rss_mib']:,.0f} MiB RSS, {mem['sum_peak_private_mib']:,.0f} private)"),
        ]
    last, q = runs[-1], runs[-1]["quality"]
    rows.append(headline(
        f"cluster stage: {size_name(last['rows'])}, inertia vs float32 sklearn KMeans on a subsample",
        q["inertia_ratio"], f"{q['inertia_ratio']:.4f}x on {q['scored_rows']:,} held-out rows (sklearn fitted on "
        f"{q['reference_rows']:,}); NMI {q['nmi_stage']:.3f} (sklearn {q['nmi_reference']:.3f})",
        target="<= 1.005x (bench_kmeans' target)",
        met=q["inertia_ratio"] <= 1.005))
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=None, help="sizes (default 1000000 10000000; smoke 20000)")
    p.add_argument("--dim", type=int, default=384, help="embedding width (default 384)")
    p.add_argument("--k", type=int, default=None, help="cluster.k (default 64; smoke 16)")
    p.add_argument("--tasks", type=int, default=None, help="Gaussian blobs, the true labels (default --k)")
    p.add_argument("--subsample", type=int, default=None,
                   help="rows the quality is measured on (default 200000; smoke 5000)")
    p.add_argument("--ref-n-init", type=int, default=3, help="restarts of the sklearn reference (default 3)")
    p.add_argument("--sample-fraction", type=float, default=None,
                   help="cluster.sample_fraction (default: the config's, 0.2, with cluster.min_fit_rows)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per Parquet file (default 500000; smoke 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None,
                   help="keep the generated stages here and reuse them (default: a temp dir, deleted per size)")
    p.add_argument("--threads", type=int, default=None, help="cap the driver's torch/BLAS threads")
    args = p.parse_args(argv)
    setup_logging()
    sizes = sorted(args.rows or ([20_000] if args.smoke else [1_000_000, 10_000_000]))
    args.k = args.k or (16 if args.smoke else 64)
    args.tasks = args.tasks or args.k
    args.subsample = args.subsample or (5_000 if args.smoke else 200_000)
    args.rows_per_file = args.rows_per_file or (5_000 if args.smoke else 500_000)
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    root = args.work or Path(tempfile.mkdtemp(prefix="bench-cluster-scale-"))
    result = {"benchmark": "cluster_scale", "smoke": args.smoke, "machine": machine_info(),
              "config": {"rows": sizes, "dim": args.dim, "k": args.k, "tasks": args.tasks, "noise": NOISE,
                         "subsample": args.subsample, "ref_n_init": args.ref_n_init,
                         "sample_fraction": args.sample_fraction, "rows_per_file": args.rows_per_file,
                         "seed": args.seed, "threads": args.threads, "work": str(args.work) if args.work else None,
                         "memory_total_mib": round(psutil.virtual_memory().total / MIB)}}
    started = time.perf_counter()
    try:
        # Up front, so a 10M run does not fail after the 1M one: kept data add up (less what is already
        # there), temporary data do not.
        todo = [n for n in sizes if not (root / f"rows-{n}" / "embed" / "manifest.json").is_file()]
        need = sum(needed_bytes(n, args.dim) for n in todo) if args.work else needed_bytes(sizes[-1], args.dim)
        check_disk(root, need, f"sizes {[size_name(n) for n in sizes]}" + (" kept in --work" if args.work else ""))
        result["runs"] = [run_size(n, root, args) for n in sizes]
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["headline"] = headlines(result["runs"], args.dim, args.k)
    write_result(args.out, result_stem("cluster_scale", args.smoke), result, plot)
    return result


if __name__ == "__main__":
    main()
