"""Base loading (demo through the cache, dtype, pad fallback, config section) and the MiniLM lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tclora import models


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


