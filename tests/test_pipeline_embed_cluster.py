"""Embed + cluster stages on a real local Ray (shared ``ray_session``), smoke size.

One corpus directory holds a JSON Lines file (3 topics x 20 rows + 5 bad lines + a blank line) and a
Parquet file (3 topics x 3 rows + 2 bad rows), so both readers run in the same embed pass, plus the
awkward inputs of issue #7 in the same pass (one Ray run for all): duplicates, invalid UTF-8 and a
10 MB row (more.jsonl), an empty JSON Lines file, a 0-byte "Parquet" file and two Parquet files whose
schema cannot hold valid rows.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tclora.artifacts import StageResult
from tclora.config import ConfigError, validate
from tclora.corpus import CorpusError, list_input_files, read_records

pytestmark = pytest.mark.ray

TOPICS = {
    "cooking": ["Whisk {n} eggs with sugar, then bake the sponge cake in the oven.",
                "Simmer the tomato soup with garlic and fresh basil for {n} minutes."],
    "football": ["The striker scored {n} goals in the championship final.",
                 "The goalkeeper saved {n} penalties and the team won the cup."],
    "code": ["The Python function raised a KeyError on line {n} of the parser module.",
             "Fix the Python bug on line {n} so that the parser module stops crashing."],
}
BAD_LINES = [  # (line text, reason prefix); lines 61..66 of corpus.jsonl, 62 is blank
    ('{"source": "broken json', "malformed JSON"),
    ("", None),
    (json.dumps({"source": "no target here"}), "missing field 'target'"),
    (json.dumps({"source": "   ", "target": "x"}), "field 'source' is empty"),
    (json.dumps({"source": 7, "target": "x"}), "field 'source' must be a string, got int"),
    (json.dumps({"source": "nul\x00byte", "target": "x"}), "field 'source' contains a NUL byte"),
]
GOOD_JSONL, GOOD_PARQUET = 60, 9
DUPLICATES = 3  # more.jsonl lines 1, 4 and 5: kept and embedded, counted in the manifest
GOOD = GOOD_JSONL + GOOD_PARQUET + DUPLICATES
BIG_SOURCE = "word " * 2_000_000  # 10 MB: over tclora.data.MAX_FIELD_CHARS, quarantined with its size
PARQUET_FOUND = {"no_target.parquet": "found source string, task_name string",
                 "int_source.parquet": "found source int64, target string"}


def _rows(per_topic: int, offset: int) -> list[dict]:
    return [{"source": templates[i % 2].format(n=i + offset), "target": f"{task}-{i}", "task_name": task}
            for task, templates in TOPICS.items() for i in range(per_topic)]


def _config(**cluster):
    return validate({"embed": {"batch_size": 32, "num_actors": 1},
                     "cluster": {"k": 3, "min_cluster_size": 2, **cluster}})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps(r) for r in _rows(20, 2)] + [text for text, _ in BAD_LINES]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    rows = _rows(3, 100) + [{"source": "no target", "target": None, "task_name": "code"},
                            {"source": "empty target", "target": "", "task_name": None}]
    pq.write_table(pa.Table.from_pylist(rows), root / "extra.parquet")
    (root / "_SUCCESS").write_text("")  # marker files are not corpus files

    first_cooking, first_football = lines[0], lines[20]  # corpus.jsonl lines 1 and 21
    more = [first_cooking.encode(),
            b'{"source": "caf\xe9 au lait", "target": "x"}',  # Latin-1 bytes: not UTF-8
            json.dumps({"source": BIG_SOURCE, "target": "big", "task_name": "code"}).encode(),
            first_cooking.encode(), first_football.encode()]
    (root / "more.jsonl").write_bytes(b"\n".join(more) + b"\n")
    (root / "empty.jsonl").write_bytes(b"")
    (root / "empty.parquet").write_bytes(b"")  # what a crashed writer leaves: not Parquet at all
    pq.write_table(pa.table({"source": ["a", "b"], "task_name": ["code", "code"]}), root / "no_target.parquet")
    pq.write_table(pa.table({"source": [1, 2], "target": ["a", "b"]}), root / "int_source.parquet")
    return root


@pytest.fixture(scope="module")
def embedded(ray_session, corpus, tmp_path_factory) -> tuple[Path, Path]:
    from pipelines.embed import run_embed

    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_embed(_config(), run_dir, str(corpus)).dir


def _quarantined(embed_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (embed_dir / "quarantine" / "rows.jsonl").read_text().splitlines()]


def test_embed_counts_quarantine_and_schema(embedded):
    _, embed_dir = embedded
    manifest = json.loads((embed_dir / "manifest.json").read_text())
    assert manifest["rows"] == GOOD and manifest["quarantined"] == 14
    (actor,) = manifest["actors"].values()  # embed.num_actors = 1: where its time went
    assert actor["rows"] == GOOD and actor["load"] > 0 and actor["encode"] > 0
    assert actor["batches"] >= math.ceil(GOOD_JSONL / 32) + 1  # batch_size 32; corpus.jsonl alone needs two
    assert actor["until_done"] >= actor["load"] + actor["encode"]

    quarantined = _quarantined(embed_dir)
    got = {(q["file"], q.get("line", q.get("row")), q["reason"].split(":")[0]) for q in quarantined}
    expected = {("corpus.jsonl", 61 + i, reason.split(":")[0]) for i, (_, reason) in enumerate(BAD_LINES) if reason}
    expected |= {("extra.parquet", 9, "missing field 'target'"), ("extra.parquet", 10, "field 'target' is empty")}
    expected |= {("more.jsonl", 2, "line is not valid UTF-8"),
                 ("more.jsonl", 3, "field 'source' is 10000000 characters (limit 1000000)"),
                 ("empty.parquet", None, "unreadable Parquet file"),
                 ("no_target.parquet", 0, "Parquet schema"), ("no_target.parquet", 1, "Parquet schema"),
                 ("int_source.parquet", 0, "Parquet schema"), ("int_source.parquet", 1, "Parquet schema")}
    assert got == expected
    assert all(q["raw"] for q in quarantined if q["file"] != "empty.parquet")
    assert all(len(q["raw"]) <= 2000 for q in quarantined)  # the 10 MB row is not copied whole

    table = pq.read_table(embed_dir / "embeddings")
    assert table.column_names == ["row_id", "source", "target", "task_name", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    ids = table.column("row_id").to_pylist()
    assert len(set(ids)) == len(ids) == GOOD
    assert "corpus.jsonl:1" in ids and "extra.parquet:0" in ids


def test_bad_parquet_files_are_quarantined_naming_expected_and_found_columns(embedded):
    by_file: dict[str, list[dict]] = {}
    for q in _quarantined(embedded[1]):
        by_file.setdefault(q["file"], []).append(q)
    [empty] = by_file["empty.parquet"]
    assert empty["row"] is None and "0 bytes" in empty["reason"]
    for name, found in PARQUET_FOUND.items():
        assert len(by_file[name]) == 2
        for q in by_file[name]:
            assert "expected string columns 'source', 'target'" in q["reason"] and found in q["reason"]
    assert "no column 'target'" in by_file["no_target.parquet"][0]["reason"]
    assert "column 'source' is int64" in by_file["int_source.parquet"][0]["reason"]


def test_duplicates_are_embedded_and_counted(embedded):
    _, embed_dir = embedded
    manifest = json.loads((embed_dir / "manifest.json").read_text())
    assert manifest["duplicates"] == DUPLICATES
    assert manifest["duplicate_examples"] == ["more.jsonl:1 repeats corpus.jsonl:1",
                                              "more.jsonl:4 repeats corpus.jsonl:1",
                                              "more.jsonl:5 repeats corpus.jsonl:21"]
    ids = set(pq.read_table(embed_dir / "embeddings", columns=["row_id"]).column("row_id").to_pylist())
    assert {"more.jsonl:1", "more.jsonl:4", "more.jsonl:5"} <= ids  # kept: nothing is dropped silently


def test_rerun_is_a_fast_no_op(embedded, corpus):
    from pipelines.embed import run_embed

    run_dir, embed_dir = embedded
    before = (embed_dir / "manifest.json").read_bytes()
    started = time.perf_counter()
    cfg = _config()
    moved = cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"num_actors": 2})})
    assert run_embed(moved, run_dir, str(corpus)) == StageResult(embed_dir, reused=True)  # placement only
    assert time.perf_counter() - started < 5
    assert (embed_dir / "manifest.json").read_bytes() == before


def _written_ids(cluster_dir: Path) -> list[str]:
    ids = []
    for part in (cluster_dir / "clusters").glob("cluster=*"):
        ids += pq.read_table(part, partitioning=None).column("row_id").to_pylist()
    return ids


def test_cluster_k3_recovers_topics_and_writes_every_row_once(embedded):
    from pipelines.cluster import list_clusters, read_cluster, run_cluster
    from tclora.cluster import route_records

    run_dir, embed_dir = embedded
    cluster_dir = run_cluster(_config(), run_dir, embed_dir).dir
    report = json.loads((cluster_dir / "report.json").read_text())
    assert report["k"] == 3 and report["nmi"] > 0.9 and report["ari"] > 0.9
    all_ids = pq.read_table(embed_dir / "embeddings", columns=["row_id"]).column("row_id").to_pylist()
    written = _written_ids(cluster_dir)
    assert sorted(written) == sorted(all_ids)  # every row exactly once
    sizes = list_clusters(cluster_dir)
    assert sum(sizes.values()) == len(all_ids) and set(sizes) == {0, 1, 2}
    members = read_cluster(cluster_dir, 1).to_pylist()
    assert len(members) == sizes[1] and set(members[0]) >= {"row_id", "source", "target", "task_name"}
    held_out = [{"source": r["source"], "target": r["target"]} for r in members]
    routed = route_records(held_out, cluster_dir, _config().embed.model)
    assert [r["cluster"] for r in routed] == [1] * len(members)  # held-out routing uses the same centroids
    assert (cluster_dir / "centroids.npy").is_file() and (cluster_dir / "cluster_sizes.png").is_file()
    assert (cluster_dir / "cluster_pca.png").is_file() and "NMI" in (cluster_dir / "cluster_report.md").read_text()


@pytest.mark.xfail(reason="cluster.k auto (mean silhouette) picks 5 for 3 topics here: each topic has 2 "
                   "templates, and silhouette, Calinski-Harabasz, Davies-Bouldin, the gap statistic and "
                   "subsample stability all score the template level at least as high (issue 17)", strict=False)
def test_k_auto_picks_the_topic_count_by_silhouette(embedded):
    from pipelines.cluster import run_cluster

    run_dir, embed_dir = embedded
    cluster_dir = run_cluster(_config(k="auto", k_range=(2, 6)), run_dir, embed_dir).dir
    report = json.loads((cluster_dir / "report.json").read_text())
    kmeans = json.loads((cluster_dir / "kmeans.json").read_text())
    assert report["k_auto"] and report["k"] == 3 and sorted(kmeans["silhouette"], key=int) == ["2", "3", "4", "5", "6"]
    assert max(kmeans["silhouette"], key=kmeans["silhouette"].get) == "3" and report["nmi"] > 0.9
    assert cluster_dir.name.startswith("kauto-") and (cluster_dir / "cluster_k_silhouette.png").is_file()
    assert "k chosen automatically: 3" in (cluster_dir / "cluster_report.md").read_text()


def test_changing_k_reclusters_without_reembedding(embedded, corpus):
    from pipelines.cluster import list_clusters, run_cluster
    from pipelines.embed import run_embed

    run_dir, embed_dir = embedded
    embed_manifest = (embed_dir / "manifest.json").read_bytes()
    cfg = _config(k=4, min_cluster_size=23, small_cluster_policy="skip")  # a split topic has < 23 rows
    cluster_dir = run_cluster(cfg, run_dir, embed_dir).dir
    assert run_embed(cfg, run_dir, str(corpus)) == StageResult(embed_dir, reused=True)
    assert (embed_dir / "manifest.json").read_bytes() == embed_manifest

    report = json.loads((cluster_dir / "report.json").read_text())
    assert report["k"] == 4 and cluster_dir.name.startswith("k4-")
    skipped = [int(i) for i, j in report["mapping"].items() if j == -1]
    assert report["skipped_rows"] == sum(report["raw_sizes"][str(i)] for i in skipped)
    assert report["skipped_rows"] == list_clusters(cluster_dir).get(-1, 0)
    assert len(_written_ids(cluster_dir)) == GOOD  # skipped rows are kept, as -1


def test_k_above_the_valid_row_count_fails_before_clustering(embedded, corpus, monkeypatch, tmp_path):
    from transformers import LlamaConfig

    import pipelines.run as run_module
    from pipelines.cluster import run_cluster

    run_dir, embed_dir = embedded
    message = rf"cluster\.k=500 is more than the {GOOD} valid rows.*--set cluster\.k={GOOD}"
    with pytest.raises(ConfigError, match=message):  # the stage alone (python -m pipelines.cluster)
        run_cluster(_config(k=500), run_dir, embed_dir)
    assert not list((run_dir / "cluster").glob("k500-*"))

    # The driver: after the embed stage counted the rows, before the cluster stage starts.
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64).save_pretrained(tmp_path / "model")  # config only: all preflight reads
    monkeypatch.setattr(run_module, "run_embed", lambda cfg, run_dir: StageResult(embed_dir, reused=True))
    monkeypatch.setattr(run_module, "run_cluster", lambda *a: pytest.fail("clustering started"))
    cfg = validate({"run": {"dir": str(tmp_path / "run")}, "data": {"path": str(corpus)}, "cluster": {"k": 500},
                    "model": {"name_or_path": str(tmp_path / "model")}})
    with pytest.raises(ConfigError, match=message):
        run_module.run(cfg)


def test_all_bad_corpus_stops_with_one_clear_error(ray_session, tmp_path):
    from pipelines.embed import run_embed

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": 1, "target": "x"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*no valid rows.*bad\.jsonl:1"):
        run_embed(_config(), tmp_path / "run", str(bad))
    assert not (tmp_path / "run" / "embed").exists()


def test_missing_path_is_named(tmp_path):
    from pipelines.embed import run_embed

    with pytest.raises(CorpusError, match="nope.jsonl.*no such file"):
        run_embed(_config(), tmp_path, str(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="no .*files found"):
        list_input_files(str(tmp_path))


def test_glob_listing_and_local_reader(corpus):
    inputs = list_input_files(str(corpus / "*.parquet"))
    assert [Path(f.path).name for f in inputs.files] == [
        "empty.parquet", "extra.parquet", "int_source.parquet", "no_target.parquet"]
    assert len(list_input_files(str(corpus)).files) == 7  # _SUCCESS is skipped
    records = read_records(str(corpus / "extra.parquet"), validate({}).data)
    assert len(records) == GOOD_PARQUET and records[0]["row_id"] == "extra.parquet:0"
    # The local reader (held-out splits) shares the readers: same rows, no crash on the odd files.
    assert len(read_records(str(corpus), validate({}).data)) == GOOD


def test_jsonl_reader_keeps_line_numbers_and_json_line_separators():
    import io

    from tclora.corpus import Fields, check_rows, jsonl_blocks

    text = ('{"source": "a\u2028b", "target": "t"}\n\n{"source": "x", "target": 3}\n\xff\n'
            '{"source": "last", "target": "u"}')
    data = text.encode("utf-8").replace(b"\xc3\xbf", b"\xff")  # line 4: a raw invalid UTF-8 byte
    [block] = list(jsonl_blocks(io.BytesIO(data), "f.jsonl"))
    assert block.column("_index").to_pylist() == [1, 3, 4, 5]  # the blank line 2 is counted, not emitted
    good, bad = check_rows(block, Fields())
    assert [g["row_id"] for g in good] == ["f.jsonl:1", "f.jsonl:5"] and good[0]["source"] == "a\u2028b"
    assert [(b["line"], b["reason"]) for b in bad] == [
        (3, "field 'target' must be a string, got int"), (4, "line is not valid UTF-8")]


def test_actors_take_blocks_of_at_most_batch_size_rows(ray_session, corpus):
    """A read task's block holds its whole file (66 lines of corpus.jsonl here); one block goes to one
    actor, so the pool gets blocks of embed.batch_size rows, every valid row exactly once."""
    from pipelines.embed import actor_blocks
    from pipelines.io import read_corpus
    from tclora.corpus import Fields

    blocks = list(actor_blocks(read_corpus(list_input_files(str(corpus)), Fields()), Fields(), 16)
                  .iter_batches(batch_size=None, batch_format="pyarrow"))  # batch_size=None: whole blocks
    assert max(b.num_rows for b in blocks) <= 16
    ids = [i for b in blocks for i in b.column("row_id").to_pylist()]
    assert len(ids) == len(set(ids)) == GOOD
    assert len(blocks) >= math.ceil(GOOD_JSONL / 16)


def test_auto_pool_size_fills_the_gpus_or_one_actor_per_cpu_and_8k_rows():
    from pipelines.embed import pool_size

    assert pool_size(3, 0.0, 10, 2048, {"CPU": 2}) == 3  # a number is taken as given
    assert pool_size("auto", 1.0, 10**6, 2048, {"CPU": 16, "GPU": 4}) == 4  # one per GPU
    assert pool_size("auto", 0.5, 10**6, 2048, {"CPU": 16, "GPU": 4}) == 8
    assert pool_size("auto", 1.0, 1_200, 2048, {"CPU": 16, "GPU": 8}) == 1  # one block: one actor can work
    assert pool_size("auto", 1.0, 10**6, 2048, {"CPU": 16}) == 1  # GPUs asked for but none up yet (autoscaler)
    assert pool_size("auto", 0.0, 100_000, 2048, {"CPU": 2}) == 2  # 2 cores, 50k rows each
    assert pool_size("auto", 0.0, 16_000, 2048, {"CPU": 2}) == 2  # 8k rows each
    assert pool_size("auto", 0.0, 15_999, 2048, {"CPU": 2}) == 1  # the second actor's model load would not pay off
    assert pool_size("auto", 0.0, 1_200, 2048, {"CPU": 2}) == 1  # the demo
    assert pool_size("auto", 0.0, 10_000_000, 2048, {"CPU": 16}) == 16
    assert pool_size("auto", 0.0, 100_000, 50_000, {"CPU": 16}) == 2  # 12 by rows, but only 2 blocks
    assert pool_size("auto", 0.0, 0, 2048, {"CPU": 16}) == 1


def test_embed_num_actors_is_a_positive_count_or_auto():
    assert validate({}).embed.num_actors == "auto"
    assert validate({"embed": {"num_actors": 2}}).embed.num_actors == 2
    for bad in (0, "many"):
        with pytest.raises(ConfigError, match=r"embed\.num_actors"):
            validate({"embed": {"num_actors": bad}})


def test_embedding_actors_leave_a_cpu_for_reads_and_writes():
    from pipelines.embed import actor_cpus

    assert actor_cpus(1, 8) == 1.0 and actor_cpus(7, 8) == 1.0  # room to spare: a whole CPU each
    assert actor_cpus(2, 2) == 0.5  # 2 actors on 2 CPUs hung at "Read: 0/1": now they share one
    assert actor_cpus(4, 4) * 4 == 3  # all but one CPU, whatever the pool size
    assert actor_cpus(1, 1) == 0.5  # a 1-CPU Ray still schedules a read beside the actor


def test_read_parquet_picks_the_reader_and_footer_pool_by_file_count_and_reads_every_row(ray_session, tmp_path,
                                                                                        monkeypatch):
    import os

    import pyarrow.fs as pafs

    from pipelines import io

    seen = []  # (footer actors, V2 reader) as Ray sees them when it plans the read
    real, ctx = io.ray.data.read_parquet, io.ray.data.DataContext.get_current()
    monkeypatch.setattr(io.ray.data, "read_parquet", lambda *a, **kw: seen.append(
        (os.environ.get(io.FOOTER_ACTORS_ENV), ctx.use_datasource_v2)) or real(*a, **kw))
    monkeypatch.delenv(io.READER_V2_ENV, raising=False)  # Ray's defaults, whatever this machine sets
    monkeypatch.delenv(io.FOOTER_ACTORS_ENV, raising=False)
    monkeypatch.setattr(ctx, "use_datasource_v2", True)
    many, few = tmp_path / "many", tmp_path / "few"
    many.mkdir()
    few.mkdir()
    for i in range(11):  # 11 files: the V2 reader with ceil(11 / 10) = 2 footer readers, not Ray's default 32
        pq.write_table(pa.table({"x": [i, i + 100]}), many / f"part-{i:02d}.parquet")
    for i in range(10):  # 10 local files: the V1 reader (footers read here, no actor)
        pq.write_table(pa.table({"x": [i, i + 100]}), few / f"part-{i:02d}.parquet")
    ds = io.read_parquet(str(many), pafs.LocalFileSystem())
    assert sorted(r["x"] for r in ds.take_all()) == [*range(11), *range(100, 111)]
    ds = io.read_parquet(str(few), pafs.LocalFileSystem())
    assert sorted(r["x"] for r in ds.take_all()) == [*range(10), *range(100, 110)]
    # Any other filesystem (an object store; here the same files through a SubTreeFileSystem): V2.
    ds = io.read_parquet("few", pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()))
    assert sorted(r["x"] for r in ds.take_all()) == [*range(10), *range(100, 110)]
    assert seen == [("2", True), ("1", False), ("1", True)]
    assert io.FOOTER_ACTORS_ENV not in os.environ and ctx.use_datasource_v2  # both set for that call only

    # Restored when Ray raises, too.
    monkeypatch.setattr(io.ray.data, "read_parquet", lambda *a, **kw: seen.append(ctx.use_datasource_v2) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        io.read_parquet(str(few), pafs.LocalFileSystem())
    assert seen[-1] is False and ctx.use_datasource_v2 and io.FOOTER_ACTORS_ENV not in os.environ

    # The user's own choices win: a pool size and a reader in the environment, or the V1 reader in code.
    monkeypatch.setattr(io.ray.data, "read_parquet", lambda *a, **kw: seen.append(
        (os.environ.get(io.FOOTER_ACTORS_ENV), ctx.use_datasource_v2)))
    monkeypatch.setenv(io.FOOTER_ACTORS_ENV, "5")
    monkeypatch.setenv(io.READER_V2_ENV, "1")
    io.read_parquet(str(few), pafs.LocalFileSystem())
    assert seen[-1] == ("5", True) and os.environ[io.FOOTER_ACTORS_ENV] == "5"
    monkeypatch.delenv(io.READER_V2_ENV)
    ctx.use_datasource_v2 = False
    io.read_parquet(str(many), pafs.LocalFileSystem())
    assert seen[-1] == ("5", False) and not ctx.use_datasource_v2


def test_rows_with_non_finite_embeddings_are_quarantined(ray_session, tmp_path):
    """A model that returns NaN for some rows (here: one token's embedding row set to NaN) must not hand
    them to k-means: they are quarantined with file, line and reason, and the other rows proceed."""
    import torch
    from safetensors.torch import load_file, save_file

    from pipelines.embed import run_embed
    from tclora.embed import resolve_embedding_model

    packaged = Path(resolve_embedding_model("all-MiniLM-L6-v2"))
    model = tmp_path / "poisoned-minilm"
    model.mkdir()
    for item in packaged.iterdir():
        if item.name != "model.safetensors":
            (model / item.name).symlink_to(item)
    weights = load_file(str(packaged / "model.safetensors"))
    token = (packaged / "vocab.txt").read_text().splitlines().index("poison")
    weights["embeddings.word_embeddings.weight"][token] = torch.nan
    save_file(weights, str(model / "model.safetensors"))

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [{"source": f"clean sentence number {i}", "target": "x"} for i in range(4)]
    rows.insert(2, {"source": "a drop of poison in the well", "target": "y"})  # line 3
    (corpus / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = validate({"embed": {"batch_size": 32, "num_actors": 1, "model": str(model)}})

    embed_dir = run_embed(cfg, tmp_path / "run", str(corpus)).dir
    assert _quarantined(embed_dir) == [{"file": "a.jsonl", "line": 3, "raw": "a drop of poison in the well",
                                        "reason": "embedding is not finite (NaN): k-means cannot place it"}]
    manifest = json.loads((embed_dir / "manifest.json").read_text())
    assert manifest["rows"] == 4 and manifest["quarantined"] == 1
    table = pq.read_table(embed_dir / "embeddings")
    assert sorted(table.column("row_id").to_pylist()) == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:4", "a.jsonl:5"]
    assert all(all(map(math.isfinite, v)) for v in table.column("embedding").to_pylist())
    # Held-out records are routed in-process: a non-finite one is named, never put in cluster 0.
    from tclora.cluster import route_records

    (tmp_path / "clusters").mkdir()
    np.save(tmp_path / "clusters" / "centroids.npy", np.eye(2, 384, dtype=np.float32))
    (tmp_path / "clusters" / "kmeans.json").write_text(json.dumps({"mapping": {"0": 0, "1": 1}}))
    held_out = [{"row_id": "eval.jsonl:1", "source": "clean"}, {"row_id": "eval.jsonl:2", "source": "poison ivy"}]
    with pytest.raises(ValueError, match=r"held-out record eval.jsonl:2: embedding is not finite"):
        route_records(held_out, tmp_path / "clusters", str(model))


def test_a_row_reported_twice_is_quarantined_once(ray_session):
    """A block whose embedding actor dies after reporting its non-finite rows is embedded again by Ray Data
    and reports them again: the stage still counts and writes each row once."""
    from pipelines.embed import ActorReports

    def entry(line: int, file: str = "a.jsonl") -> dict:
        return {"file": file, "line": line, "reason": "embedding is not finite (NaN)", "raw": f"row {line}"}

    reports = ActorReports.remote()
    ray_session.get(reports.quarantine.remote([entry(3), entry(7)]))  # the first attempt, then the actor died
    ray_session.get(reports.quarantine.remote([entry(3), entry(7), entry(3, "b.jsonl")]))  # the retry, another file
    entries, _ = ray_session.get(reports.take.remote())
    assert sorted((e["file"], e["line"]) for e in entries) == [("a.jsonl", 3), ("a.jsonl", 7), ("b.jsonl", 3)]
