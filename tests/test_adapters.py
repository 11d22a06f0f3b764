"""PEFT round trips: saved adapters load in plain PEFT, factor views give the same logits."""

import json
import re

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
    assert adapters.vllm_rank(513) == 513  # above vLLM's largest listed rank: exported unpadded (warned)


def test_rank_above_512_exports_unpadded_with_a_warning(tmp_path, caplog):
    factors = {"model.layers.0.self_attn.q_proj": LowRank(torch.ones(4, 600), torch.ones(600, 4))}
    with caplog.at_level("WARNING", logger="tclora.adapters"):
        adapters.save_factors(factors, tmp_path / "merges" / "cat", "tiny-test")
    assert json.loads((tmp_path / "merges" / "cat" / adapters.ADAPTER_CONFIG).read_text())["r"] == 600
    assert "merges/cat: rank 600 exceeds vLLM's largest listed max_lora_rank 512" in caplog.text


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
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path, expected = trained_adapter
    base = tiny_llama()
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    out = adapters.save_merged_model(base, tok, adapters.load_factors(path), tmp_path / "merged")
    assert (out / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=IDS).logits, expected, atol=1e-4)


# ---------------------------------------------------------------- adapters trained elsewhere (issue 14)
# Expected deltas come from PEFT itself: merge_and_unload() weights minus the base weights.

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_adapter(out, config, model):
    """Save ``model`` wrapped with ``config`` (random non-zero B) and return PEFT's own deltas and logits."""
    from peft import get_peft_model

    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    with torch.no_grad():
        logits = peft_model(input_ids=IDS).logits
    merged = peft_model.merge_and_unload()
    deltas = {k.removesuffix(".weight"): v - before[k] for k, v in merged.state_dict().items()
              if k in before and not torch.equal(v, before[k])}
    return deltas, logits


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ATTN, "init_lora_weights": False, **kw})


def test_alpha_pattern_regex_key_scales_like_peft(tmp_path):
    expected, _ = _peft_adapter(tmp_path, _lora(alpha_pattern={"q_proj|v_proj": 32}), tiny_llama())
    factors = adapters.load_factors(tmp_path)
    assert set(factors) == set(expected) and len(factors) == 2 * len(ATTN)
    for module, delta in expected.items():
        assert_close_t(factors[module].dense(), delta)
    # The maths: q_proj and v_proj at 32/4, the others at 8/4, applied to the stored B·A.
    raw = load_file(str(tmp_path / adapters.ADAPTER_WEIGHTS))
    for module, scale in (("model.layers.1.self_attn.q_proj", 8.0), ("model.layers.1.self_attn.k_proj", 2.0)):
        key = adapters.PEFT_PREFIX + module
        assert_close_t(factors[module].dense(), scale * raw[f"{key}.lora_B.weight"] @ raw[f"{key}.lora_A.weight"])


def test_rslora_and_rank_pattern_scale_like_peft(tmp_path):
    config = _lora(use_rslora=True, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"o_proj": 3})
    expected, logits = _peft_adapter(tmp_path, config, tiny_llama())
    factors = adapters.load_factors(tmp_path)
    assert factors["model.layers.0.self_attn.q_proj"].rank == 2 and factors["model.layers.1.self_attn.q_proj"].rank == 4
    for module, delta in expected.items():
        assert_close_t(factors[module].dense(), delta)
    raw = load_file(str(tmp_path / adapters.ADAPTER_WEIGHTS))
    key = adapters.PEFT_PREFIX + "model.layers.0.self_attn.q_proj"  # alpha / sqrt(r) = 8 / sqrt(2)
    assert_close_t(factors["model.layers.0.self_attn.q_proj"].dense(),
                   8 / 2**0.5 * raw[f"{key}.lora_B.weight"] @ raw[f"{key}.lora_A.weight"])
    base = tiny_llama()
    with adapters.deltas_applied(base, factors), torch.no_grad():
        assert torch.allclose(base(input_ids=IDS).logits, logits, atol=1e-5)


