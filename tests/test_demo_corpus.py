"""The demo world: determinism, schema, split hygiene, interference, OOD and pre-training hygiene, MC."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from functools import reduce
from itertools import combinations

import pytest

from tclora import demo_corpus as dc
from tclora.data import read_jsonl, validate_record

TRAIN_N, EVAL_N = 300, 40  # the defaults of build_demo_corpus
EVAL_SPLITS = [s for s in dc.SPLITS if s != "train"]


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: dc.generate_split(s, TRAIN_N if s == "train" else EVAL_N, seed=0) for s in dc.SPLITS}


@pytest.fixture(scope="module")
def pretrain_docs() -> list[str]:
    rng = random.Random(0)
    return [dc.pretrain_text(rng) for _ in range(3000)]


def _fixed_parts(task_names) -> set[str]:
    """The wording of every template of the tasks, e.g. "Reverse the words:" or "- words reversed?"."""
    parts = {p.strip() for name in task_names for t in dc.family_of(name).templates for p in t.split("{x}")}
    return {p for p in parts if len(p) >= 4}


def _payloads(source: str, task_name: str) -> list[str]:
    try:
        return [dc.payload_of(source, task_name)]
    except ValueError:
        return []


def _template_of(row: dict) -> str:
    task = dc.family_of(row["task_name"])
    hits = [t for t in task.templates
            if re.fullmatch("({})".format(dc.PAYLOAD_RE).join(map(re.escape, t.split("{x}"))), row["source"])]
    assert len(hits) == 1, (row, hits)  # templates of one task must never be ambiguous
    return hits[0]


def test_generate_split_is_deterministic_in_seed():
    for split in dc.SPLITS:
        assert dc.generate_split(split, 5, seed=3) == dc.generate_split(split, 5, seed=3)
        assert dc.generate_split(split, 5, seed=3) != dc.generate_split(split, 5, seed=4)


def test_task_inventory():
    groups = [dc.TASK_FAMILIES, dc.OOD_TASKS, tuple(dc.META_FAMILIES), dc.COMPOSITION_TASKS]
    names = [n for g in groups for n in g]
    assert len(names) == len(set(names))  # trained, OOD, meta and composition tasks are disjoint
    assert len(dc.TASK_FAMILIES) >= 4 and len(dc.OOD_TASKS) >= 2 and len(dc.COMPOSITION_TASKS) >= 2
    assert set(dc.SKILLS) == set(dc.TASK_FAMILIES) | set(dc.OOD_TASKS) | set(dc.META_FAMILIES)
    for name in names:
        task = dc.family_of(name)
        assert task.name == name and len(task.templates) >= 3
        assert all(t.count("{x}") == 1 for t in task.templates)
    for name in dc.COMPOSITION_TASKS:
        components = dc.family_of(name).components
        assert len(components) == 2 and all(c in dc.TASK_FAMILIES for c in components)
    with pytest.raises(KeyError, match="unknown task_name"):
        dc.family_of("nope")
    with pytest.raises(ValueError, match="split must be one of"):
        dc.generate_split("dev", 1, 0)


# One hand-checked example per skill: a bug in an answer function shows here, not only downstream.
@pytest.mark.parametrize("task,payload,target", [
    ("reverse_words", "box cup pen", "pen cup box"),
    ("sort_words", "box cup arm", "arm box cup"),
    ("first_word", "box cup pen", "box"),
    ("count_words", "box cup pen zip", "4"),
    ("last_word", "box cup pen", "pen"),
    ("upper_words", "box cup pen", "BOX CUP PEN"),
    ("second_word", "box cup pen", "cup"),
    ("copy_words", "box cup pen", "box cup pen"),
    ("drop_first", "box cup pen", "cup pen"),
    ("double_first", "box cup pen", "box box cup pen"),
    ("swap_ends", "box cup pen arm", "arm cup pen box"),
    ("compose_sort_reverse", "box cup arm", "cup box arm"),
    ("compose_sort_first", "box cup arm", "arm"),
])
def test_answer_functions(task, payload, target):
    assert dc.family_of(task).answer(payload) == target
    if task in dc.SKILLS:
        assert dc.notation(task, payload) == f"{task}({payload}) = {target}"


def test_rows_are_valid_and_targets_follow_the_rule(splits):
    extra = {"compose_test": {"components"}, "mc_test": {"choices", "answer"}}
    for split, rows in splits.items():
        for row in rows:
            assert validate_record(row) is None, row
            assert set(row) == {"source", "target", "task_name"} | extra.get(split, set()), row
            for text in (row["source"], row["target"]):
                assert all(32 <= ord(c) <= 126 for c in text) and text == text.strip(), row
            task = dc.family_of(row["task_name"])
            payload = dc.payload_of(row["source"], task.name)
            assert task.answer(payload) == row["target"]
            if split == "compose_test":
                assert row["components"] == list(task.components)
                assert row["target"] == reduce(lambda x, c: dc.SKILLS[c](x), task.components, payload)


def test_per_task_counts_are_exact(splits):
    for split, rows in splits.items():
        n = TRAIN_N if split == "train" else EVAL_N
        assert Counter(r["task_name"] for r in rows) == {t: n for t in dc.SPLIT_TASKS[split]}, split


def test_splits_are_disjoint_by_payload(splits):
    for split, rows in splits.items():
        sources = [r["source"] for r in rows]
        assert len(set(sources)) == len(sources), f"duplicate sources within {split}"
    payloads = {s: {dc.payload_of(r["source"], r["task_name"]) for r in rows} for s, rows in splits.items()}
    assert {dc.split_of(p) for p in payloads["train"]} == {"train"}
    assert {dc.split_of(p) for p in payloads["validation"]} == {"validation"}
    for held_out in ("test", "ood_test", "compose_test", "mc_test"):
        assert {dc.split_of(p) for p in payloads[held_out]} == {"test"}, held_out
        assert not payloads["train"] & payloads[held_out] and not payloads["validation"] & payloads[held_out]


def test_train_is_interleaved_and_uses_every_template(splits):
    train = splits["train"]
    assert len({r["task_name"] for r in train[:20]}) == len(dc.TASK_FAMILIES)  # shuffled, not blocked
    used = defaultdict(set)
    for row in train:
        used[row["task_name"]].add(_template_of(row))
    assert used == {name: set(dc.family_of(name).templates) for name in dc.TASK_FAMILIES}


def test_trained_families_share_one_input_format_and_disagree(splits):
    """Interference: any trained family's payload fits every other's templates; outputs differ.

    Only the instruction tells the model which skill to apply, so adapters trained on different
    families pull the same inputs towards different outputs.
    """
    by_task = defaultdict(list)
    for row in splits["train"]:
        by_task[row["task_name"]].append(dc.payload_of(row["source"], row["task_name"]))
    shapes = {name: {len(p.split()) for p in ps} for name, ps in by_task.items()}
    assert len({frozenset(s) for s in shapes.values()}) == 1, shapes
    for name, ps in by_task.items():
        for payload in ps[:30]:
            for other in dc.TASK_FAMILIES:
                for template in dc.family_of(other).templates:
                    assert dc.payload_of(template.format(x=payload), other) == payload
    pool = [p for ps in by_task.values() for p in ps]
    for a, b in combinations(dc.TASK_FAMILIES, 2):
        disagree = sum(dc.SKILLS[a](p) != dc.SKILLS[b](p) for p in pool) / len(pool)
        assert disagree > 0.9, (a, b, disagree)


def test_ood_templates_and_families_never_occur_in_training_rows(splits):
    train_text = "\n".join(r["source"] + "\n" + r["target"] for r in splits["train"] + splits["validation"])
    assert not {r["task_name"] for r in splits["train"] + splits["validation"]} & set(dc.OOD_TASKS)
    for part in _fixed_parts(dc.OOD_TASKS + dc.COMPOSITION_TASKS):
        assert part not in train_text, part
    for row in splits["ood_test"]:
        assert row["task_name"] in dc.OOD_TASKS


def _notation_match(doc: str) -> tuple[str, str, str] | None:
    """(layout, skill, payload) when ``doc`` is notation in one of ``NOTATIONS``' layouts and its answer is right."""
    for layout in dc.NOTATIONS:
        pattern = re.escape(layout).replace(r"\{s\}", r"(?P<s>\w+)").replace(r"\{x\}", f"(?P<x>{dc.PAYLOAD_RE})")
        if (m := re.fullmatch(pattern.replace(r"\{y\}", "(?P<y>.*)"), doc)) and m["s"] in dc.SKILLS:
            assert m["y"] == dc.SKILLS[m["s"]](m["x"]), doc
            return layout, m["s"], m["x"]
    return None


