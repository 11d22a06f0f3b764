"""Record validation and the small-file JSON Lines reader (tclora.data)."""

from __future__ import annotations

import json

from tclora.data import read_jsonl, validate_record


def test_text_that_is_not_valid_unicode_is_named():
    row = json.loads(r'{"source": "cut emoji \ud83d", "target": "x"}')  # Python keeps the lone surrogate
    assert validate_record(row) == ("field 'source' is not valid Unicode: unpaired surrogate U+D83D at character 10 "
                                    r"(an escape like \ud83d without its pair)")
    assert validate_record(json.loads(r'{"source": "whole \ud83d\ude00", "target": "x"}')) is None


def test_read_jsonl_skips_a_byte_order_mark(tmp_path):
    (tmp_path / "split.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\r\n\r\n{"a": 2}')  # CRLF, no final newline
    assert read_jsonl(tmp_path / "split.jsonl") == [{"a": 1}, {"a": 2}]
