"""`tclora merge` on adapters saved by plain PEFT: mixed ranks, alphas, rsLoRA, patterns, Hub-style names.

Expected deltas come from PEFT itself (``LoraLayer.get_delta_weight`` of the models that saved the
adapters, and of the merged adapter loaded back with ``PeftModel.from_pretrained``), not from our reader.
"""

import hashlib
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from pipelines import cli
from tclora import demo_corpus
from tclora.adapters import AdapterError, load_factors
from tclora.config import MergeSection
from tclora.data import write_jsonl
from tclora.peft_merge import merge_peft_adapters

PREFIX = "base_model.model."
# Two adapters as a user might bring them: different ranks, alphas, rsLoRA, per-module patterns, and
# different target modules (o_proj only in the second).
LORAS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj"],
              rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 4}),
}


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW per adapted module, (d_out, d_in), keyed by the base model's module path."""
    return {name.removeprefix(PREFIX): m.get_delta_weight("default").detach().clone()
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def plain_peft_adapters(tiny_base, tmp_path_factory):
    """name -> (directory, PEFT's deltas): adapters saved by get_peft_model(...).save_pretrained."""
    out = {}
    for i, (name, kwargs) in enumerate(LORAS.items()):
        torch.manual_seed(10 + i)  # init_lora_weights=False: random, non-zero B (a trained-looking adapter)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                               LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs))
        path = tmp_path_factory.mktemp(f"peft-{name}")
        model.save_pretrained(path)
        out[name] = (path, peft_deltas(model))
    return out


def test_linear_of_plain_peft_adapters_is_the_exact_weighted_sum_of_their_deltas(plain_peft_adapters, tiny_base,
                                                                                tmp_path):
    (dir_a, d_a), (dir_b, d_b) = plain_peft_adapters["a"], plain_peft_adapters["b"]
    weights = [0.7, -0.3]  # a negative weight subtracts, exactly
    info = merge_peft_adapters([dir_a, dir_b], tmp_path / "out", ["linear"], weights=weights,
                               merge_cfg=MergeSection(params={"linear": {"scale": 1.0}}))
    assert info["format"] == "peft_adapter" and info["method"] == "linear" and not info["tuned"]
    merged = peft_deltas(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base),
                                                   str(tmp_path / "out")))
    assert set(merged) == set(d_a) | set(d_b)  # o_proj: adapted by b only, a counts as zero there
    for module, got in merged.items():
        zero = torch.zeros_like(got)
        expected = weights[0] * d_a.get(module, zero) + weights[1] * d_b.get(module, zero)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=module)
    saved = json.loads((tmp_path / "out" / "merge.json").read_text())
    for given, path in zip(saved["inputs"], [dir_a, dir_b]):
        assert given["sha256"] == {f: hashlib.sha256((path / f).read_bytes()).hexdigest()
                                   for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert saved["weights"] == weights and saved["base_model"] == str(tiny_base)


def test_cli_tunes_several_methods_on_validation_and_writes_the_best(plain_peft_adapters, tmp_path, capsys):
    validation = tmp_path / "val.jsonl"
    write_jsonl(validation, demo_corpus.generate_split("validation", 2, seed=0))
    dirs = [str(plain_peft_adapters[n][0]) for n in LORAS]
    rc = cli.main(["merge", "--adapters", *dirs, "--method", "linear,ties,cp", "--validation", str(validation),
                   "--out", str(tmp_path / "best"), "--set", "eval.max_new_tokens=4",
                   "--set", "merge.tune_grid={ties: {scale: [0.5, 1.0], density: [0.5]}}"])
    assert rc == 0
    saved = json.loads((tmp_path / "best" / "merge.json").read_text())
    assert saved["tuned"] and set(saved["validation"]) == {"linear", "ties", "cp"}
    assert saved["validation"][saved["method"]] == max(saved["validation"].values())  # the argmax is written
    printed = capsys.readouterr().out
    assert all(m in printed for m in ("linear", "ties", "cp")) and "<- written" in printed
    if saved["format"] == "peft_adapter":
        assert load_factors(tmp_path / "best")
    else:  # ties: a dense result, written as a merged checkpoint
        assert (tmp_path / "best" / "model.safetensors").is_file()


def test_hub_style_names_resolve_through_the_hf_cache(plain_peft_adapters, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    cache, commit = tmp_path / "hub", "0" * 40
    repo = cache / "models--acme--lora-a"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / f).write_bytes((plain_peft_adapters["a"][0] / f).read_bytes())
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    info = merge_peft_adapters(["acme/lora-a", plain_peft_adapters["b"][0]], tmp_path / "out", ["cat"])
    assert info["inputs"][0]["name"] == "acme/lora-a" and info["inputs"][0]["path"] == str(snapshot)
    with pytest.raises(AdapterError, match="acme/missing"):  # offline and not cached: named, not a Hub traceback
        merge_peft_adapters(["acme/missing", plain_peft_adapters["b"][0]], tmp_path / "out2", ["cat"])


def test_bad_inputs_are_named(plain_peft_adapters, tmp_path, capsys):
    dirs = [plain_peft_adapters[n][0] for n in LORAS]
    with pytest.raises(AdapterError, match="nowhere/at-all/x"):
        merge_peft_adapters([dirs[0], "nowhere/at-all/x"], tmp_path / "o1")
    with pytest.raises(ValueError, match="needs validation rows"):
        merge_peft_adapters(dirs, tmp_path / "o2", ["cp", "ties"])
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        merge_peft_adapters(dirs, tmp_path / "o3", weights=[1, 1, 1])
    wide = dict(json.loads((dirs[0] / "adapter_config.json").read_text()))
    other = tmp_path / "other-base"  # same module names, another hidden size: another base model
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps(wide))
    from safetensors.torch import load_file, save_file

    tensors = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v
               for k, v in load_file(dirs[0] / "adapter_model.safetensors").items()}
    save_file(tensors, other / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="different base models"):
        merge_peft_adapters([dirs[0], other], tmp_path / "o4")
    assert cli.main(["merge", "--adapters", str(dirs[0]), "--method", "nope", "--out", str(tmp_path / "o5")]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_dense_result_is_a_merged_checkpoint_holding_base_plus_the_update(plain_peft_adapters, tiny_base, tmp_path):
    (dir_a, d_a), (dir_b, d_b) = plain_peft_adapters["a"], plain_peft_adapters["b"]
    # DARE keeping every entry (density 1) with linear combine is the plain weighted sum, returned dense.
    info = merge_peft_adapters([dir_a, dir_b], tmp_path / "out", ["dare"], weights=[1.0, 0.5],
                               merge_cfg=MergeSection(params={"dare": {"density": 1.0, "scale": 0.5}}))
    assert info["format"] == "merged_model"
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_base).named_parameters())
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    for module in set(d_a) | set(d_b):
        zero = torch.zeros_like(base[f"{module}.weight"])
        expected = 0.5 * (d_a.get(module, zero) + 0.5 * d_b.get(module, zero))
        torch.testing.assert_close(merged[f"{module}.weight"] - base[f"{module}.weight"], expected,
                                   atol=1e-6, rtol=1e-5, msg=module)
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["params"]["density"] == 1.0
