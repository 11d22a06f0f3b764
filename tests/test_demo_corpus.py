"""The demo corpus: determinism, schema, split hygiene, shared formats, composition, idempotent build."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from functools import reduce
from itertools import combinations

import pytest

from tclora import demo_corpus as dc
from tclora.data import read_jsonl, validate_record

TRAIN_N, EVAL_N = 300, 40  # the defaults of build_demo_corpus: what the demo actually trains on


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: dc.generate_split(s, TRAIN_N if s == "train" else EVAL_N, seed=0) for s in dc.SPLITS}


def _template_of(row: dict) -> str:
    task = dc.family_of(row["task_name"])
    pattern = dc.PAYLOADS[task.fmt][1]
    hits = [t for t in task.templates
            if re.fullmatch("({})".format(pattern).join(map(re.escape, t.split("{x}"))), row["source"])]
    assert len(hits) == 1, (row, hits)  # templates of one task must never be ambiguous
    return hits[0]


def test_generate_split_is_deterministic_in_seed():
    assert dc.generate_split("train", 20, seed=3) == dc.generate_split("train", 20, seed=3)
    assert dc.generate_split("compose_test", 5, seed=3) == dc.generate_split("compose_test", 5, seed=3)
    assert dc.generate_split("train", 20, seed=3) != dc.generate_split("train", 20, seed=4)
    assert dc.generate_split("test", 20, seed=3) != dc.generate_split("test", 20, seed=4)


def test_task_inventory():
    assert len(dc.TASK_FAMILIES) >= 8 and len(set(dc.TASK_FAMILIES)) == len(dc.TASK_FAMILIES)
    assert len(dc.COMPOSITION_TASKS) >= 2
    for name in dc.TASK_FAMILIES + dc.COMPOSITION_TASKS:
        task = dc.family_of(name)
        assert task.name == name and len(task.templates) >= 3
        assert all(t.count("{x}") == 1 for t in task.templates)
    for name in dc.COMPOSITION_TASKS:
        assert name.startswith("compose_")
        components = dc.family_of(name).components
        assert len(components) == 2 and all(c in dc.TASK_FAMILIES for c in components)
    with pytest.raises(KeyError, match="unknown task_name"):
        dc.family_of("nope")
    with pytest.raises(ValueError, match="split must be one of"):
        dc.generate_split("dev", 1, 0)


# One hand-checked example per family: a bug in an answer function shows here, not only downstream.
@pytest.mark.parametrize("task,payload,target", [
    ("reverse_words", "box cup pen", "pen cup box"),
    ("sort_words", "box cup arm", "arm box cup"),
    ("first_word", "box cup pen", "box"),
    ("count_words", "box cup pen zip", "4"),
    ("upper_words", "box cup pen", "BOX CUP PEN"),
    ("copy_words", "box cup pen", "box cup pen"),
    ("max_num", "3 7 2", "7"),
    ("min_num", "3 7 2 1 9", "1"),
    ("count_nums", "3 7 2", "3"),
    ("reverse_chars", "plonk", "knolp"),
    ("lookup", "cow duck", "moo quack"),
    ("compose_upper_first", "box cup pen", "BOX"),
    ("compose_sort_reverse", "box cup arm", "cup box arm"),
    ("compose_first_backwards", "box cup pen", "xob"),
])
def test_answer_functions(task, payload, target):
    assert dc.family_of(task).answer(payload) == target


def test_rows_are_valid_short_printable(splits):
    for split, rows in splits.items():
        for row in rows:
            assert validate_record(row) is None, row
            assert set(row) == ({"source", "target", "task_name", "components"} if split == "compose_test"
                                else {"source", "target", "task_name"})
            for text in (row["source"], row["target"]):
                assert all(32 <= ord(c) <= 126 for c in text), row  # implies no "\n" anywhere
                assert text == text.strip(), row
            assert len(row["source"]) <= dc.MAX_SOURCE_CHARS and len(row["target"]) <= dc.MAX_TARGET_CHARS
            # The target is exactly what the task's rule gives for the payload the source wraps.
            task = dc.family_of(row["task_name"])
            assert task.answer(dc.payload_of(row["source"], task.name)) == row["target"]


def test_per_task_counts_are_exact(splits):
    for split, rows in splits.items():
        tasks = dc.COMPOSITION_TASKS if split == "compose_test" else dc.TASK_FAMILIES
        n = TRAIN_N if split == "train" else EVAL_N
        assert Counter(r["task_name"] for r in rows) == {t: n for t in tasks}, split


def test_splits_are_disjoint(splits):
    sources = {s: [r["source"] for r in rows] for s, rows in splits.items()}
    for s, srcs in sources.items():
        assert len(set(srcs)) == len(srcs), f"duplicate sources within {s}"
    for a, b in combinations(dc.SPLITS, 2):
        assert not set(sources[a]) & set(sources[b]), (a, b)
    # Stronger: eval payloads were never seen in train under any instruction.
    payloads = {s: {dc.payload_of(r["source"], r["task_name"]) for r in rows} for s, rows in splits.items()}
    for held_out in ("validation", "test", "compose_test"):
        assert not payloads["train"] & payloads[held_out], held_out


def test_train_is_interleaved_and_uses_every_template(splits):
    train = splits["train"]
    assert len({r["task_name"] for r in train[:50]}) >= len(dc.TASK_FAMILIES) - 2  # shuffled, not blocked
    used = defaultdict(set)
    for row in train:
        used[row["task_name"]].add(_template_of(row))
    for name in dc.TASK_FAMILIES:
        assert used[name] == set(dc.family_of(name).templates), name


def test_shared_input_formats_create_interference(splits):
    """Formal check: families of a group have interchangeable payloads and differ only in instruction.

    For every train payload of one family, wrapping it in any other group member's template parses back
    to the same payload; the payload shapes (item counts) match across the group; and the group members
    disagree on most payloads, so only the instruction can tell the model what to output.
    """
    groups = defaultdict(list)
    for name in dc.TASK_FAMILIES:
        groups[dc.family_of(name).fmt].append(name)
    shared = {fmt: names for fmt, names in groups.items() if len(names) >= 2}
    assert len(shared) >= 2, groups
    by_task = defaultdict(list)
    for row in splits["train"]:
        by_task[row["task_name"]].append(dc.payload_of(row["source"], row["task_name"]))
    for fmt, names in shared.items():
        shapes = {name: {len(p.split()) for p in by_task[name]} for name in names}
        assert len({frozenset(s) for s in shapes.values()}) == 1, shapes
        for name in names:
            for payload in by_task[name][:50]:
                for other in names:
                    for template in dc.family_of(other).templates:
                        assert dc.payload_of(template.format(x=payload), other) == payload
        pool = [p for name in names for p in by_task[name]]
        for a, b in combinations(names, 2):
            fa, fb = dc.family_of(a).answer, dc.family_of(b).answer
            disagree = sum(fa(p) != fb(p) for p in pool) / len(pool)
            assert disagree > 0.5, (fmt, a, b, disagree)
    # Different groups really are different formats: a word list is not a digit list.
    for fa, fb in combinations(shared, 2):
        assert not re.fullmatch(dc.PAYLOADS[fb][1], by_task[shared[fa][0]][0])


def test_composition_targets_compose_component_functions(splits):
    shortcut = Counter()
    for row in splits["compose_test"]:
        components = dc.family_of(row["task_name"]).components
        assert row["components"] == list(components)
        payload = dc.payload_of(row["source"], row["task_name"])
        expected = reduce(lambda x, c: dc.FAMILIES[c].answer(x), components, payload)
        assert row["target"] == expected, row
        shortcut[row["task_name"]] += expected in {dc.FAMILIES[c].answer(payload) for c in components}
    # Each composition really needs both skills: one component alone rarely gives the answer.
    assert all(n <= 0.2 * EVAL_N for n in shortcut.values()), shortcut


def test_lookup_keys_in_eval_all_appear_in_train(splits):
    def keys(split: str) -> set[str]:
        return {a for r in splits[split] if r["task_name"] == "lookup"
                for a in dc.payload_of(r["source"], "lookup").split()}

    assert keys("train") == set(dc.SOUNDS)
    assert keys("validation") | keys("test") <= keys("train")


def test_build_is_byte_identical_and_idempotent(tmp_path):
    kwargs = dict(train_per_task=30, eval_per_task=10, seed=1)
    paths = dc.build_demo_corpus(tmp_path / "a", **kwargs)
    again = dc.build_demo_corpus(tmp_path / "b", **kwargs)
    assert set(paths) == set(dc.SPLITS)
    for split in dc.SPLITS:
        assert paths[split].read_bytes() == again[split].read_bytes()
        rows = read_jsonl(paths[split])
        assert rows == dc.generate_split(split, 30 if split == "train" else 10, seed=1)
    meta = json.loads((tmp_path / "a" / "corpus.json").read_text())
    assert meta["params"]["seed"] == 1 and meta["counts"]["train"] == 30 * len(dc.TASK_FAMILIES)

    files = sorted((tmp_path / "a").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert dc.build_demo_corpus(tmp_path / "a", **kwargs) == paths
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "a").iterdir())} == mtimes

    # Other parameters rebuild in place; no temporary directories are left behind.
    dc.build_demo_corpus(tmp_path / "a", **{**kwargs, "seed": 2})
    assert json.loads((tmp_path / "a" / "corpus.json").read_text())["params"]["seed"] == 2
    assert paths["train"].read_bytes() != again["train"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
