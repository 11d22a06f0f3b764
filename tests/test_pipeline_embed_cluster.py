"""Embed + cluster stages on a real local Ray (shared ``ray_session``), smoke size.

One corpus directory holds a JSON Lines file (3 topics x 20 rows + 5 bad lines + a blank line) and a
Parquet file (3 topics x 3 rows + 2 bad rows), so both readers run in the same embed pass.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.io import CorpusError, list_input_files, read_records
from tclora.config import validate

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
    return root


@pytest.fixture(scope="module")
def embedded(ray_session, corpus, tmp_path_factory) -> tuple[Path, Path]:
    from pipelines.embed import run_embed

    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, run_embed(_config(), run_dir, str(corpus))


def test_embed_counts_quarantine_and_schema(embedded):
    _, embed_dir = embedded
    manifest = json.loads((embed_dir / "manifest.json").read_text())
    assert manifest["rows"] == GOOD_JSONL + GOOD_PARQUET and manifest["quarantined"] == 7

    quarantined = [json.loads(line) for line in (embed_dir / "quarantine" / "rows.jsonl").read_text().splitlines()]
    got = {(q["file"], q.get("line", q.get("row")), q["reason"].split(":")[0]) for q in quarantined}
    expected = {("corpus.jsonl", 61 + i, reason.split(":")[0]) for i, (_, reason) in enumerate(BAD_LINES) if reason}
    expected |= {("extra.parquet", 9, "missing field 'target'"), ("extra.parquet", 10, "field 'target' is empty")}
    assert got == expected
    assert all(q["raw"] for q in quarantined)

    table = pq.read_table(embed_dir / "embeddings")
    assert table.column_names == ["row_id", "source", "target", "task_name", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    ids = table.column("row_id").to_pylist()
    assert len(set(ids)) == len(ids) == GOOD_JSONL + GOOD_PARQUET
    assert "corpus.jsonl:1" in ids and "extra.parquet:0" in ids


def test_rerun_is_a_fast_no_op(embedded, corpus):
    from pipelines.embed import run_embed

    run_dir, embed_dir = embedded
    before = (embed_dir / "manifest.json").read_bytes()
    started = time.perf_counter()
    assert run_embed(_config(), run_dir, str(corpus)) == embed_dir
    assert time.perf_counter() - started < 5
    assert (embed_dir / "manifest.json").read_bytes() == before


def _written_ids(cluster_dir: Path) -> list[str]:
    ids = []
    for part in (cluster_dir / "clusters").glob("cluster=*"):
        ids += pq.read_table(part, partitioning=None).column("row_id").to_pylist()
    return ids


def test_cluster_k3_recovers_topics_and_writes_every_row_once(embedded):
    from pipelines.cluster import list_clusters, read_cluster, route_records, run_cluster

    run_dir, embed_dir = embedded
    cluster_dir = run_cluster(_config(), run_dir, embed_dir)
    report = json.loads((cluster_dir / "report.json").read_text())
    assert report["k"] == 3 and report["nmi"] > 0.9 and report["ari"] > 0.9
    all_ids = pq.read_table(embed_dir / "embeddings", columns=["row_id"]).column("row_id").to_pylist()
    written = _written_ids(cluster_dir)
    assert sorted(written) == sorted(all_ids)  # every row exactly once
    sizes = list_clusters(cluster_dir)
    assert sum(sizes.values()) == len(all_ids) and set(sizes) == {0, 1, 2}
    members = read_cluster(cluster_dir, 1).take_all()
    assert len(members) == sizes[1] and set(members[0]) >= {"row_id", "source", "target", "task_name"}
    routed = route_records([{"source": r["source"], "target": r["target"]} for r in members], cluster_dir, _config())
    assert [r["cluster"] for r in routed] == [1] * len(members)  # held-out routing uses the same centroids
    assert (cluster_dir / "centroids.npy").is_file() and (cluster_dir / "cluster_sizes.png").is_file()


def test_changing_k_reclusters_without_reembedding(embedded, corpus):
    from pipelines.cluster import list_clusters, run_cluster
    from pipelines.embed import run_embed

    run_dir, embed_dir = embedded
    embed_manifest = (embed_dir / "manifest.json").read_bytes()
    cfg = _config(k=4, min_cluster_size=23, small_cluster_policy="skip")  # a split topic has < 23 rows
    cluster_dir = run_cluster(cfg, run_dir, embed_dir)
    assert run_embed(cfg, run_dir, str(corpus)) == embed_dir
    assert (embed_dir / "manifest.json").read_bytes() == embed_manifest

    report = json.loads((cluster_dir / "report.json").read_text())
    assert report["k"] == 4 and cluster_dir.name.startswith("k4-")
    skipped = [int(i) for i, j in report["mapping"].items() if j == -1]
    assert report["skipped_rows"] == sum(report["raw_sizes"][str(i)] for i in skipped)
    assert report["skipped_rows"] == list_clusters(cluster_dir).get(-1, 0)
    assert len(_written_ids(cluster_dir)) == GOOD_JSONL + GOOD_PARQUET  # skipped rows are kept, as -1


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
    assert [Path(f.path).name for f in inputs.files] == ["extra.parquet"]
    assert len(list_input_files(str(corpus)).files) == 2  # _SUCCESS is skipped
    records = read_records(str(corpus / "extra.parquet"), validate({}).data)
    assert len(records) == GOOD_PARQUET and records[0]["row_id"] == "extra.parquet:0"


def test_jsonl_reader_keeps_line_numbers_and_json_line_separators():
    import io

    from pipelines.io import Fields, _check, _jsonl_blocks

    text = '{"source": "a\u2028b", "target": "t"}\n\n{"source": "x", "target": 3}\n\xff\n{"source": "last", "target": "u"}'
    data = text.encode("utf-8").replace(b"\xc3\xbf", b"\xff")  # line 4: a raw invalid UTF-8 byte
    [block] = list(_jsonl_blocks(io.BytesIO(data), "f.jsonl"))
    assert block.column("_index").to_pylist() == [1, 3, 4, 5]  # the blank line 2 is counted, not emitted
    good, bad = _check(block, Fields())
    assert [g["row_id"] for g in good] == ["f.jsonl:1", "f.jsonl:5"] and good[0]["source"] == "a\u2028b"
    assert [(b["line"], b["reason"]) for b in bad] == [
        (3, "field 'target' must be a string, got int"), (4, "line is not valid UTF-8")]
