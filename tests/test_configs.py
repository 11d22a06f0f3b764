"""configs/*.yaml load with the real schema and describe runs that can work."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from tclora.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# --- Real-model configs: configs/phi3-flan.yaml, configs/mistral7b-flan.yaml -------------------------

# Linear layers of one decoder block, as named in transformers' modeling_phi3.py (Phi3Attention.qkv_proj /
# o_proj, Phi3MLP.gate_up_proj / down_proj: q/k/v and gate/up are fused) and modeling_mistral.py (separate
# q/k/v/o_proj, gate/up/down_proj). test_known_names_match_transformers checks them against the installed
# transformers, so a rename upstream fails here rather than at step 0 on a GPU cluster.
BLOCK_LINEARS = {
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}
REAL_CONFIGS = {
    "phi3-flan.yaml": ("phi3", "microsoft/Phi-3-mini-4k-instruct"),
    "mistral7b-flan.yaml": ("mistral", "mistralai/Mistral-7B-v0.1"),
}


def _tiny_linear_names(arch: str) -> set[str]:
    """Leaf names of every nn.Linear in a 1-layer, hidden-32 model of ``arch``, random weights, no download."""
    from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM

    config_cls, model_cls = {"phi3": (Phi3Config, Phi3ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    # Token ids inside the 64-token vocabulary (Phi-3's default pad id 32000 is not).
    cfg = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = model_cls(cfg)
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def linear_names() -> dict[str, set[str]]:
    return {arch: _tiny_linear_names(arch) for arch in BLOCK_LINEARS}


def test_known_names_match_transformers(linear_names):
    for arch, names in linear_names.items():
        assert names - {"lm_head"} == BLOCK_LINEARS[arch], arch


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_model_config_loads_the_reference_setting(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.name_or_path == REAL_CONFIGS[name][1]
    assert cfg.model.dtype == "bfloat16" and not cfg.model.trust_remote_code
    assert cfg.cluster.k == 10 and cfg.cluster.sample_fraction == 0.2
    assert cfg.merge.cp_rank == 4 and "cp" in cfg.merge.methods and "svd" in cfg.merge.methods
    assert cfg.train.lr == 1e-4 and cfg.train.sparse_lr_multiplier == 10
    # Several adapters per GPU, fused on one base copy (issue 16): ZeRO-0 and checkpointed activations.
    assert cfg.train.fused and cfg.train.clusters_per_run >= 2 and cfg.train.zero_stage == 0
    assert cfg.train.num_workers == 1 and cfg.train.gradient_checkpointing
    assert cfg.train.max_concurrent * cfg.train.clusters_per_run >= cfg.cluster.k  # every cluster in one wave
    assert cfg.train.gpus_per_worker >= 1 and cfg.eval.num_gpus >= 1
    # An autoscaling cluster starts without GPUs: the concurrency cannot be derived from it at launch.
    assert cfg.train.max_concurrent is not None
    assert cfg.data.path != "demo" and cfg.data.eval_paths


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_model_config_targets_exist_in_the_architecture(name, linear_names):
    arch = REAL_CONFIGS[name][0]
    targets = set(load_config(ROOT / "configs" / name).lori.target_modules)
    assert targets <= linear_names[arch], f"{name}: no such linear layer(s) {targets - linear_names[arch]}"
    # LoRI adapts every attention and MLP projection; the output head is never a target.
    assert targets == BLOCK_LINEARS[arch]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_model_config_header_overrides_are_valid(name):
    """Every `--set` in the header's example commands names a real key with a valid value."""
    text = (ROOT / "configs" / name).read_text()
    header = re.match(r"(?:#.*\n)+", text).group(0)
    commands = [line.lstrip("# ") for line in header.splitlines() if "--set" in line]
    assert commands
    for command in commands:
        argv = shlex.split(command.rstrip("\\"))
        overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        load_config(ROOT / "configs" / name, overrides)
