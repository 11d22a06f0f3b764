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
    # Words of the demo base's word-level vocabulary (tclora.demo_corpus.vocabulary): "box" and "BOX" differ in case.
    train = [{"source": s, "target": "box"} for s in ["red", "one two", "x y z", "hello there", "42"]]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for batch in batches(train, tok, batch_size=5, max_length=64, steps=40, seed=0):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    records = [{"source": "fish", "target": " box\n", "task_name": "right"},  # whitespace is stripped
               {"source": "blue moon", "target": "box", "task_name": "right"},
               {"source": "fish", "target": "cup", "task_name": "wrong"},
               {"source": "tree", "target": "BOX"}]  # case counts; no task_name -> "default"
    result = evaluate.exact_match(model, tok, records, batch_size=3, max_new_tokens=8, return_predictions=True)
    assert result["predictions"] == ["box"] * 4
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
    expected = sum(loss * n for loss, n in per_record) / sum(n for _, n in per_record)
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
    # Choices from the demo base's word-level vocabulary, so no two of them are the same unknown token.
    questions = [("echo: box", ["box", "cup", "a red cup and a blue box"]),
                 ("mirror: red", ["red", "blue"]), ("caps: cup", ["CUP", "cup", "BOX", "a"])]
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


# ---------------------------------------------------------------- one scoring path, Rouge-L, chat template
def test_summarize_gives_record_and_task_averages():
    s = evaluate.summarize(["a", "a", "b"], {"exact_match": [True, False, True], "rouge_l": [1.0, 0.5, 0.25]})
    assert s["n"] == 3 and s["exact_match"] == pytest.approx(2 / 3) and s["rouge_l"] == pytest.approx(1.75 / 3)
    assert s["macro"] == {"exact_match": pytest.approx(0.75), "rouge_l": pytest.approx((0.75 + 0.25) / 2)}
    assert s["per_task"] == {"a": {"exact_match": 0.5, "rouge_l": 0.75, "n": 2},
                             "b": {"exact_match": 1.0, "rouge_l": 0.25, "n": 1}}
    assert evaluate.summarize([], {"accuracy": []}) == {"n": 0, "per_task": {}, "macro": {"accuracy": 0.0},
                                                       "accuracy": 0.0}


def test_rouge_l_is_the_lcs_f_measure():
    # LCS("the cat sat", "the cat sat down") = 3 words: P = 3/3, R = 3/4, F = 2PR / (P + R) = 6/7.
    got = evaluate.rouge_l(["the cat sat", "dog", ""], ["the cat sat down", "the cat", "x"])
    assert got == [pytest.approx(6 / 7), 0.0, 0.0]


def _word_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "hello", "world", "USER:", "=>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def test_chat_template_switch_builds_prompts_through_the_template():
    template = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} =>{% endif %}"
    tok = _word_tokenizer(template)
    ids = evaluate.prompt_ids(tok, "hello world", None, chat_template=True)
    assert tok.convert_ids_to_tokens(ids) == ["USER:", "hello", "world", "=>"]  # the template's rendering
    plain = evaluate.prompt_ids(tok, "hello world", None, chat_template=False)
    assert plain[0] == tok.bos_token_id and plain[1:] == tok(evaluate.format_prompt("hello world"),
                                                             add_special_tokens=False)["input_ids"]
    # Asked for, but the tokenizer has no template (the demo base): the plain prompt.
    no_template = _word_tokenizer()
    assert evaluate.prompt_ids(no_template, "hello", None, chat_template=True) == \
        evaluate.prompt_ids(no_template, "hello", None, chat_template=False)


def test_multiple_choice_rows_score_by_likelihood_beside_generated_ones(tiny_model_and_tokenizer):
    """A split mixing generative and multiple-choice rows (the demo's eval splits travel together): the MC
    rows are answered with their likeliest choice (length-normalised, by hand here), the others by greedy
    generation, and one exact-match table counts both."""
    from tclora import compare
    from tclora.config import EvalSection

    model, tok = tiny_model_and_tokenizer
    source, choices = "echo: box", ["box", "cup", "a red cup and a blue box"]
    scores = _manual_choice_scores(model, tok, source, choices, True)
    hi, lo = max(range(3), key=scores.__getitem__), min(range(3), key=scores.__getitem__)
    generated = _reference_greedy(model, tok, "x", 12)
    records = [{"source": source, "target": choices[hi], "choices": choices, "answer": hi, "task_name": "right"},
               {"source": source, "target": choices[lo], "choices": choices, "answer": lo, "task_name": "wrong"},
               {"source": "x", "target": generated, "task_name": "gen"}]
    cfg = EvalSection(batch_size=2, max_new_tokens=12)
    assert compare.predict(model, tok, records, cfg) == [choices[hi], choices[hi], generated]
    row = compare.score_records(model, tok, records, cfg)
    assert row["per_task"] == {"right": 1.0, "wrong": 0.0, "gen": 1.0}
