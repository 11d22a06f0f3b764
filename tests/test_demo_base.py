"""The demo base: word tokenizer round trips, plain HF checkpoint, build-once cache, atomicity, pre-training."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tclora import demo_base, demo_corpus
from tclora.models import load_base


def test_word_tokenizer_round_trips_demo_text_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    demo_base.build_word_tokenizer(padding_side="left").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    texts = [demo_corpus.pretrain_text(rng) for _ in range(200)]
    texts += [r["source"] + "\n" + r["target"] for r in demo_corpus.generate_split("mc_test", 3, seed=0)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text, text
        assert tok(text)["input_ids"] == [tok.bos_token_id] + ids  # BOS by default, like Llama
    # One token per word, space, digit or symbol: "reverse_words(box cup) = cup box" is 14 tokens.
    assert len(tok("reverse_words(box cup) = cup box", add_special_tokens=False)["input_ids"]) == 14
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.padding_side == "left" and len(tok) == len(demo_base.SPECIALS) + len(demo_corpus.vocabulary())
    # Special-token text in data is never turned into a control token; unknown words are <unk>.
    assert tok.eos_token_id not in tok("a</s>", add_special_tokens=False)["input_ids"]
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_pretrain_batch_packs_the_tokenizers_own_ids():
    """The batch looks words up without calling the tokenizer: the ids must be the tokenizer's, packed as
    BOS doc EOS BOS doc ... and cut at seq_len, with the same documents (the same rng draws)."""
    tok = demo_base.build_word_tokenizer()
    batch = demo_base.pretrain_batch(tok, random.Random(3), batch=4, seq_len=40)
    rng, rows = random.Random(3), []
    for _ in range(4):
        ids: list[int] = []
        while len(ids) < 40:
            text = demo_corpus.pretrain_text(rng)
            ids += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        rows.append(ids[:40])
    assert batch.shape == (4, 40) and batch.tolist() == rows


def test_pretraining_lowers_loss_on_the_mixture(tiny_base, tiny_base_spec):
    from transformers import LlamaForCausalLM

    model, tok = load_base(str(tiny_base))
    torch.manual_seed(tiny_base_spec.seed)
    random_init = LlamaForCausalLM(demo_base.demo_llama_config(tiny_base_spec))
    trained, untrained = demo_base.pretrain_loss(model, tok), demo_base.pretrain_loss(random_init, tok)
    assert untrained == pytest.approx(torch.log(torch.tensor(float(len(tok)))).item(), abs=0.3)  # ~uniform
    assert trained < untrained - 1.0
    manifest = json.loads((Path(tiny_base) / "manifest.json").read_text())
    assert set(manifest["notation_accuracy"]) == set(demo_corpus.SKILLS)


def test_demo_base_is_a_plain_safetensors_checkpoint(tiny_base, tiny_base_spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in Path(tiny_base).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert model.config.model_type == "llama"
    assert model.config.hidden_size == tiny_base_spec.hidden
    assert model.config.num_hidden_layers == tiny_base_spec.layers
    ids = torch.tensor([tok("copy me")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_second_build_is_a_cached_no_op(tiny_base, tiny_base_spec):
    weights = Path(tiny_base) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = demo_base.build_demo_base(Path(tiny_base).parent, tiny_base_spec)
    assert again == tiny_base
    assert weights.stat().st_mtime_ns == before
    assert time.perf_counter() - started < 2.0  # hashing a few files, no training
    # A different spec is a different cache entry.
    assert replace(tiny_base_spec, seed=1).digest() != tiny_base_spec.digest()


def test_leftover_temp_dir_and_unfinished_checkpoint_are_not_loaded(tmp_path, tiny_base, tiny_base_spec):
    spec = replace(tiny_base_spec, pretrain_steps=2)
    final = tmp_path / f"demo-base-{spec.digest()}"
    # What a killed build leaves: a temp sibling, and (say, a copy interrupted half way) a final
    # directory with no manifest and a truncated weights file.
    stale = tmp_path / f".{final.name}.tmp-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    shutil.copytree(tiny_base, final)
    (final / "manifest.json").unlink()
    (final / "model.safetensors").write_bytes(b"truncated")

    path = demo_base.build_demo_base(tmp_path, spec)
    assert path == final and not stale.exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == spec.key()
    model, _ = load_base(str(path))  # the rebuilt, complete checkpoint loads
    assert model.config.hidden_size == spec.hidden


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="heads"):
        demo_base.DemoBaseSpec(hidden=30, heads=4)
    with pytest.raises(ValueError, match="pretrain_steps"):
        demo_base.DemoBaseSpec(pretrain_steps=-1)
