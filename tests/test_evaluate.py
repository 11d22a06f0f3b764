"""Evaluation metrics against independent reference computations on the tiny demo base."""

from __future__ import annotations

import pytest
import torch

from tclora import evaluate
from tclora.data import batches, collate, format_prompt, tokenize_example

SOURCES = ["echo: cat", "mirror: a much longer prompt than the others here", "x", "double: 42 red"]


def _reference_greedy(model, tok, source: str, max_new_tokens: int) -> str:
    """Unbatched, unpadded greedy decoding by hand (no ``generate``)."""
    ids = [tok.bos_token_id] + tok(format_prompt(source), add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()


def test_left_padded_batches_match_unbatched_generation(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    tok.padding_side = "right"
    batched = evaluate.generate_answers(model, tok, SOURCES, batch_size=4, max_new_tokens=12)
    single = evaluate.generate_answers(model, tok, SOURCES, batch_size=1, max_new_tokens=12)
    assert batched == single
    assert batched == [_reference_greedy(model, tok, s, 12) for s in SOURCES]
    assert tok.padding_side == "right"  # the caller's tokenizer is untouched


def test_exact_match_after_learning_a_constant_answer(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    train = [{"source": s, "target": "abc"} for s in ["red", "one two", "x y z", "hello there", "42"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in batches(train, tok, batch_size=5, max_length=64, steps=40, seed=0):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    records = [{"source": "fish", "target": " abc\n", "task_name": "right"},  # whitespace is stripped
               {"source": "blue moon", "target": "abc", "task_name": "right"},
               {"source": "fish", "target": "abd", "task_name": "wrong"},
               {"source": "tree", "target": "ABC"}]  # case counts; no task_name -> "default"
    result = evaluate.exact_match(model, tok, records, batch_size=3, max_new_tokens=8, return_predictions=True)
    assert result["predictions"] == ["abc"] * 4
    assert result["exact_match"] == 0.5 and result["n"] == 4
    assert result["per_task"] == {"default": {"exact_match": 0.0, "n": 1}, "right": {"exact_match": 1.0, "n": 2},
                                  "wrong": {"exact_match": 0.0, "n": 1}}
    assert model.training  # the caller's mode is restored


def test_mean_loss_equals_the_models_own_loss(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    records = [{"source": "echo: owl", "target": "owl"},
               {"source": "mirror: abc def", "target": "fed cba"},
               {"source": "z", "target": "a longer target string"}]
    with torch.no_grad():
        per_record = []
        for r in records:
            batch = collate([tokenize_example(tok, r["source"], r["target"], 64)], tok.pad_token_id)
            n_targets = int((batch["labels"] != -100).sum())
            per_record.append((model(**batch).loss.item(), n_targets))
    assert evaluate.mean_loss(model, tok, records[:1], max_length=64) == pytest.approx(per_record[0][0], rel=1e-5)
    # Several records in padded batches: the token-weighted mean of the single-record losses.
    expected = sum(l * n for l, n in per_record) / sum(n for _, n in per_record)
    assert evaluate.mean_loss(model, tok, records, batch_size=2, max_length=64) == pytest.approx(expected, rel=1e-5)
    records[0]["task_name"] = "copy"
    by_task = evaluate.loss_by_task(model, tok, records, max_length=64)
    assert by_task["copy"] == pytest.approx(per_record[0][0], rel=1e-5) and set(by_task) == {"copy", "default"}


def _manual_choice_scores(model, tok, source: str, choices: list[str], normalise: bool) -> list[float]:
    """log p(choice + EOS | BOS prompt), one unpadded forward per choice, via a full log_softmax."""
    scores = []
    prompt = [tok.bos_token_id] + tok(format_prompt(source), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for c in choices:
            target = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0], -1)
            s = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))
            scores.append(s / len(target) if normalise else s)
    return scores


@pytest.mark.parametrize("normalise", [False, True])
def test_choice_accuracy_picks_the_likeliest_choice(tiny_model_and_tokenizer, normalise):
    model, tok = tiny_model_and_tokenizer
    questions = [("echo: cat", ["cat", "dog", "a much longer distractor"]),
                 ("mirror: ab", ["ba", "ab"]), ("caps: sun", ["SUN", "sun", "Sun", "s"])]
    best, worst = [], []
    for source, choices in questions:
        scores = _manual_choice_scores(model, tok, source, choices, normalise)
        assert len(set(scores)) == len(scores)  # no ties, so the expected answer is unambiguous
        hi, lo = max(range(len(choices)), key=scores.__getitem__), min(range(len(choices)), key=scores.__getitem__)
        best.append({"source": source, "choices": choices, "answer": hi, "task_name": "q"})
        worst.append({"source": source, "choices": choices, "answer": choices[lo]})  # answer given as text
    kw = dict(batch_size=3, length_normalize=normalise)  # batches cut across questions on purpose
    assert evaluate.choice_accuracy(model, tok, best, **kw)["accuracy"] == 1.0
    assert evaluate.choice_accuracy(model, tok, worst, **kw)["accuracy"] == 0.0
    mixed = evaluate.choice_accuracy(model, tok, best[:2] + worst[2:], **kw)
    assert mixed["accuracy"] == pytest.approx(2 / 3) and mixed["per_task"]["q"] == {"accuracy": 1.0, "n": 2}


def test_choice_accuracy_rejects_a_bad_answer(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="not one of the choices"):
        evaluate.choice_accuracy(model, tok, [{"source": "s", "choices": ["a", "b"], "answer": "c"}])
    with pytest.raises(ValueError, match="out of range"):
        evaluate.choice_accuracy(model, tok, [{"source": "s", "choices": ["a", "b"], "answer": 2}])


@pytest.mark.parametrize("raw, clean", [("abc", "abc"), ("  abc  \nmore", "abc"), ("\n\nabc\n", "abc"), ("", "")])
def test_answers_are_stripped_and_cut_at_the_first_newline(raw, clean):
    assert evaluate._clean_answer(raw) == clean
