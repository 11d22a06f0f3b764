"""Corpus reading on Ray Data: the readers of :mod:`tclora.corpus` as datasources, validation in ``map_batches``.

Each file is read by a small ``FileBasedDatasource`` that emits one raw record per row with its file and
position (:func:`tclora.corpus.jsonl_blocks`, :func:`tclora.corpus.parquet_blocks`); validation
(:func:`tclora.corpus.check_rows`) runs in ``map_batches``; the driver streams bad rows into the
quarantine file and counts duplicates from 16 bytes per valid row. Formats, positions and the
quarantine rules are described in :mod:`tclora.corpus`.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from ray.data.datasource import FileBasedDatasource

from tclora.corpus import (
    JSON_SUFFIXES,
    LINE_SPAN,
    CorpusError,
    Fields,
    InputFiles,
    ScanResult,
    clean_batch,
    jsonl_blocks,
    parquet_blocks,
    relative_path,
    scan_batch,
)
from tclora.data import find_duplicates

log = logging.getLogger(__name__)


# Ray touchpoint 1: the generators as datasources (one read task per file, streamed)
class _JsonLinesDatasource(FileBasedDatasource):
    """Ray datasource over :func:`jsonl_blocks` (streamed, so a file never sits in memory whole)."""

    def __init__(self, paths: list[str], root: str, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self._root = root

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from jsonl_blocks(f, relative_path(path, self._root))


class _ParquetRowsDatasource(FileBasedDatasource):
    """Ray datasource over :func:`parquet_blocks`."""

    def __init__(self, paths: list[str], root: str, fields: Fields, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self._root, self._fields = root, fields

    def _open_input_source(self, filesystem, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # Parquet needs random access, not a stream

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from parquet_blocks(f, relative_path(path, self._root), self._fields)


def read_corpus(inputs: InputFiles, fields: Fields):
    """Lazy Ray Dataset of raw records (``_file``, ``_index``, ``_raw``) of every file (Ray touchpoint 2)."""
    # One read task per file, and no SplitBlocks: the readers already cut ROWS_PER_BLOCK-row blocks, and
    # Ray's default (>= 200 blocks) turned a 65-row file into 65 tasks, each paying worker start-up.
    parts = []
    if json_paths := inputs.paths(JSON_SUFFIXES):
        parts.append(ray.data.read_datasource(
            _JsonLinesDatasource(json_paths, inputs.root, filesystem=inputs.filesystem),
            override_num_blocks=len(json_paths)))
    if pq_paths := inputs.paths((".parquet",)):
        parts.append(ray.data.read_datasource(
            _ParquetRowsDatasource(pq_paths, inputs.root, fields, filesystem=inputs.filesystem),
            override_num_blocks=len(pq_paths)))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def clean_records(raw_ds, fields: Fields):
    """Lazy Dataset of the valid rows (Ray touchpoint 3: map_batches)."""
    return raw_ds.map_batches(clean_batch, fn_kwargs={"fields": fields}, batch_format="pyarrow",
                              batch_size=None)


def scan_corpus(raw_ds, quarantine_file: Path, fields: Fields, inputs: InputFiles) -> ScanResult:
    """Validate every row (Ray touchpoint 4); stream bad rows into ``quarantine_file`` (JSONL) on the driver.

    Bad rows travel to the driver batch by batch and are written at once; of each valid row only a
    64-bit key and its position come back (16 bytes a row on the driver, for the duplicate count).

    Raises:
        CorpusError: no row is valid; the message names the path and the commonest reasons.
    """
    quarantine_file.parent.mkdir(parents=True, exist_ok=True)
    n_bad = 0
    reasons: dict[str, int] = {}
    examples: list[str] = []
    keys: list[bytes] = []
    orders: list[bytes] = []
    names = sorted(relative_path(f.path, inputs.root) for f in inputs.files)
    scanned = raw_ds.map_batches(scan_batch, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs={"fields": fields, "file_rank": {n: i for i, n in enumerate(names)}})
    with open(quarantine_file, "w", encoding="utf-8") as out:
        for batch in scanned.iter_batches(batch_format="pyarrow", batch_size=None):
            keys += batch.column("key").to_pylist()
            orders += batch.column("order").to_pylist()
            for text in batch.column("bad").to_pylist():
                for row in json.loads(text):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    kind = row["reason"].split(":")[0]
                    reasons[kind] = reasons.get(kind, 0) + 1
                    n_bad += 1
                    if len(examples) < 3:
                        where = f"{row['file']}:{row.get('line', row.get('row'))}"
                        examples.append(f"{where} {row['reason']}")
    key = np.frombuffer(b"".join(keys), dtype=np.uint64)
    order = np.frombuffer(b"".join(orders), dtype=np.int64)
    n_good, uri = len(key), inputs.uri
    if n_bad:
        log.warning("%s: %d bad rows quarantined in %s (%s)", uri, n_bad, quarantine_file, reasons)
    if n_good == 0:
        detail = f"all {n_bad} rows rejected, e.g. " + "; ".join(examples) if n_bad else "the files hold no rows"
        raise CorpusError(f"data.path {uri!r}: no valid rows ({detail})")
    n_dup, pairs = find_duplicates(key, order)
    where = lambda i: f"{names[order[i] // LINE_SPAN]}:{order[i] % LINE_SPAN}"  # noqa: E731
    repeats = [f"{where(dup)} repeats {where(orig)}" for dup, orig in pairs]
    if n_dup:
        log.warning("%s: %d duplicate rows (same source and target) kept, e.g. %s", uri, n_dup, repeats)
    return ScanResult(n_good, n_bad, n_dup, repeats)


# Ray touchpoint 3: the stages' own Parquet outputs read back (embeddings, rows by cluster).
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_ACTOR = 10  # Ray's RAY_DATA_PARQUET_FOOTER_BATCH_SIZE default: footers per read call
MAX_FOOTER_ACTORS = 32  # Ray's default pool size, reached from 320 files up
READER_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"  # Ray's own switch between its two Parquet readers
# Ray's DataContext is one object per process: a read switching its reader must not overlap another read.
_READER_SWITCH = threading.Lock()


def read_parquet(path: str, filesystem: pafs.FileSystem) -> ray.data.Dataset:
    """``ray.data.read_parquet``, with the reader and its footer-actor pool chosen by the number of files.

    Ray 2.60's default Parquet reader (DataSourceV2) reads the files' footers on a pool of
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` actors (32 by default), started anew each time a dataset is
    executed; the cluster stage executes 3. On a 2-core machine 32 actors cost 10-15 s per pass over 2
    files and one actor 1.0 s more than none (issue 16). So:

    - up to ``FILES_PER_FOOTER_ACTOR`` files (one footer batch) on a local or shared-mount filesystem:
      Ray's V1 reader, which reads so few footers in the calling process and samples the files with two short
      tasks, starting no actor (tiny demo run, 2 cores, side by side: cluster stage 3.3-3.9 s against
      11.0 s with one footer actor per pass);
    - more files, or an object store: V2 with one actor per 10 files, at most Ray's 32, its large-corpus
      behaviour. On S3 (SeaweedFS) the V1 reader made no pass faster, and the dataset it returns, written
      back to the store partitioned by cluster, took 11-17 s the first time against 4 s from V2.

    The user's choice wins: a pool size in the environment, or a reader in the environment
    (``RAY_DATA_USE_DATASOURCE_V2``, which Ray reads when ``ray.data`` is imported) or in code
    (``DataContext.use_datasource_v2 = False``). Ray reads the pool size from the environment and the
    reader from the current ``DataContext`` when it plans the read, in this process, so both are set for
    that call only, under a lock.
    """
    import os
    from contextlib import ExitStack

    n_files = sum(1 for f in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                  if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    actors = min(MAX_FOOTER_ACTORS, max(1, -(-n_files // FILES_PER_FOOTER_ACTOR)))
    v1 = (isinstance(filesystem, pafs.LocalFileSystem) and n_files <= FILES_PER_FOOTER_ACTOR
          and READER_V2_ENV not in os.environ)
    with _READER_SWITCH, ExitStack() as stack:
        if FOOTER_ACTORS_ENV not in os.environ:
            os.environ[FOOTER_ACTORS_ENV] = str(actors)
            stack.callback(os.environ.pop, FOOTER_ACTORS_ENV, None)
        ctx = ray.data.DataContext.get_current()
        if v1 and ctx.use_datasource_v2:
            stack.callback(setattr, ctx, "use_datasource_v2", True)
            ctx.use_datasource_v2 = False
        return ray.data.read_parquet(path, filesystem=filesystem)
