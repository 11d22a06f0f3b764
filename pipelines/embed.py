"""Embed stage: corpus files -> validated rows -> sentence embeddings (Parquet), bad rows quarantined.

Run alone (the session set-up of every entry point, then this stage only):
    python -m pipelines.embed --config configs/demo.yaml --set data.path=data/train.jsonl --set embed.num_actors=2

Output ``<run_dir>/embed/``:
    embeddings/*.parquet   row_id, source, target, task_name (nullable), embedding (fixed_size_list<float32>[384])
    quarantine/rows.jsonl  one line per rejected row: file, line (JSONL, 1-based) or row (Parquet, 0-based),
                           reason, raw text; a file Arrow cannot read as Parquet is one line with row null;
                           rows whose embedding came out NaN/inf follow the scan's entries
    template_view.json     embed.view: template only: the fitted TemplateMiner (copied into kmeans.json, so
                           held-out rows are routed in the space the centroids were fitted in)
    manifest.json          key (config hash of data+embed, input digest), seconds, counts: rows (embedded),
                           quarantined (lines of rows.jsonl), duplicates (embedded rows repeating an earlier
                           source + target; kept) with a few duplicate_examples; seconds_scan, seconds_embed
                           (the read -> embed -> write pass) and, per embedding actor, its timings
                           (:class:`ActorReports`)

Two passes over the files: a cheap validation scan (counts, quarantine, and a clear error before any
model loads when nothing is valid), then read -> validate -> embed -> write, streamed by Ray Data
with one model per actor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines import session
from pipelines.io import clean_records, read_corpus, scan_corpus
from tclora import storage, template_view
from tclora.artifacts import StageResult, atomic_write_json, is_complete, stage_dir
from tclora.config import Config
from tclora.corpus import CorpusError, Fields, ScanResult, list_input_files

log = logging.getLogger(__name__)

TEMPLATE_SAMPLE_ROWS = 20000  # sources the template view is fitted on (its rules are fractions of rows)
ENCODE_BATCH = 64  # sentences per forward pass inside one map_batches call
ROWS_PER_FILE = 65536  # embeddings per Parquet file: ~100 MB at 384 float32 dims (Ray's blocks are embed.batch_size)


class EmbedCallable:
    """Ray Data callable class: loads the model once per actor, embeds the ``source`` of each batch.

    On CPU, ``num_actors`` actors share the node's cores: Ray pins OMP_NUM_THREADS to the actor's
    ``num_cpus`` (1), which would leave encoding on one core, so each actor takes cores // num_actors
    threads (exact on one node, conservative when the pool spans several).

    ``reports`` is the stage's :class:`ActorReports`; the constructor and every call wait for their
    report to it (one round trip per block), so the driver's totals are complete once the write returns.
    """

    def __init__(self, model: str, device: str, reports, num_actors: int = 1, miner=None):
        started = time.perf_counter()
        import torch

        from tclora.embed import Embedder

        if device == "cpu":
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // num_actors))
        self.embedder = Embedder(model, device=device)
        self.reports = reports  # an ActorReports handle
        self.miner = miner  # a tclora.template_view.TemplateMiner when embed.view is "template"
        self.name = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"
        self.started = started
        ray.get(self.reports.timing.remote(self.name, load=time.perf_counter() - started,
                                           threads=torch.get_num_threads()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tclora.embed import nonfinite_rows

        wall, cpu = time.perf_counter(), time.process_time()
        sources = batch.column("source").to_pylist()
        vectors = self.embedder.encode(self.miner.views(sources) if self.miner else sources, ENCODE_BATCH)  # (b, dim)
        finite, entries = nonfinite_rows(batch.column("row_id").to_pylist(), sources, vectors)
        if entries:  # recorded before this block counts as done, so the driver sees them after the write
            ray.get(self.reports.quarantine.remote(entries))
            batch, vectors = batch.filter(pa.array(finite)), vectors[finite]
        flat = pa.array(vectors.reshape(-1), pa.float32())
        # Waited for (one round trip per block), so the driver's totals after the write include every block.
        ray.get(self.reports.timing.remote(
            self.name, batches=1, rows=len(sources), encode=time.perf_counter() - wall,
            encode_cpu=time.process_time() - cpu, until_done=time.perf_counter() - self.started))
        return batch.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def _row_of(entry: dict) -> tuple[str, int]:
    """A quarantine entry's place: its file and JSON Lines line (1-based) or Parquet row (0-based)."""
    return entry["file"], entry.get("line", entry.get("row"))


