"""Evaluation on held-out records: exact match (greedy generation), multiple-choice log-likelihood, loss.

Plain torch + transformers, so the same functions run in a Ray actor, a notebook or a test. Every
function puts the model in eval mode under ``torch.inference_mode()`` on the model's own device, and
restores the caller's train/eval mode afterwards.

Prompts are built exactly as in training (``tclora.data``): BOS + ``format_prompt(source)``, and the
answer is what follows, up to EOS or the first newline.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from tclora.data import collate, format_prompt, tokenize_example

DEFAULT_TASK = "default"  # per-task key for records without a task_name


@contextlib.contextmanager
def _evaluating(model) -> Iterator[torch.device]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    """Whether prompts go through ``tokenizer.apply_chat_template``: asked for, and the tokenizer has one."""
    return bool(chat_template and getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, source: str, max_tokens: int | None, chat_template: bool = False) -> list[int]:
    """BOS + prompt ids, as ``tokenize_example`` builds them; over-long prompts lose their left end.

    With ``chat_template`` (and a tokenizer that has one) the source is the user turn of a one-message
    chat and the template's generation prompt follows, as instruction-tuned models expect; the template
    then supplies BOS itself.
    """
    if uses_chat_template(tokenizer, chat_template):
        # Rendered as text, then tokenised without special tokens: the template writes BOS itself if it wants
        # one, and the text path returns plain ids in every transformers version (tokenize=True may return a dict).
        text = tokenizer.apply_chat_template([{"role": "user", "content": source}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = []
    else:
        ids = tokenizer(format_prompt(source), add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if max_tokens is not None and len(bos) + len(ids) > max_tokens:
        ids = ids[len(ids) - (max_tokens - len(bos)) :]
    return bos + ids


def _clean_answer(text: str) -> str:
    """Strip, then keep the first line: the model answers on one line after the prompt's newline."""
    return text.strip().split("\n", 1)[0].strip()


def generate_answers(
    model, tokenizer, sources: Sequence[str], *, batch_size: int = 32, max_new_tokens: int = 24,
    chat_template: bool = False, adapter_names: Sequence[str] | None = None,
) -> list[str]:
    """Greedy answers for ``sources``, in order.

    ``adapter_names`` (one per source; a PEFT model holding those adapters): each row generates with its
    own adapter in a mixed batch (PEFT's ``generate(adapter_names=...)``; ``"__base__"``: no adapter).

    Batches are left-padded by hand (prompts end where generation starts), so the caller's tokenizer,
    including its ``padding_side``, is left untouched. Sources are sorted by length first so a batch
    carries little padding. Generation stops at EOS; the text is stripped and cut at its first newline.
    ``chat_template``: prompts through the tokenizer's chat template when it has one (:func:`prompt_ids`).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_pos = getattr(model.config, "max_position_embeddings", None)
    max_prompt = max(max_pos - max_new_tokens, 2) if max_pos else None  # room for the answer
    prompts = [prompt_ids(tokenizer, s, max_prompt, chat_template) for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    with _evaluating(model) as device:
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in picked)
            ids = torch.full((len(picked), width), pad_id, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((len(picked), width), dtype=torch.long)
            for row, i in enumerate(picked):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            per_row = {} if adapter_names is None else {"adapter_names": [adapter_names[i] for i in picked]}
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, **per_row,
            )  # (B, T + new)
            for row, i in enumerate(picked):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                answers[i] = _clean_answer(text)
    return answers


def _task(record: Mapping[str, Any]) -> str:
    return record.get("task_name") or DEFAULT_TASK


def summarize(tasks: Sequence[str], metrics: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """The one scoring summary: per-record values -> overall, per-task and task-averaged scores.

    Args:
        tasks: each record's task name (:data:`DEFAULT_TASK` for records without one).
        metrics: ``{metric: per-record values}`` (hits count as 1/0), each as long as ``tasks``.

    Returns:
        ``{metric: mean over records, "n", "per_task": {task: {metric: mean, "n"}},
        "macro": {metric: unweighted mean over tasks}}`` (every task counts the same in ``macro``).
    """
    per_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        per_task[task].append(i)
    out: dict[str, Any] = {"n": len(tasks), "per_task": {}, "macro": {}}
    for task, idx in sorted(per_task.items()):
        out["per_task"][task] = {m: sum(float(v[i]) for i in idx) / len(idx) for m, v in metrics.items()}
        out["per_task"][task]["n"] = len(idx)
    for m, values in metrics.items():
        out[m] = sum(float(v) for v in values) / len(values) if len(values) else 0.0
        out["macro"][m] = (sum(t[m] for t in out["per_task"].values()) / len(per_task)) if per_task else 0.0
    return out


def rouge_l(predictions: Sequence[str], targets: Sequence[str]) -> list[float]:
    """Rouge-L F-measure of each prediction against its target (Google's ``rouge-score``, stemming on).

    The in-distribution metric mttl reports for FLAN tasks, where exact match would score near zero.
    """
    from rouge_score import rouge_scorer  # imported here: a small dependency only generative scoring needs

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(t.strip(), p)["rougeL"].fmeasure for p, t in zip(predictions, targets)]


def exact_match(
    model, tokenizer, records: Sequence[Mapping[str, Any]], *, batch_size: int = 32, max_new_tokens: int = 24,
    return_predictions: bool = False, chat_template: bool = False, rouge: bool = False,
) -> dict[str, Any]:
    """Fraction of records whose generated answer equals ``target``, overall and per ``task_name``.

    Normalisation is whitespace stripping only (after cutting the answer at its first newline): case
    and punctuation count, since the demo tasks are string manipulations where they are the answer.
    ``rouge`` adds Rouge-L (:func:`rouge_l`) beside it; ``chat_template`` see :func:`generate_answers`.

    Returns :func:`summarize` of ``exact_match`` (and ``rouge_l``): ``{"exact_match", "n", "per_task":
    {task: {"exact_match", "n"}}, "macro"}``, plus ``"predictions"`` when asked.
    """
    answers = generate_answers(model, tokenizer, [r["source"] for r in records],
                               batch_size=batch_size, max_new_tokens=max_new_tokens, chat_template=chat_template)
    metrics: dict[str, Sequence[float]] = {"exact_match": [a == r["target"].strip() for a, r in zip(answers, records)]}
    if rouge:
        metrics["rouge_l"] = rouge_l(answers, [r["target"] for r in records])
    result = summarize([_task(r) for r in records], metrics)
    if return_predictions:
        result["predictions"] = answers
    return result


def _target_logprobs(model, batch: Mapping[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log-prob of the labelled (target) tokens, and how many there are."""
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1)
    # cross_entropy rather than a full log_softmax: no second (B, T, V) tensor for 32K-vocab models.
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T-1)
    return -nll.sum(dim=1), (labels != -100).sum(dim=1)


