"""Demo tokenizer and base: HF round trips, build-once caching, atomicity, pre-training, MiniLM lookup."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tclora import models


def test_char_tokenizer_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    models.build_char_tokenizer(padding_side="left").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "  Hello, world!\n\n  two  spaces ~{x}|  \nend "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one id per character
    assert tok.decode(ids) == text
    assert tok(text)["input_ids"] == [tok.bos_token_id] + ids  # BOS by default, like Llama
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert tok.padding_side == "left" and len(tok) == 100
    # Special-token text in data is spelled out, never turned into control tokens.
    assert tok.decode(tok("a</s>", add_special_tokens=False)["input_ids"]) == "a</s>"
    assert tok("é\t", add_special_tokens=False)["input_ids"] == [tok.unk_token_id] * 2


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
    again = models.build_demo_base(Path(tiny_base).parent, tiny_base_spec)
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

    path = models.build_demo_base(tmp_path, spec)
    assert path == final and not stale.exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == spec.key()
    model, _ = models.load_base(str(path))  # the rebuilt, complete checkpoint loads
    assert model.config.hidden_size == spec.hidden


def test_pretraining_lowers_loss_on_the_generic_mixture(tiny_base, tiny_base_spec):
    from transformers import LlamaForCausalLM

    model, tok = models.load_base(str(tiny_base))
    torch.manual_seed(tiny_base_spec.seed)
    random_init = LlamaForCausalLM(models.demo_llama_config(tiny_base_spec))
    trained, untrained = models.pretrain_loss(model, tok), models.pretrain_loss(random_init, tok)
    assert untrained == pytest.approx(torch.log(torch.tensor(100.0)).item(), abs=0.3)  # ~uniform over vocab
    assert trained < untrained - 1.0


def test_generic_mixture_has_the_prompt_answer_shape():
    import random

    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = models.generic_example(rng)
        assert prompt.strip() and answer.strip() and "\n" not in prompt + answer
        assert all(32 <= ord(c) < 127 for c in prompt + answer)  # inside the char vocabulary


def test_generic_mixture_avoids_the_demo_corpus_wordings():
    import random
    import re

    demo_corpus = pytest.importorskip("tclora.demo_corpus")
    families = {**demo_corpus.FAMILIES, **demo_corpus.COMPOSITIONS}
    # The fixed text of every demo template, e.g. "Spell backwards:" or "- say it again."
    fixed = {p.strip().lower() for f in families.values() for t in f.templates for p in re.split(r"\{x\}", t)}
    fixed.discard("")
    rng = random.Random(0)
    for _ in range(500):
        prompt, _ = models.generic_example(rng)
        assert not [f for f in fixed if f in prompt.lower()], prompt


def test_load_base_demo_uses_the_cache(tiny_base, tiny_base_spec):
    model, tok = models.load_base("demo", cache_dir=Path(tiny_base).parent, demo_spec=tiny_base_spec)
    assert model.name_or_path == str(tiny_base)
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token_id == 0 and model.generation_config.eos_token_id == tok.eos_token_id


def test_load_base_for_a_model_config_section(tiny_base):
    from tclora.config import ModelSection

    model, tok = models.load_base_for(ModelSection(name_or_path=str(tiny_base), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16 and tok.pad_token_id is not None


def test_load_base_falls_back_to_eos_for_padding(tmp_path, tiny_base):
    ckpt = tmp_path / "no-pad"
    shutil.copytree(tiny_base, ckpt)
    cfg_path = ckpt / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    _, tok = models.load_base(str(ckpt))
    assert tok.pad_token == tok.eos_token == "</s>"


def test_load_base_rejects_unknown_dtype(tiny_base):
    with pytest.raises(ValueError, match="dtype"):
        models.load_base(str(tiny_base), dtype="float64")


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="heads"):
        models.DemoBaseSpec(hidden=30, heads=4)
    with pytest.raises(ValueError, match="pretrain_steps"):
        models.DemoBaseSpec(pretrain_steps=-1)


def test_packaged_minilm_resolves_and_encodes_offline():
    from sentence_transformers import SentenceTransformer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = models.resolve_embedding_model("all-MiniLM-L6-v2")
    assert path == models.resolve_embedding_model("sentence-transformers/all-MiniLM-L6-v2")
    assert (Path(path) / "model.safetensors").is_file()
    assert models.resolve_embedding_model("/some/local/model") == "/some/local/model"
    assert models.resolve_embedding_model("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    emb = SentenceTransformer(path, device="cpu").encode(["count the words", "reverse this"])
    assert emb.shape == (2, 384)
