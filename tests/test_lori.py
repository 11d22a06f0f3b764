"""LoRI: frozen seeded A, exact mask fractions, masked entries stay zero through AdamW."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tclora import lori
from tclora.config import LoRISection
from tclora.train import TorchEngine, train_loop
from tests.helpers import random_batches, tiny_llama

CFG = LoRISection(rank=4, alpha=8, sparsity=0.75)


def test_a_is_seeded_frozen_and_b_starts_at_zero():
    m1 = lori.attach_lori(tiny_llama(), CFG, seed=7)
    m2 = lori.attach_lori(tiny_llama(), CFG, seed=7)
    m3 = lori.attach_lori(tiny_llama(), CFG, seed=8)
    a1, a2, a3 = (dict(lori_a(m)) for m in (m1, m2, m3))
    assert a1.keys() == a2.keys() and len(a1) == 2 * 7  # 2 layers x 7 target modules
    for name in a1:
        assert torch.equal(a1[name], a2[name])
        assert not torch.allclose(a1[name], a3[name])
    assert all(not p.requires_grad for n, p in m1.named_parameters() if "lora_A" in n)
    assert all(p.requires_grad for n, p in m1.named_parameters() if "lora_B" in n)
    assert all(torch.count_nonzero(b) == 0 for b in lori.lora_b_params(m1).values())
    # Only B trains: exactly sum(d_out * r) trainable parameters.
    trainable = sum(p.numel() for p in m1.parameters() if p.requires_grad)
    assert trainable == sum(b.numel() for b in lori.lora_b_params(m1).values())


def test_lora_mode_trains_a_and_b_from_the_same_seeded_start():
    # Plain LoRA (TC-LoRA's adapters): same seeded A as LoRI, but trainable, so an AdamW step moves it.
    lora_cfg = LoRISection(rank=4, alpha=16, mode="lora")
    lora, frozen = lori.attach_lori(tiny_llama(), lora_cfg, seed=7), lori.attach_lori(tiny_llama(), CFG, seed=7)
    start = dict(lori_a(lora))
    assert all(torch.equal(start[n], a) for n, a in lori_a(frozen))
    assert all(p.requires_grad for n, p in lora.named_parameters() if "lora_A" in n or "lora_B" in n)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == (sum(b.numel() for b in lori.lora_b_params(lora).values())
                         + sum(a.numel() for a in start.values()))
    train_loop(TorchEngine(lora, lr=1e-2), random_batches(3), steps=3)
    moved = dict(lori_a(lora))
    assert all(not torch.equal(moved[n], start[n]) for n in start)


def lori_a(model):
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
            yield name, module.lora_A["default"].weight.detach().clone()


def test_unknown_target_module_names_the_key():
    with pytest.raises(ValueError, match="lori.target_modules.*'qkv_proj'"):
        lori.attach_lori(tiny_llama(), LoRISection(target_modules=["q_proj", "qkv_proj"]), seed=0)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_mask_keeps_exactly_the_requested_fraction(scope, sparsity):
    gen = torch.Generator().manual_seed(0)
    weights = {f"m{i}": torch.randn(16 + 8 * i, 4, generator=gen) * (i + 1) for i in range(3)}
    weights["m0"][0, :] = 1.0  # ties must not push the count over
    masks = lori.extract_masks(weights, sparsity, scope)
    total = sum(w.numel() for w in weights.values())
    kept = sum(int(m.sum()) for m in masks.values())
    if scope == "global":
        assert kept == round((1 - sparsity) * total)
        # Global top-k: every kept magnitude is at least every dropped one.
        kept_vals = torch.cat([w[m].abs() for w, m in zip(weights.values(), masks.values())])
        dropped = torch.cat([w[~m].abs() for w, m in zip(weights.values(), masks.values())])
        if len(dropped) and len(kept_vals):
            assert kept_vals.min() >= dropped.max()
    else:
        for n, w in weights.items():
            assert int(masks[n].sum()) == round((1 - sparsity) * w.numel())


def test_global_mask_favours_layers_with_larger_updates():
    weights = {"small": torch.full((8, 4), 0.1), "large": torch.full((8, 4), 5.0)}
    masks = lori.extract_masks(weights, 0.5, "global")
    assert masks["large"].all() and not masks["small"].any()


def test_sparse_phase_keeps_masked_entries_exactly_zero_through_adamw():
    model = lori.attach_lori(tiny_llama(), CFG, seed=0)
    a_before = dict(lori_a(model))
    # A dense phase first so the mask reflects learned magnitudes.
    train_loop(TorchEngine(model, lr=1e-2), random_batches(5), 5)
    masks = lori.extract_masks(lori.lora_b_params(model), CFG.sparsity)
    masked = lori.MaskedB(model, masks)
    masked.reset_()
    engine = TorchEngine(model, lr=1e-1, weight_decay=0.1)  # large lr and decay: any leak would show
    # Without the grad hook, Adam would move masked entries; check the hook alone (no projection) too.
    train_loop(engine, random_batches(8, seed=1), 8, masked=None)
    for name, b in lori.lora_b_params(model).items():
        assert torch.count_nonzero(b[~masks[name]]) == 0, name
        assert torch.count_nonzero(b[masks[name]]) > 0, name
    train_loop(engine, random_batches(4, seed=2), 4, masked=masked)
    for name, b in lori.lora_b_params(model).items():
        assert torch.count_nonzero(b[~masks[name]]) == 0
    for name, a in lori_a(model):
        assert torch.equal(a, a_before[name])
    # Exactly the masked-in B entries are trainable parameters of LoRI-S.
    counts = lori.parameter_counts(masks, lori.lora_a_shapes(model))
    assert counts["lori_s"] == sum(int(m.sum()) for m in masks.values())
    assert counts["lori_s_fraction_of_lora"] < (1 - CFG.sparsity)


def test_masks_round_trip_through_safetensors_one_bit_per_entry(tmp_path):
    masks = {"a.b": torch.rand(64, 33) > 0.5, "c": torch.rand(4, 2) > 0.5}  # 33 columns: not a multiple of 8
    lori.save_masks(masks, tmp_path)
    loaded = lori.load_masks(tmp_path)
    assert loaded.keys() == masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks)
    stored = load_file(str(tmp_path / lori.MASK_FILE))
    assert stored["a.b"].numel() == math.ceil(64 * 33 / 8)


def test_masks_saved_one_byte_per_entry_still_load(tmp_path):
    masks = {"a.b": torch.rand(6, 3) > 0.5}
    save_file({n: m.to(torch.uint8) for n, m in masks.items()}, str(tmp_path / lori.MASK_FILE))
    assert torch.equal(lori.load_masks(tmp_path)["a.b"], masks["a.b"])