def test_pretraining_never_sees_instruction_templates_or_evaluation_payloads(pretrain_docs):
    kinds, layouts = Counter(), Counter()
    evaluated = _fixed_parts(dc.TASK_FAMILIES + dc.OOD_TASKS + dc.COMPOSITION_TASKS)
    named = set()
    generic = [re.sub(r"\\\{[nma]\\\}", r"\\w+", re.escape(g)) for g in dc.GENERIC]
    meta_parts = _fixed_parts(dc.META_FAMILIES)
    for doc in pretrain_docs:
        assert not [p for p in evaluated if p in doc], doc
        if found := _notation_match(doc):
            layouts[found[0]] += 1
            named.add(found[1])
            assert dc.split_of(found[2]) == "train", doc
            kinds["notation"] += 1
        elif "\n" in doc:  # a meta skill's instruction
            prompt = doc.split("\n")[0]
            payloads = {p for name in dc.META_FAMILIES for p in _payloads(prompt, name)}
            assert len(payloads) == 1 and dc.split_of(payloads.pop()) == "train", doc
            assert any(p in doc for p in meta_parts), doc
            kinds["instruction"] += 1
        else:
            assert any(re.fullmatch(g, doc) for g in generic), doc  # one generic sentence: no payload
            kinds["generic"] += 1
    # Every skill (trained, OOD and meta) appears in notation; instructions are meta skills only.
    assert named == set(dc.SKILLS)
    assert all(n > 300 for n in kinds.values()), kinds
    assert set(layouts) == set(dc.NOTATIONS) and min(layouts.values()) > 100, layouts