@ray.remote(num_cpus=0)
class ActorReports:
    """What the embedding actors report mid-stream: rows they reject, and where their time went.

    Ray Data's ``map_batches`` has one output, the embeddings. Rejected rows (non-finite embeddings)
    are rare, so they travel here instead and the driver appends them to the quarantine file the
    validation scan wrote. Timings (seconds, per actor) go into the stage's manifest: model ``load``,
    ``encode`` wall and ``encode_cpu`` (process CPU, all threads) summed over batches, and
    ``until_done`` (actor start to the end of its last batch), so a slow stage shows whether the
    model, the cores or the streaming around it took the time.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple, dict] = {}  # by (file, line or row)
        self.timings: dict[str, dict[str, float]] = {}

    def quarantine(self, entries: list[dict]) -> None:
        # Once per row: a block whose actor died after reporting is embedded again and reports its rows again.
        for entry in entries:
            self.entries.setdefault(_row_of(entry), entry)

    def timing(self, actor: str, until_done: float | None = None, **amounts: float) -> None:
        # Every key from the first report on: an actor that got no block still reads rows 0, encode 0.
        totals = self.timings.setdefault(actor, dict.fromkeys(("batches", "rows", "encode", "encode_cpu",
                                                               "until_done"), 0.0))
        for name, amount in amounts.items():
            totals[name] = totals.get(name, 0) + amount
        if until_done is not None:
            totals["until_done"] = until_done

    def take(self) -> tuple[list[dict], dict[str, dict[str, float]]]:
        entries, self.entries = list(self.entries.values()), {}
        return entries, {a: {k: round(v, 3) for k, v in t.items()} for a, t in self.timings.items()}


ROWS_PER_CPU_ACTOR = 8000  # embed.num_actors auto on CPU: another actor only if it gets this many rows


def pool_size(num_actors: int | Literal["auto"], gpus_per_actor: float, rows: int, rows_per_block: int,
              cluster: dict[str, float]) -> int:
    """Embedding actors to start: ``embed.num_actors``, or for ``"auto"`` what the cluster and the rows fill.

    With GPUs: one actor per ``gpus_per_actor`` of the cluster's GPUs. On CPU: one actor per CPU
    (:class:`EmbedCallable` gives each cores // actors threads: one, when CPUs are the limit), but no more
    than one per ``ROWS_PER_CPU_ACTOR`` rows, since each actor loads its own model (6-10 s of a core for
    MiniLM). Either way no more actors than blocks of ``rows_per_block`` rows, the most that can work at once.
    "auto" reads the cluster as it is when the stage starts: on an autoscaling cluster, its current size.
    Measured on 2 cores (``bench_embed``): two one-thread actors took 452 s for 100k rows and 72 s for
    16k, one actor with two threads 592 s and 80 s. torch's intra-op threads in one process wait on each
    other, and on every other busy process of the node (Ray's own included), at each operator.

    Args:
        num_actors: ``embed.num_actors``: a count, taken as given, or ``"auto"``.
        gpus_per_actor: ``embed.num_gpus_per_actor`` (0: CPU actors).
        rows: valid rows to embed (the validation scan's count).
        rows_per_block: ``embed.batch_size``.
        cluster: ``ray.cluster_resources()``.

    Returns:
        The actor pool's size, at least 1.
    """
    if num_actors != "auto":
        return int(num_actors)
    if gpus_per_actor > 0:
        fits = int(cluster.get("GPU", 0) // gpus_per_actor)
    else:
        fits = min(int(cluster.get("CPU", 1)), rows // ROWS_PER_CPU_ACTOR)
    return max(1, min(fits, math.ceil(rows / rows_per_block)))


def actor_cpus(num_actors: int, cluster_cpus: float) -> float:
    """CPUs each embedding actor reserves: one, unless the pool would then hold every CPU of the cluster.

    The pool's actors start first; a read or write task that still needs a whole free CPU then waits
    forever (seen: 2 actors on a 2-CPU Ray, the stage idle at "Read: 0/1"). Such a pool shares all
    but one CPU, so reads and writes always have one. The actors' torch threads are set separately
    (:class:`EmbedCallable`), so this only changes what Ray schedules, not how fast they encode.
    """
    if num_actors < cluster_cpus:
        return 1.0
    return max(cluster_cpus - 1, 0.5) / num_actors


def actor_blocks(raw, fields: Fields, rows_per_block: int) -> ray.data.Dataset:
    """The valid rows of ``raw`` in blocks of at most ``rows_per_block`` rows, as the actor pool takes them.

    One block goes to one actor. A reader's block can hold a whole file (Ray Data merges what a read
    task yields up to ``DataContext.target_max_block_size``, 128 MiB), so without the split one actor
    embedded a 16k-row file while the other idled. The repartition streams and fuses into the read tasks.
    """
    return clean_records(raw, fields).repartition(target_num_rows_per_block=rows_per_block)


def run_embed(cfg: Config, run_dir: Path, path: str | None = None) -> StageResult:
    """Embed the corpus at ``path`` (default ``cfg.data.path``) into ``<run_dir>/embed``; skip if done.

    Returns:
        The stage directory (see the module docstring for its layout), and whether it was reused.

    Raises:
        CorpusError: the path is missing, holds no corpus files, or no row is valid.
    """
    uri = path or cfg.data.path
    inputs = list_input_files(uri, cfg.run.storage_options)
    fields = Fields.from_config(cfg.data)
    final = Path(run_dir) / "embed"
    key = {"stage": "embed", "config": cfg.section_hash("data", "embed"), "inputs": inputs.digest()}
    if is_complete(final, key):
        log.info("embed: %s is complete for this config and input, skipping", final)
        return StageResult(final, reused=True)

    extra: dict = {"input": uri, "files": len(inputs.files), "model": cfg.embed.model}
    with stage_dir(final, key, extra) as tmp:
        raw = read_corpus(inputs, fields)
        started = time.perf_counter()
        scan = scan_corpus(raw, tmp / "quarantine" / "rows.jsonl", fields, inputs)
        scanned = time.perf_counter()

        # ---- Ray touchpoint: the actor pool; each actor loads the model once -------------------------
        reports = ActorReports.remote()
        if (miner := _template_miner(cfg, clean_records(raw, fields), scan.rows)) is not None:
            atomic_write_json(tmp / template_view.FILE, miner.to_json())  # held-out rows are routed through it too
        embedded = _embedded(cfg, raw, fields, scan.rows, reports, miner)
        # Ray: the write tasks run on any node, so they write to the run's store (a staging prefix when
        # run.dir is an object store), never to this driver's disk; the files then land in `tmp`.
        store = storage.store_for(cfg, run_dir)
        with store.remote_output(tmp / "embeddings") as out:  # files of ~100 MB, not one per actor block
            embedded.write_parquet(out, filesystem=store.filesystem, min_rows_per_file=ROWS_PER_FILE)
        written = sum(pq.read_metadata(p).num_rows for p in (tmp / "embeddings").glob("*.parquet"))
        rejected, timings = ray.get(reports.take.remote())
        scan = _quarantine_nonfinite(scan, rejected, tmp / "quarantine" / "rows.jsonl", uri)
        if written != scan.rows:  # the two passes disagree: never hand on a silently short output
            raise RuntimeError(f"embed: wrote {written} rows but validation passed {scan.rows}")
        extra.update(rows=scan.rows, quarantined=scan.quarantined, duplicates=scan.duplicates,
                     duplicate_examples=scan.duplicate_examples, seconds_scan=round(scanned - started, 3),
                     seconds_embed=round(time.perf_counter() - scanned, 3), actors=timings)
    log.info("embed: %d rows embedded (%d duplicates), %d quarantined -> %s", scan.rows, scan.duplicates,
             scan.quarantined, final)
    return StageResult(final, reused=False)


def _embedded(cfg: Config, raw, fields: Fields, rows: int, reports, miner) -> ray.data.Dataset:
    """Lazy read -> validate -> embed: :func:`pool_size` actors of :class:`EmbedCallable` over :func:`actor_blocks`."""
    gpus, cluster = cfg.embed.num_gpus_per_actor, ray.cluster_resources()
    actors = pool_size(cfg.embed.num_actors, gpus, rows, cfg.embed.batch_size, cluster)
    return actor_blocks(raw, fields, cfg.embed.batch_size).map_batches(
        EmbedCallable,
        fn_constructor_kwargs={"model": cfg.embed.model, "device": "cuda" if gpus > 0 else "cpu",
                               "num_actors": actors, "reports": reports, "miner": miner},
        # One block at a time per actor, so a block waits for whichever actor is free rather than
        # queueing (Ray's default: 4 in flight) behind the actor that finished loading first.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        batch_size=cfg.embed.batch_size,
        batch_format="pyarrow",
        num_cpus=actor_cpus(actors, cluster.get("CPU", 1.0)),
        num_gpus=gpus or None,
    )


def _template_miner(cfg: Config, ds, rows: int):
    """For ``embed.view: template``: a TemplateMiner fitted on a seeded sample of up to 20000 sources."""
    if cfg.embed.view != "template":
        return None
    from tclora.template_view import TemplateMiner

    sample = ds.random_sample(min(1.0, TEMPLATE_SAMPLE_ROWS / max(rows, 1)), seed=cfg.run.seed)  # Ray: one pass
    return TemplateMiner.fit(r["source"] for r in sample.select_columns(["source"]).take_all())


def _quarantine_nonfinite(scan: ScanResult, entries: list[dict], quarantine_file: Path, uri: str) -> ScanResult:
    """Append rows whose embedding is not finite to the quarantine file; the counts without them.

    Raises:
        CorpusError: no row is left (naming the path and an example).
    """
    if not entries:
        return scan
    entries.sort(key=_row_of)
    with open(quarantine_file, "a", encoding="utf-8") as out:
        for entry in entries:
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
    first, (file, index) = entries[0], _row_of(entries[0])
    log.warning("%s: %d rows with non-finite embeddings quarantined, e.g. %s:%s", uri, len(entries), file, index)
    if len(entries) == scan.rows:
        raise CorpusError(f"data.path {uri!r}: no valid rows (every embedding is non-finite, e.g. "
                          f"{file}:{index}: {first['reason']})")
    return dataclasses.replace(scan, rows=scan.rows - len(entries), quarantined=scan.quarantined + len(entries))


def main(argv: list[str] | None = None) -> int:
    return session.stage_main("embed", run_embed, argv)


if __name__ == "__main__":
    sys.exit(main())
