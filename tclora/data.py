"""Record schema, validation, prompt formatting and tokenisation.

A record is the FLAN-flat triple ``{source, target, task_name?}``. Validation returns a reason string
instead of raising, so the pipeline can quarantine bad rows with their reason and keep the good ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are built: Ray Data tasks that validate rows never need it
    import torch

# The char-level demo model reads this separator as "now answer"; real models see the same plain text.
PROMPT_SUFFIX = "\n"
MAX_FIELD_CHARS = 1_000_000  # a 10 MB "row" is an upload accident, not a training example
# JSON may spell a lone UTF-16 surrogate ("\ud83d", half an emoji cut by a byte-limited writer); Python
# decodes it into a str that no UTF-8 writer (Arrow, the tokenizer) can encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def format_prompt(source: str) -> str:
    return source.rstrip() + PROMPT_SUFFIX


def validate_record(
    row: Mapping[str, Any], source_field: str = "source", target_field: str = "target",
    task_field: str | None = "task_name",
) -> str | None:
    """Why ``row`` cannot be trained on, or None when it is fine.

    Reasons name the field: missing, not a string, empty, a NUL byte, too long, or text that is not
    valid Unicode (an unpaired surrogate, which would fail later in Arrow or the tokenizer).
    """
    for name in (source_field, target_field):
        if name not in row or row[name] is None:
            return f"missing field '{name}'"
        value = row[name]
        if not isinstance(value, str):
            return f"field '{name}' must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"field '{name}' is empty"
        if "\x00" in value:
            return f"field '{name}' contains a NUL byte"
        if len(value) > MAX_FIELD_CHARS:
            return f"field '{name}' is {len(value)} characters (limit {MAX_FIELD_CHARS})"
    if task_field and row.get(task_field) is not None and not isinstance(row[task_field], str):
        return f"field '{task_field}' must be a string, got {type(row[task_field]).__name__}"
    for name in (source_field, target_field, task_field):
        if name and isinstance(row.get(name), str) and (bad := _SURROGATE.search(row[name])):
            return (f"field '{name}' is not valid Unicode: unpaired surrogate U+{ord(bad.group()):04X} at "
                    f"character {bad.start()} (an escape like \\ud83d without its pair)")
    return None


def record_keys(sources: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """64-bit key of each (source, target) pair: equal keys mark duplicate training examples.

    The task name is left out: the same prompt and answer under two task names is still one example.
    """
    return np.array([int.from_bytes(hashlib.blake2b(json.dumps([s, t]).encode(), digest_size=8).digest(), "big")
                     for s, t in zip(sources, targets)], dtype=np.uint64)


def find_duplicates(keys: np.ndarray, order: np.ndarray, n_examples: int = 3) -> tuple[int, list[tuple[int, int]]]:
    """Count rows whose key appeared earlier, with a few ``(duplicate, first occurrence)`` index pairs.

    Args:
        keys: (n,) uint64 record keys (:func:`record_keys`).
        order: (n,) position of each row in corpus order (file, then line): "earlier" means lower here,
            so the answer does not depend on the order rows arrived in.
        n_examples: pairs to return, the earliest duplicates first.

    Returns:
        (number of duplicates, pairs of indices into ``keys``).
    """
    if len(keys) == 0:
        return 0, []
    idx = np.lexsort((order, keys))  # by key, then corpus order: each group starts with its first row
    sorted_keys = keys[idx]
    dup = np.zeros(len(idx), dtype=bool)
    dup[1:] = sorted_keys[1:] == sorted_keys[:-1]
    group_start = np.maximum.accumulate(np.where(dup, 0, np.arange(len(idx))))
    dups = np.flatnonzero(dup)
    earliest = dups[np.argsort(order[idx[dups]], kind="stable")[:n_examples]]
    return int(dup.sum()), [(int(idx[i]), int(idx[group_start[i]])) for i in earliest]


def read_jsonl(path: str | Path) -> list[dict]:
    """Small-file reader for local splits (the pipeline reads corpora with Ray Data instead).

    No validation (see :func:`tclora.corpus.read_records` for files from elsewhere); a leading UTF-8
    byte-order mark is skipped.
    """
    with open(path, encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def tokenize_example(tokenizer, source: str, target: str, max_length: int) -> dict[str, list[int]]:
    """Prompt + target + EOS; the loss sees only the target tokens (prompt labels are -100)."""
    prompt_ids = tokenizer(format_prompt(source), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    # Keep the whole target where possible: truncate the prompt from the left first.
    overflow = len(prompt_ids) + len(target_ids) - max_length
    if overflow > 0:
        cut = min(overflow, max(len(prompt_ids) - 1, 0))
        prompt_ids = prompt_ids[:1] + prompt_ids[1 + cut :] if cut else prompt_ids
        target_ids = target_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + target_ids
    labels = [-100] * len(prompt_ids) + target_ids
    return {"input_ids": input_ids, "labels": labels}


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of tokenised examples for training / loss."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(
    records: Sequence[Mapping[str, str]], tokenizer, batch_size: int, max_length: int,
    steps: int, seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` shuffled training batches, cycling through ``records`` epoch after epoch."""
    if not records:
        raise ValueError("no training records")
    import torch

    examples = [tokenize_example(tokenizer, r["source"], r["target"], max_length) for r in records]
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in picked], tokenizer.pad_token_id)