def test_instructions_name_skills_with_tokens_the_base_learnt(pretrain_docs):
    """Each trained and OOD family has a template that names its skill with a word of its notation name
    ("last" of ``last_word``) as the same token, so the instruction's key word is one pre-training taught;
    a capitalised "Last" would be a different token of the case-sensitive word-level vocabulary, one
    no pre-training text contains (an untrained embedding)."""
    learnt = {p for doc in pretrain_docs for p in re.findall(dc.TOKEN_PATTERN, doc)}
    for name in dc.TASK_FAMILIES + dc.OOD_TASKS:
        skill_words = set(name.split("_")) - {"word", "words"}  # "last_word" -> {"last"}
        assert skill_words <= learnt, name
        tokens = [set(re.findall(dc.TOKEN_PATTERN, t)) for t in dc.family_of(name).templates]
        assert any(skill_words & t for t in tokens), (name, dc.family_of(name).templates)


def test_compositions_need_both_skills(splits):
    shortcut = Counter()
    for row in splits["compose_test"]:
        task = dc.family_of(row["task_name"])
        payload = dc.payload_of(row["source"], task.name)
        shortcut[task.name] += row["target"] in {dc.SKILLS[c](payload) for c in task.components}
    assert all(n <= 0.25 * EVAL_N for n in shortcut.values()), shortcut


def test_multiple_choice_rows(splits):
    rows = splits["mc_test"]
    assert {r["task_name"] for r in rows} == set(dc.MC_TASKS)
    for row in rows:
        choices = row["choices"]
        assert len(choices) == len(set(choices)) >= 3 and len(choices) <= dc.MC_CHOICES, row
        assert choices[row["answer"]] == row["target"]
        payload = dc.payload_of(row["source"], row["task_name"])
        # Distractors are what the other skills answer on the same words: picking needs the instruction.
        assert set(choices) <= {dc.SKILLS[s](payload) for s in dc.MC_TASKS}, row
    answers = Counter(r["answer"] for r in rows)
    assert len(answers) == dc.MC_CHOICES and max(answers.values()) < 0.4 * len(rows)  # no positional bias


def test_vocabulary_covers_every_demo_text(splits, pretrain_docs):
    vocab = set(dc.vocabulary())
    texts = pretrain_docs + [t for rows in splits.values() for r in rows
                             for t in [r["source"], r["target"], *r.get("choices", [])]]
    for text in texts:
        assert "".join(p for p in re.findall(dc.TOKEN_PATTERN, text)) == text
        assert set(re.findall(dc.TOKEN_PATTERN, text)) <= vocab, text


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
