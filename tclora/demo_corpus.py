"""A deterministic multi-task instruction corpus: tclora's embedded offline demo data.

Rows are FLAN-flat ``{source, target, task_name}``. The downstream model is a tiny character-level Llama
(printable ASCII + "\\n"), so every rule is short, local and deterministic, sources stay under 60
characters, targets under 20 and never contain a newline (generation stops at one).

Trained families (one example each):

    reverse_words  "Reverse the words: box cup pen"       -> "pen cup box"
    sort_words     "Sort the words: box cup arm"          -> "arm box cup"
    first_word     "First word of: box cup pen"           -> "box"
    count_words    "How many words? box cup pen"          -> "3"
    upper_words    "Uppercase: box cup pen"               -> "BOX CUP PEN"
    copy_words     "Repeat: box cup pen"                  -> "box cup pen"
    max_num        "Largest number: 3 7 2"                -> "7"
    min_num        "Smallest number: 3 7 2"               -> "2"
    count_nums     "How many numbers? 3 7 2"              -> "3"
    reverse_chars  "Spell backwards: plonk"               -> "knolp"
    lookup         "Sounds of: cow duck"                  -> "moo quack"

Interference is built in on purpose: the six *_words families read the same input format (3-5 distinct
three-letter words) and the three *_num(s) families read the same digit lists, so within a group only
the instruction says what to output. Adapters trained on different clusters then disagree on the same
inputs, and a naively averaged adapter measurably confuses them. reverse_chars and lookup have formats
of their own (one letter string; 1-3 animal names from a fixed table that train fully covers).

Held-out skill composition (only in ``compose_test.jsonl``; ``components`` in application order):

    compose_upper_first      first_word then upper_words      "Uppercase the first word: box cup" -> "BOX"
    compose_sort_reverse     sort_words then reverse_words    "Reverse alphabetical order: ..."   -> Z..A
    compose_first_backwards  first_word then reverse_chars    "Spell the first word backwards: ..."

Splits are disjoint by *payload* (the text a template wraps): a payload's split is a fixed hash of it,
so no source, and not even a word list seen under another instruction, leaks from train into eval.
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

MAX_SOURCE_CHARS = 60
MAX_TARGET_CHARS = 20
SPLITS = ("train", "validation", "test", "compose_test")
FILES = {split: f"{split}.jsonl" for split in SPLITS}
FORMAT_VERSION = 1  # bump when generation changes, so cached corpora are rebuilt

# Three-letter non-animal words: five of them plus spaces is 19 chars, so whole-list targets fit in 20.
WORDS = ("arm bag box cup dot fan fig gem hat ink jam jar key kit leg lid log map mop mug net nut oak "
         "pad pan pen pin pot rod rug sky sun tin toe tub van wax web yam zip").split()
# The lookup table: small enough that a few hundred training rows cover every key many times.
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "pig": "oink", "owl": "hoot",
          "sheep": "baa", "bee": "buzz", "horse": "neigh", "lion": "roar", "frog": "croak",
          "crow": "caw", "mouse": "squeak", "snake": "hiss", "wolf": "howl", "goat": "bleat"}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# Payload formats: a generator and the regex that recognises exactly its outputs (tests parse sources
# back with it, which is how "these families differ only in the instruction" is checked formally).
PAYLOADS: dict[str, tuple[Callable[[random.Random], str], str]] = {
    "words": (lambda r: " ".join(r.sample(WORDS, r.randint(3, 5))), r"[a-z]{3}(?: [a-z]{3}){2,4}"),
    "digits": (lambda r: " ".join(str(r.randint(0, 9)) for _ in range(r.randint(3, 5))),
               r"[0-9](?: [0-9]){2,4}"),
    "letters": (lambda r: "".join(r.choices(LETTERS, k=r.randint(3, 7))), r"[a-z]{3,7}"),
    "animals": (lambda r: " ".join(r.sample(sorted(SOUNDS), r.randint(1, 3))), r"[a-z]+(?: [a-z]+){0,2}"),
}


@dataclass(frozen=True)
class Family:
    """A task: its payload format, instruction templates (each wraps ``{x}``) and answer function."""

    name: str
    fmt: str
    templates: tuple[str, ...]
    answer: Callable[[str], str]
    components: tuple[str, ...] = ()  # composition tasks only: trained families, in application order


def _family(name: str, fmt: str, answer: Callable[[str], str], *templates: str) -> Family:
    return Family(name, fmt, templates, answer)


def _words(x: str) -> list[str]:
    return x.split()


FAMILIES: dict[str, Family] = {f.name: f for f in [
    _family("reverse_words", "words", lambda x: " ".join(reversed(_words(x))),
            "Reverse the words: {x}", "Say the words in reverse order: {x}", "{x} - words reversed?"),
    _family("sort_words", "words", lambda x: " ".join(sorted(_words(x))),
            "Sort the words: {x}", "Put in alphabetical order: {x}", "{x} sorted A to Z?"),
    _family("first_word", "words", lambda x: _words(x)[0],
            "First word of: {x}", "Which word comes first? {x}", "{x} begins with which word?"),
    _family("count_words", "words", lambda x: str(len(_words(x))),
            "How many words? {x}", "Count the words: {x}", "{x} has how many words?"),
    _family("upper_words", "words", str.upper,
            "Uppercase: {x}", "Write in capitals: {x}", "{x} in upper case is?"),
    _family("copy_words", "words", lambda x: x,
            "Repeat: {x}", "Copy this exactly: {x}", "{x} - say it again."),
    _family("max_num", "digits", lambda x: max(_words(x), key=int),
            "Largest number: {x}", "Which is biggest? {x}", "{x} max is?"),
    _family("min_num", "digits", lambda x: min(_words(x), key=int),
            "Smallest number: {x}", "Which is least? {x}", "{x} min is?"),
    _family("count_nums", "digits", lambda x: str(len(_words(x))),
            "How many numbers? {x}", "Count the numbers: {x}", "{x} has how many numbers?"),
    _family("reverse_chars", "letters", lambda x: x[::-1],
            "Spell backwards: {x}", "Write {x} letter by letter in reverse.", "{x} spelled backwards is?"),
    _family("lookup", "animals", lambda x: " ".join(SOUNDS[a] for a in _words(x)),
            "Sounds of: {x}", "What do these animals say? {x}", "{x} make which sounds?"),
]}
TASK_FAMILIES: tuple[str, ...] = tuple(FAMILIES)


def _compose(name: str, components: tuple[str, str], *templates: str) -> Family:
    """A held-out task that applies trained families in order: its target needs both skills."""
    first, second = (FAMILIES[c] for c in components)
    return Family(name, first.fmt, templates, lambda x: second.answer(first.answer(x)), components)


COMPOSITIONS: dict[str, Family] = {f.name: f for f in [
    _compose("compose_upper_first", ("first_word", "upper_words"),
             "Uppercase the first word: {x}", "First word in capitals: {x}", "{x} first word, uppercased?"),
    _compose("compose_sort_reverse", ("sort_words", "reverse_words"),
             "Reverse alphabetical order: {x}", "Sort the words, then reverse: {x}", "{x} sorted Z to A?"),
    _compose("compose_first_backwards", ("first_word", "reverse_chars"),
             "Spell the first word backwards: {x}", "First word, letters reversed: {x}",
             "{x} first word backwards?"),
]}
COMPOSITION_TASKS: tuple[str, ...] = tuple(COMPOSITIONS)


def family_of(task_name: str) -> Family:
    """The spec (format, templates, answer function, components) behind a ``task_name``."""
    task = FAMILIES.get(task_name) or COMPOSITIONS.get(task_name)
    if task is None:
        raise KeyError(f"unknown task_name {task_name!r}; known: {TASK_FAMILIES + COMPOSITION_TASKS}")
    return task


def payload_of(source: str, task_name: str) -> str:
    """Invert templating: the payload a source wraps (ValueError if no template of the task fits)."""
    task = family_of(task_name)
    pattern = PAYLOADS[task.fmt][1]
    for template in task.templates:
        head, tail = (re.escape(part) for part in template.split("{x}"))
        if m := re.fullmatch(f"{head}({pattern}){tail}", source):
            return m.group(1)
    raise ValueError(f"source {source!r} matches no template of {task_name!r}")


def split_of(payload: str) -> str:
    """Fixed 80/10/10 assignment by a stable hash (not Python's salted ``hash``), seed independent."""
    bucket = int(hashlib.sha256(payload.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _rows_for(task: Family, split: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` rows of one task whose payloads belong to ``split``, templates used in turn, unique sources."""
    make_payload = PAYLOADS[task.fmt][0]
    payload_split = "test" if split == "compose_test" else split  # compositions reuse unseen payloads
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):  # bounded: a too-small payload space fails loudly, never hangs
        if len(rows) == n:
            return rows
        payload = make_payload(rng)
        source = task.templates[len(rows) % len(task.templates)].format(x=payload)
        if split_of(payload) != payload_split or source in seen:
            continue
        seen.add(source)
        row = {"source": source, "target": task.answer(payload), "task_name": task.name}
        if task.components:
            row["components"] = list(task.components)
        rows.append(row)
    if len(rows) == n:
        return rows
    raise ValueError(f"task {task.name!r}: only {len(rows)} unique {split} sources, asked for {n}")


def generate_split(split: str, n_per_task: int, seed: int) -> list[dict]:
    """``n_per_task`` rows of every task in ``split`` (compose_test: the composition tasks).

    Deterministic in (split, n_per_task, seed); train rows are shuffled so families interleave.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    tasks = COMPOSITIONS if split == "compose_test" else FAMILIES
    # A string seed per (seed, split, task) keeps each task's rows independent of the others' counts.
    rows = [row for name, task in tasks.items()
            for row in _rows_for(task, split, n_per_task, random.Random(f"{seed}/{split}/{name}"))]
    if split == "train":
        random.Random(f"{seed}/shuffle").shuffle(rows)
    return rows


def build_demo_corpus(out_dir: str | Path, *, train_per_task: int = 300, eval_per_task: int = 40,
                      seed: int = 0) -> dict[str, Path]:
    """Write train/validation/test/compose_test JSONL plus ``corpus.json`` into ``out_dir``.

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
                "composition_tasks": list(COMPOSITION_TASKS)}
        (tmp / "corpus.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return paths


def load_split(out_dir: str | Path, split: str) -> list[dict]:
    """Rows of one split of a built corpus."""
    return read_jsonl(Path(out_dir) / FILES[split])