def answer_index(record: Mapping[str, Any]) -> int:
    """A multiple-choice record's right choice as an index; ``answer`` may be the index or the choice text.

    Raises:
        ValueError: the answer is not one of the record's choices, or an index out of range.
    """
    answer, choices = record["answer"], record["choices"]
    if isinstance(answer, str):
        if answer not in choices:
            raise ValueError(f"answer {answer!r} is not one of the choices {choices!r}")
        return choices.index(answer)
    if not 0 <= int(answer) < len(choices):
        raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
    return int(answer)


def choose(
    model, tokenizer, records: Sequence[Mapping[str, Any]], *, batch_size: int = 32, max_length: int = 256,
    length_normalize: bool = False,
) -> list[int]:
    """The index of the likeliest choice for each multiple-choice record (mttl's log-likelihood scoring).

    Each record has ``source`` and ``choices`` (list of strings). A choice's score is the summed log-prob
    of its tokens plus EOS, as ``tokenize_example`` lays them out: EOS is included so that a choice that
    is a prefix of another (``"ab"`` / ``"abc"``) is not favoured merely for being short.
    ``length_normalize`` divides by the token count instead (mttl's ARC/BoolQ/PIQA scoring). Ties go to
    the first choice. Choices of one question may fall into different batches.
    """
    rows = [(i, c) for i, r in enumerate(records) for c in r["choices"]]
    scores: list[float] = []
    with _evaluating(model) as device:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            examples = [tokenize_example(tokenizer, records[i]["source"], c, max_length) for i, c in chunk]
            total, count = _target_logprobs(model, collate(examples, tokenizer.pad_token_id), device)
            scores += (total / count.clamp(min=1) if length_normalize else total).tolist()
    chosen, offset = [], 0
    for r in records:
        n = len(r["choices"])
        choice_scores = scores[offset : offset + n]
        offset += n
        chosen.append(max(range(n), key=choice_scores.__getitem__))
    return chosen


def choice_accuracy(
    model, tokenizer, records: Sequence[Mapping[str, Any]], *, batch_size: int = 32, max_length: int = 256,
    length_normalize: bool = False,
) -> dict[str, Any]:
    """Multiple-choice accuracy by log-likelihood (:func:`choose`): ``{"accuracy", "n", "per_task"}``.

    Each record has ``source``, ``choices`` and ``answer`` (index or the choice text).

    Raises:
        ValueError: an ``answer`` that is not one of its record's choices (or an index out of range).
    """
    answers = [answer_index(r) for r in records]  # a bad answer fails before any forward pass
    chosen = choose(model, tokenizer, records, batch_size=batch_size, max_length=max_length,
                    length_normalize=length_normalize)
    return summarize([_task(r) for r in records], {"accuracy": [c == a for c, a in zip(chosen, answers)]})


def mean_loss(
    model, tokenizer, records: Sequence[Mapping[str, Any]], *, batch_size: int = 32, max_length: int = 128
) -> float:
    """Token-level cross-entropy over target tokens (incl. EOS), pooled over all records.

    Same tokenisation as training, so for one record it equals the model's own ``labels=`` loss.
    """
    total, count = 0.0, 0
    with _evaluating(model) as device:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            examples = [tokenize_example(tokenizer, r["source"], r["target"], max_length) for r in chunk]
            logp, n = _target_logprobs(model, collate(examples, tokenizer.pad_token_id), device)
            total -= logp.sum().item()
            count += int(n.sum().item())
    return total / max(count, 1)


def loss_by_task(
    model, tokenizer, records: Sequence[Mapping[str, Any]], *, batch_size: int = 32, max_length: int = 128
) -> dict[str, float]:
    """``mean_loss`` for each ``task_name`` separately."""
    groups: dict[str, list] = defaultdict(list)
    for r in records:
        groups[_task(r)].append(r)
    return {t: mean_loss(model, tokenizer, rs, batch_size=batch_size, max_length=max_length)
            for t, rs in sorted(groups.items())}