def assert_close_t(actual, expected, atol=1e-6):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=1e-5), f"max diff {(actual - expected).abs().max():.3g}"


# (LoraConfig options, LlamaConfig overrides, what the error must name: the option and/or the tensor)
BIAS = {"attention_bias": True}
REFUSED = {
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {},
                        ["option modules_to_save", r"lm_head\.weight: a full weight"]),
    "dora": ({"use_dora": True}, {}, ["option use_dora", "lora_magnitude_vector: a DoRA"]),
    "embedding_lora": ({"target_modules": ATTN + ["embed_tokens"]}, {}, ["lora_embedding_A: LoRA on an embedding"]),
    "bias_all": ({"bias": "all"}, BIAS, ["option bias='all'", r"k_proj\.base_layer\.bias: a trained bias"]),
    "bias_lora_only": ({"bias": "lora_only"}, BIAS, ["option bias='lora_only'", r"q_proj\.base_layer\.bias"]),
    "lora_bias": ({"lora_bias": True}, {}, ["option lora_bias=True", r"lora_B\.bias: a LoRA bias"]),
    "trainable_tokens": ({"trainable_token_indices": [1, 2]}, {},
                         ["option trainable_token_indices", "trainable_tokens_delta"]),
    "pissa": ({"init_lora_weights": "pissa"}, {},
              ["option init_lora_weights='pissa'", "path_initial_model_for_weight_conversion"]),
    "olora": ({"init_lora_weights": "olora"}, {}, ["option init_lora_weights='olora'"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_weights_a_low_rank_merge_cannot_hold_are_refused_by_name(case, tmp_path):
    from peft import get_peft_model

    options, model_config, expected = REFUSED[case]
    get_peft_model(tiny_llama(**model_config), _lora(**options)).save_pretrained(str(tmp_path / case))
    with pytest.raises(adapters.AdapterError) as err:
        adapters.load_factors(tmp_path / case)
    message = str(err.value)
    assert message.startswith(str(tmp_path / case)) and "nothing was loaded" in message
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    assert re.search("retrain|convert|fold|merge those", message)  # and says what to do


def test_other_peft_methods_are_refused(tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "adalora"))
    with pytest.raises(adapters.AdapterError, match=r"(?s)adalora.*peft_type 'ADALORA'"):
        adapters.load_factors(tmp_path / "adalora")


def test_unknown_options_and_lora_variants_are_refused(tmp_path):
    path = tmp_path / "variant"
    lori.attach_lori(tiny_llama(), CFG, seed=0, base_model_name_or_path="tiny-test").save_pretrained(str(path))
    cfg = json.loads((path / adapters.ADAPTER_CONFIG).read_text())
    for option, value, hint in (("use_qalora", True, "LoRA variant"), ("lora_future_trick", {"x": 1}, "does not know")):
        (path / adapters.ADAPTER_CONFIG).write_text(json.dumps({**cfg, option: value}))
        with pytest.raises(adapters.AdapterError, match=f"(?s)variant.*option {option}=.*{hint}"):
            adapters.load_factors(path)


def test_lora_on_a_convolution_names_the_adapter_and_module(tmp_path):
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.head = torch.nn.Linear(8, 4)

    get_peft_model(Net(), LoraConfig(r=2, target_modules=["conv", "head"])).save_pretrained(str(tmp_path / "convnet"))
    with pytest.raises(adapters.AdapterError,
                       match=r"convnet: module 'conv' has lora_A \(2, 3, 3, 3\).*Linear layers only"):
        adapters.load_factors(tmp_path / "convnet")


def test_fan_in_fan_out_adapter_loads_in_the_right_orientation(tmp_path):
    """GPT-2 keeps Conv1D weights as (d_in, d_out); PEFT's fan_in_fan_out adds (s·B·A)ᵀ. attn.c_proj is square
    (32 x 32), so only the orientation, not the shape, can tell a right delta from a wrong one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)).eval()

    config = _lora(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    expected, logits = _peft_adapter(tmp_path, config, gpt2())
    factors = adapters.load_factors(tmp_path)
    assert factors["transformer.h.0.attn.c_proj"].shape == (32, 32)
    assert factors["transformer.h.0.attn.c_attn"].shape == (96, 32)  # logical (d_out, d_in)
    for module, delta in expected.items():  # PEFT's deltas are in Conv1D layout, (d_in, d_out)
        assert_close_t(factors[module].dense().T, delta)
    base = gpt2()
    with adapters.deltas_applied(base, factors), torch.no_grad():
        assert torch.allclose(base(input_ids=IDS).logits, logits, atol=1e-5)
    wrong = {m: f.dense().T.contiguous() for m, f in factors.items() if m.endswith("c_attn")}  # (32, 96)
    with pytest.raises(adapters.AdapterError, match=r"c_attn.*shape \(32, 96\).*\(96, 32\)"):
        adapters.add_deltas_(base, wrong)


def test_incomplete_or_unreadable_adapter_files_are_named(trained_adapter, tmp_path):
    from safetensors.torch import save_file

    path, _ = trained_adapter
    bad = tmp_path / "orphan"
    bad.mkdir()
    (bad / adapters.ADAPTER_CONFIG).write_text((path / adapters.ADAPTER_CONFIG).read_text())
    tensors = load_file(str(path / adapters.ADAPTER_WEIGHTS))
    dropped = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(bad / adapters.ADAPTER_WEIGHTS))
    with pytest.raises(adapters.AdapterError, match=r"(?s)orphan.*q_proj\.lora_B\.weight: has no matching lora_A"):
        adapters.load_factors(bad)
    (bad / adapters.ADAPTER_WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}")
    with pytest.raises(adapters.AdapterError, match=r"orphan: adapter_model.safetensors cannot be read"):
        adapters.load_factors(bad)
    (bad / adapters.ADAPTER_CONFIG).write_text('{"r": 4,')
    with pytest.raises(adapters.AdapterError, match=r"orphan: adapter_config.json is not valid JSON"):
        adapters.load_factors(bad)


def test_a_refused_delta_leaves_the_model_as_it_was():
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = {"model.layers.0.self_attn.q_proj": torch.ones(32, 32), "model.norm": torch.ones(32, 32)}
    with pytest.raises(adapters.AdapterError, match=r"'model.norm' is a LlamaRMSNorm"):
        with adapters.deltas_applied(base, deltas):
            pass
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_adapter_config_with_a_byte_order_mark_loads(trained_adapter, tmp_path):
    path, _ = trained_adapter
    copy = tmp_path / "bom"
    copy.mkdir()
    (copy / adapters.ADAPTER_CONFIG).write_bytes(b"\xef\xbb\xbf" + (path / adapters.ADAPTER_CONFIG).read_bytes())
    (copy / adapters.ADAPTER_WEIGHTS).write_bytes((path / adapters.ADAPTER_WEIGHTS).read_bytes())
    loaded, expected = adapters.load_factors(copy), adapters.load_factors(path)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[m].B, expected[m].B) for m in expected)


def test_an_adapter_for_another_base_is_named_with_its_module(trained_adapter):
    from transformers import GPT2Config, GPT2LMHeadModel

    path, _ = trained_adapter
    factors = adapters.load_factors(path)
    adapters.check_fits(tiny_llama(), factors, path)  # its own base: fine
    with pytest.raises(adapters.AdapterError, match=rf"{path.name}: module 'model.layers.0.mlp.down_proj' has an "
                       r"update of shape \(32, 64\).*layer is \(48, 64\)"):  # the first module in the file
        adapters.check_fits(tiny_llama(hidden_size=48), factors, path)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(adapters.AdapterError, match=rf"{path.name}: the base model has no module 'model.layers"):
        adapters.check_fits(gpt2, factors, path)
