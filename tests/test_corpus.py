"""Corpus files from other tools (Ray-free readers and validation): byte-order marks, line endings, and
text that is not valid Unicode, in the functions the embed stage maps over blocks and in read_records."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest

from tclora.config import DataSection
from tclora.corpus import Fields, check_rows, clean_batch, jsonl_blocks, read_records, scan_batch

BOM = b"\xef\xbb\xbf"
ROWS = [{"source": f"s{i}", "target": f"t{i}"} for i in range(3)]


class _Trickle(io.RawIOBase):
    """A stream that returns at most ``n`` bytes per read, as a slow network or gzip stream may."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n = data, n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        out, self.data = self.data[: self.n], self.data[self.n :]
        return out


def _lines(rows, end=b"\n", final=True) -> bytes:
    body = end.join(json.dumps(r).encode() for r in rows)
    return body + end if final else body


def _read(data: bytes, read_size: int | None = None) -> tuple[list[dict], list[dict]]:
    stream = io.BytesIO(data) if read_size is None else _Trickle(data, read_size)
    good, bad = [], []
    for block in jsonl_blocks(stream, "f.jsonl"):
        ok, rejected = check_rows(block, Fields())
        good += ok
        bad += rejected
    return good, bad


@pytest.mark.parametrize("end,final", [(b"\n", True), (b"\r\n", True), (b"\n", False), (b"\r\n", False)])
@pytest.mark.parametrize("read_size", [None, 1, 2])  # 1 and 2: the BOM arrives split over reads
def test_bom_crlf_and_missing_final_newline_are_accepted(end, final, read_size):
    good, bad = _read(BOM + _lines(ROWS, end, final), read_size)
    assert bad == []
    assert [(g["row_id"], g["source"], g["target"]) for g in good] == [
        ("f.jsonl:1", "s0", "t0"), ("f.jsonl:2", "s1", "t1"), ("f.jsonl:3", "s2", "t2")]


def test_a_bom_inside_the_file_is_still_a_bad_line():
    data = _lines(ROWS[:1]) + BOM + _lines(ROWS[1:])  # two files concatenated, each with its BOM
    good, bad = _read(data)
    assert [g["row_id"] for g in good] == ["f.jsonl:1", "f.jsonl:3"]
    assert [(b["line"], b["reason"].split(":")[0]) for b in bad] == [(2, "malformed JSON")]


SURROGATES = [  # (line text, the field and code point the reason must name)
    (r'{"source": "broken emoji \ud83d", "target": "x"}', "field 'source'", "U+D83D"),
    (r'{"source": "ok", "target": "\udc00 low half"}', "field 'target'", "U+DC00"),
    (r'{"source": "ok", "target": "x", "task_name": "t\ud800"}', "field 'task_name'", "U+D800"),
]
PAIRED = r'{"source": "a whole emoji \ud83d\ude00", "target": "x"}'  # a valid pair: one code point


def _surrogate_file() -> bytes:
    lines = [json.dumps(ROWS[0])] + [text for text, _, _ in SURROGATES] + [PAIRED]
    return "\n".join(lines).encode() + b"\n"


def test_unpaired_surrogates_are_quarantined_with_file_line_and_reason():
    [block] = list(jsonl_blocks(io.BytesIO(_surrogate_file()), "f.jsonl"))
    good, bad = check_rows(block, Fields())
    assert [g["row_id"] for g in good] == ["f.jsonl:1", "f.jsonl:5"] and good[1]["source"].endswith("\U0001F600")
    assert [b["line"] for b in bad] == [2, 3, 4]
    for entry, (_, field, code_point) in zip(bad, SURROGATES):
        assert entry["file"] == "f.jsonl" and entry["reason"].startswith(f"{field} is not valid Unicode")
        assert code_point in entry["reason"]
    # The map_batches functions of the embed stage: Arrow encoded the surrogate and raised here before.
    assert clean_batch(block, Fields()).column("row_id").to_pylist() == ["f.jsonl:1", "f.jsonl:5"]
    scanned = scan_batch(block, Fields(), {"f.jsonl": 0})
    assert [b["line"] for b in json.loads(scanned.column("bad")[0].as_py())] == [2, 3, 4]
    pa.table({"x": [json.dumps(bad, ensure_ascii=False)]})  # the quarantine entries themselves encode


def test_read_records_skips_bom_and_surrogates_in_evaluation_files(tmp_path, caplog):
    (tmp_path / "eval.jsonl").write_bytes(BOM + _surrogate_file())
    records = read_records(str(tmp_path / "eval.jsonl"), DataSection())
    assert [r["row_id"] for r in records] == ["eval.jsonl:1", "eval.jsonl:5"]
    assert "3 invalid rows left out" in caplog.text and "not valid Unicode" in caplog.text
