"""The embedded offline demo world: skills in the base, instructions in the adapters.

Real LLM adapters nudge a base that already has the skill. The demo copies that shape (DESIGN.md,
"Merging in the regime it is for"):

- The demo base (``tclora.demo_base``) is pre-trained on :func:`pretrain_text`: every skill in a plain
  notation of its own (``reverse_words(box cup pen) = pen cup box``, ``box cup pen | reverse_words = pen
  cup box`` and two more layouts: :data:`NOTATIONS`), instruction-style text for the
  *meta* skills only (so following an instruction is itself a skill the base has), and generic text.
- The instruction corpus, what the adapters train on, asks for the *trained* families' skills in
  natural-language templates the base has never seen. An adapter only maps its wording onto a skill.
- Out-of-domain zero-shot (``ood_test``): families the base knows in notation that no adapter trains
  on, asked with templates no training row and no pre-training text contains (the analogue of
  TC-LoRA's ARC/BoolQ suite).

Trained families (one example each), all on the same input format, so only the instruction says what
to output (interference, pinned by tests):

    reverse_words  "reverse the words: box cup pen"  -> "pen cup box"
    sort_words     "sort the words: box cup arm"     -> "arm box cup"
    first_word     "first word of: box cup pen"      -> "box"
    count_words    "how many words? box cup pen"     -> "3"

Templates are lower case so that the word naming a skill ("reverse", "last", "upper") is the token the
base learnt in that skill's notation (``reverse_words(...)``). The base's tokenizer is word-level and
case-sensitive, so "Reverse" would be a token no pre-training text contains: an untrained embedding, where
a real LLM knows "Reverse" and "reverse" alike. With capitalised templates the best merge kept 73% of the
routed adapters' gain in domain (LoRI-S, ``train.merge_aware`` 0.1, 3 seeds); in lower case 93%, and the
routed adapters rose from 0.865 to 0.935 test exact match (issue 12, ``bench_merge_quality``).

Out-of-domain families: last_word, upper_words, second_word. Meta skills (pre-training instructions
only): copy_words, drop_first, double_first, swap_ends.

Splits (``SPLITS``): ``train``; ``validation`` (for selection only: merge λ tuning); ``test``
(in-domain); ``ood_test``; ``compose_test`` (two trained skills chained, ``components`` in application
order); ``mc_test`` (multiple choice: ``choices`` and ``answer``, the index of the right choice; the
wrong choices are what the *other* skills answer on the same words, scored by length-normalised NLL
with ``evaluate.choice_accuracy``). Splits are disjoint by *payload* (the word list a template wraps):
a payload's split is a fixed, seed-independent hash of it, so pre-training (train payloads only) and
instruction training never see an evaluation payload.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tclora.artifacts import is_complete, stage_dir
from tclora.data import read_jsonl, write_jsonl

SPLITS = ("train", "validation", "test", "ood_test", "compose_test", "mc_test")
FILES = {split: f"{split}.jsonl" for split in SPLITS}
# What a demo run reports (data.eval_paths), headline first; mc_test is scored by its choices' likelihood.
EVAL_SPLITS = ("test", "ood_test", "compose_test", "mc_test")
FORMAT_VERSION = 3  # bump when generation changes, so cached corpora are rebuilt
MC_CHOICES = 4

# Three-letter words: five of them plus spaces is 19 characters. Upper-cased they are separate tokens
# of the demo base's word-level vocabulary (``vocabulary``).
WORDS = "arm bag box cup dot fan gem hat jam key kit map mop mug pen pot rug sun tin van".split()
PAYLOAD_RE = r"[a-z]{3}(?: [a-z]{3}){2,4}"


def _w(x: str) -> list[str]:
    return x.split()


# Every skill the base learns in notation: name -> answer function on a payload.
SKILLS: dict[str, Callable[[str], str]] = {
    "reverse_words": lambda x: " ".join(reversed(_w(x))),
    "sort_words": lambda x: " ".join(sorted(_w(x))),
    "first_word": lambda x: _w(x)[0],
    "count_words": lambda x: str(len(_w(x))),
    "last_word": lambda x: _w(x)[-1],
    "upper_words": str.upper,
    "second_word": lambda x: _w(x)[1],
    "copy_words": lambda x: x,
    "drop_first": lambda x: " ".join(_w(x)[1:]),
    "double_first": lambda x: f"{_w(x)[0]} {x}",
    "swap_ends": lambda x: " ".join([_w(x)[-1], *_w(x)[1:-1], _w(x)[0]]),
}


@dataclass(frozen=True)
class Family:
    """A task: instruction templates (each wraps ``{x}``) and its answer function."""

    name: str
    templates: tuple[str, ...]
    answer: Callable[[str], str]
    components: tuple[str, ...] = ()  # composition tasks only: trained families, in application order


def _families(templates: dict[str, tuple[str, ...]]) -> dict[str, Family]:
    return {name: Family(name, ts, SKILLS[name]) for name, ts in templates.items()}


FAMILIES = _families({  # the adapters' families: instruction corpus train / validation / test
    "reverse_words": ("reverse the words: {x}", "say the words in reverse order: {x}", "{x} - words reversed?"),
    "sort_words": ("sort the words: {x}", "put in alphabetical order: {x}", "{x} sorted A to Z?"),
    "first_word": ("first word of: {x}", "which word comes first? {x}", "{x} begins with which word?"),
    "count_words": ("how many words? {x}", "count the words: {x}", "{x} has how many words?"),
})
OOD_FAMILIES = _families({  # zero-shot: known in notation, no adapter, templates seen nowhere
    "last_word": ("last word of: {x}", "which word comes last? {x}", "{x} ends with which word?"),
    "upper_words": ("uppercase the words: {x}", "write in capitals: {x}", "{x} in upper case?"),
    "second_word": ("second word of: {x}", "which word comes second? {x}", "{x} has which second word?"),
})
META_FAMILIES = _families({  # instruction-style text in pre-training only
    "copy_words": ("copy the words: {x}", "repeat these words: {x}", "{x} - say it again."),
    "drop_first": ("drop the first word: {x}", "all words but the first: {x}", "{x} without its first word?"),
    "double_first": ("double the first word: {x}", "say the first word twice: {x}", "{x} with the first word doubled?"),
    "swap_ends": ("swap the end words: {x}", "exchange first and last word: {x}", "{x} with its ends swapped?"),
})


def _compose(name: str, components: tuple[str, str], *templates: str) -> Family:
    """A held-out task that applies trained families in order: its target needs both skills."""
    first, second = (SKILLS[c] for c in components)
    return Family(name, templates, lambda x: second(first(x)), components)


COMPOSITIONS: dict[str, Family] = {f.name: f for f in [
    _compose("compose_sort_reverse", ("sort_words", "reverse_words"),
             "reverse alphabetical order: {x}", "sort the words, then reverse: {x}", "{x} sorted Z to A?"),
    _compose("compose_sort_first", ("sort_words", "first_word"),
             "first word alphabetically: {x}", "sort, then say the first word: {x}", "{x} sorted, first word?"),
]}
TASK_FAMILIES: tuple[str, ...] = tuple(FAMILIES)
OOD_TASKS: tuple[str, ...] = tuple(OOD_FAMILIES)
COMPOSITION_TASKS: tuple[str, ...] = tuple(COMPOSITIONS)
MC_TASKS: tuple[str, ...] = TASK_FAMILIES + OOD_TASKS
_ALL = {**FAMILIES, **OOD_FAMILIES, **META_FAMILIES, **COMPOSITIONS}
# Which tasks each split asks, and whose payloads it uses (compositions, OOD and MC reuse unseen ones).
SPLIT_TASKS = {"train": FAMILIES, "validation": FAMILIES, "test": FAMILIES, "ood_test": OOD_FAMILIES,
               "compose_test": COMPOSITIONS, "mc_test": {**FAMILIES, **OOD_FAMILIES}}
PAYLOAD_SPLIT = {"train": "train", "validation": "validation"}  # every other split: "test" payloads
# Generic text beside the skills, so the base is a language model and not a lookup table.
GENERIC = ("the {n} is on the {m} .", "I see a {a} {n} .", "we put the {n} near the {m} .",
           "you found my {n} and my {m} .", "this {n} was under that {m} .", "it has a {a} {n} in it .")
ADJECTIVES = ("big", "small", "old", "new", "red", "blue")


def family_of(task_name: str) -> Family:
    """The spec (templates, answer function, components) behind a ``task_name``."""
    task = _ALL.get(task_name)
    if task is None:
        raise KeyError(f"unknown task_name {task_name!r}; known: {sorted(_ALL)}")
    return task


def payload_of(source: str, task_name: str) -> str:
    """Invert templating: the payload a source wraps (ValueError if no template of the task fits)."""
    for template in family_of(task_name).templates:
        head, tail = (re.escape(part) for part in template.split("{x}"))
        if m := re.fullmatch(f"{head}({PAYLOAD_RE}){tail}", source):
            return m.group(1)
    raise ValueError(f"source {source!r} matches no template of {task_name!r}")


def split_of(payload: str) -> str:
    """Fixed 80/10/10 assignment by a stable hash (not Python's salted ``hash``), seed independent."""
    bucket = int(hashlib.sha256(payload.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def random_payload(rng: random.Random, split: str) -> str:
    """3-5 distinct words whose payload split is ``split`` (rejection sampling: 10-80% accepted)."""
    while True:
        payload = " ".join(rng.sample(WORDS, rng.randint(3, 5)))
        if split_of(payload) == split:
            return payload


# The layouts a skill's notation comes in, with their share of notation documents: a real LLM meets a skill
# in many layouts and recognises it by its name, not by one layout's punctuation. With the first layout alone
# (until 2026-12-04) the base tied each skill to ``name(`` ... ``) =``, and how well an adapter could
# reach it from an instruction depended on the pre-training draw: routed adapters 0.54-0.69 test exact match
# on three of six draws (issue 12). With these four, 0.93-1.00 on those draws at the same budget, the base
# still at 0.06-0.19 in domain. A layout ``name: payload`` followed by the answer on the next line was
# dropped: it is an instruction's shape, and the base then answered 0.22-0.36 of the trained families'
# prompts zero-shot (target <= 0.2).
NOTATIONS = {"{s}({x}) = {y}": 0.4, "{s} [{x}] -> {y}": 0.2, "{x} | {s} = {y}": 0.2, "{s}({x})\n{y}": 0.2}


def notation(skill: str, payload: str, layout: str = next(iter(NOTATIONS))) -> str:
    """The base's own notation for a skill: ``reverse_words(box cup pen) = pen cup box`` (or another of
    :data:`NOTATIONS`' layouts)."""
    return layout.format(s=skill, x=payload, y=SKILLS[skill](payload))


# Relative frequency of each skill's notation in pre-training (1 when absent). The skills that attend to
# every payload word in turn get more: with all weights 1 the 3,000-step base learnt sort_words 0/30,
# reverse 20/30, upper 10/30, second 9/30, copy 15/30 (and drop_first 1/30, swap_ends 14/30) in
# notation; with these weights, at the same steps and cost, every skill 29-30/30 (issue 12).
SKILL_WEIGHTS = {"sort_words": 3.0, "reverse_words": 2.0, "upper_words": 2.0, "second_word": 1.5, "copy_words": 1.5}


def pretrain_text(rng: random.Random) -> str:
    """One pre-training document for the demo base, on *train* payloads only.

    60% notation of a skill (drawn by :data:`SKILL_WEIGHTS`, in a layout drawn by :data:`NOTATIONS`), 25% an
    instruction (prompt, newline, answer, as ``tclora.data`` lays instruction rows out) of a *meta* skill, 15% a
    generic sentence.
    Never an adapter's or an OOD template, never an evaluation payload (tests pin both).
    """
    kind = rng.random()
    payload = random_payload(rng, "train")
    if kind < 0.6:
        skills = list(SKILLS)
        skill = rng.choices(skills, [SKILL_WEIGHTS.get(s, 1.0) for s in skills])[0]
        return notation(skill, payload, rng.choices(list(NOTATIONS), list(NOTATIONS.values()))[0])
    if kind < 0.85:
        meta = META_FAMILIES[rng.choice(list(META_FAMILIES))]
        return f"{rng.choice(meta.templates).format(x=payload)}\n{meta.answer(payload)}"
    n, m = rng.sample(WORDS, 2)
    return rng.choice(GENERIC).format(n=n, m=m, a=rng.choice(ADJECTIVES))


def vocabulary() -> list[str]:
    """Every word and symbol any demo text can contain, sorted: the demo base tokenizer's vocabulary."""
    texts = [t for f in _ALL.values() for t in f.templates] + list(SKILLS) + list(GENERIC) + list(ADJECTIVES)
    texts += WORDS + [w.upper() for w in WORDS] + list("0123456789")
    pieces = {p for t in texts for p in re.findall(TOKEN_PATTERN, t)}
    pieces |= {"\n", " "} | {chr(c) for c in range(33, 127) if not chr(c).isalnum()}
    return sorted(pieces)


# Word-level pre-tokenization: a run of letters, one digit, one whitespace or one other character.
TOKEN_PATTERN = r"[A-Za-z]+|[0-9]|\s|[^\sA-Za-z0-9]"


def _choices(task: Family, payload: str, rng: random.Random) -> tuple[list[str], int]:
    """The right answer and up to ``MC_CHOICES - 1`` distinct answers of the other skills, shuffled."""
    pool = list(MC_TASKS)
    rng.shuffle(pool)
    choices = [task.answer(payload)]
    for other in pool:
        if len(choices) == MC_CHOICES:
            break
        if (answer := SKILLS[other](payload)) not in choices:
            choices.append(answer)
    rng.shuffle(choices)
    return choices, choices.index(task.answer(payload))


def _rows_for(task: Family, split: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` rows of one task with payloads of ``split``'s payload split, templates in turn, unique sources."""
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):  # bounded: a too-small payload space fails loudly, never hangs
        if len(rows) == n:
            return rows
        payload = random_payload(rng, PAYLOAD_SPLIT.get(split, "test"))
        source = task.templates[len(rows) % len(task.templates)].format(x=payload)
        if source in seen:
            continue
        seen.add(source)
        row = {"source": source, "target": task.answer(payload), "task_name": task.name}
        if task.components:
            row["components"] = list(task.components)
        if split == "mc_test":
            row["choices"], row["answer"] = _choices(task, payload, rng)
        rows.append(row)
    if len(rows) == n:
        return rows
    raise ValueError(f"task {task.name!r}: only {len(rows)} unique {split} sources, asked for {n}")


def generate_split(split: str, n_per_task: int, seed: int) -> list[dict]:
    """``n_per_task`` rows of every task of ``split`` (``SPLIT_TASKS``).

    Deterministic in (split, n_per_task, seed); train rows are shuffled so families interleave.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # A string seed per (seed, split, task) keeps each task's rows independent of the others' counts.
    rows = [row for name, task in SPLIT_TASKS[split].items()
            for row in _rows_for(task, split, n_per_task, random.Random(f"{seed}/{split}/{name}"))]
    if split == "train":
        random.Random(f"{seed}/shuffle").shuffle(rows)
    return rows


def build_demo_corpus(out_dir: str | Path, *, train_per_task: int = 300, eval_per_task: int = 40,
                      seed: int = 0) -> dict[str, Path]:
    """Write every split in ``SPLITS`` as JSONL plus ``corpus.json`` into ``out_dir``.

    Skipped when ``out_dir`` already holds a complete corpus built with the same parameters. The
    directory is built in a temporary sibling and renamed into place (``artifacts.stage_dir``), so
    ``out_dir`` belongs to the corpus: anything else in it is replaced on a rebuild.

    Returns:
        split name -> path of its JSONL file.
    """
    out_dir = Path(out_dir)
    params = {"version": FORMAT_VERSION, "train_per_task": train_per_task,
              "eval_per_task": eval_per_task, "seed": seed}
    paths = {split: out_dir / name for split, name in FILES.items()}
    if is_complete(out_dir, params):
        return paths
    with stage_dir(out_dir, params) as tmp:
        counts = {}
        for split in SPLITS:
            rows = generate_split(split, train_per_task if split == "train" else eval_per_task, seed)
            write_jsonl(tmp / FILES[split], rows)
            counts[split] = len(rows)
        meta = {"params": params, "counts": counts, "task_families": list(TASK_FAMILIES),
                "ood_tasks": list(OOD_TASKS), "composition_tasks": list(COMPOSITION_TASKS),
                "mc_tasks": list(MC_TASKS)}
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return paths


def load_split(out_dir: str | Path, split: str) -> list[dict]:
    """Rows of one split of a built corpus."""
    return read_jsonl(Path(out_dir) / FILES[split])
