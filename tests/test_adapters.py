"""PEFT round trips: saved adapters load in plain PEFT, factor views give the same logits."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tclora import adapters, lori
from tclora.config import LoRISection
from tclora.merge import LowRank
from tclora.train import TorchEngine, train_loop
from tests.helpers import random_batches, tiny_llama

CFG = LoRISection(rank=4, alpha=8, sparsity=0.5)
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    model = lori.attach_lori(tiny_llama(), CFG, seed=1, base_model_name_or_path="tiny-test")
    train_loop(TorchEngine(model, lr=1e-2), random_batches(6), 6)
    masks = lori.extract_masks(lori.lora_b_params(model), CFG.sparsity)
    lori.save_lori_adapter(model, out, masks, {"seed": 1})
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    return out, logits


def test_saved_adapter_loads_in_plain_peft_with_same_logits(trained_adapter):
    path, expected = trained_adapter
    assert (path / "adapter_model.safetensors").is_file() and (path / "lori_mask.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    keys = load_file(str(path / "adapter_model.safetensors")).keys()
    assert any("lora_A" in k for k in keys)  # A is in the file: vLLM cannot rebuild it from a seed
    loaded = PeftModel.from_pretrained(tiny_llama(), str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, expected, atol=1e-5)


def test_factor_view_applied_to_weights_matches_peft(trained_adapter):
    path, expected = trained_adapter
    factors = adapters.load_factors(path)
    assert len(factors) == 2 * 7 and all(f.rank == 4 for f in factors.values())
    base = tiny_llama()
    before = base.model.layers[0].self_attn.q_proj.weight.clone()
    with adapters.deltas_applied(base, factors):
        with torch.no_grad():
            assert torch.allclose(base(input_ids=IDS).logits, expected, atol=1e-5)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, before)  # restored


def test_export_follows_vllm_rules_and_round_trips(trained_adapter, tmp_path):
    path, expected = trained_adapter
    factors = adapters.load_factors(path)
    # Rank 12 (e.g. a concatenation of three rank-4 adapters) must be padded up to vLLM's 16.
    wide = {m: LowRank(torch.cat([f.B, f.B, -f.B], 1), torch.cat([f.A, f.A, f.A], 0)) for m, f in factors.items()}
    out = adapters.save_factors(wide, tmp_path / "export", "tiny-test")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 16
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False and cfg["bias"] == "none"
    assert not cfg.get("modules_to_save")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.shape[0] == 16 for k, t in tensors.items() if "lora_A" in k)
    assert all(t.shape[1] == 16 for k, t in tensors.items() if "lora_B" in k)
    # B + B - B == B: the padded export must give the original adapter's logits in plain PEFT.
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=IDS).logits, expected, atol=1e-4)


def test_vllm_rank_padding():
    assert [adapters.vllm_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(adapters.AdapterError, match="513"):
        adapters.vllm_rank(513)


def test_exported_config_lists_target_modules_sorted(tmp_path):
    """PEFT keeps target_modules as a set, whose order follows the process's hash seed: unsorted, one merge
    saved by two processes (a retried merge/eval call) differs byte for byte."""
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    factors = {f"model.layers.0.m.{n}": LowRank(torch.ones(4, 2), torch.ones(2, 4)) for n in names}
    adapters.save_factors(factors, tmp_path, "tiny-test", pad_for_vllm=False)
    assert json.loads((tmp_path / adapters.ADAPTER_CONFIG).read_text())["target_modules"] == sorted(names)


def test_incompatible_adapters_are_named(trained_adapter, tmp_path):
    path, _ = trained_adapter
    other = lori.attach_lori(tiny_llama(), LoRISection(rank=4, alpha=8, target_modules=["q_proj"]), seed=0,
                             base_model_name_or_path="tiny-test")
    other.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(adapters.AdapterError, match="other.*different modules"):
        adapters.check_compatible([path, tmp_path / "other"])
    with pytest.raises(adapters.AdapterError, match="missing.*adapter_config"):
        adapters.load_factors(tmp_path / "missing")


def test_merged_model_saves_as_plain_hf_checkpoint(trained_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    path, expected = trained_adapter
    base = tiny_llama()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    out = adapters.save_merged_model(base, tok, adapters.load_factors(path), tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, expected, atol=1e-4)
