"""Fused LoRI groups: each adapter equals the one trained alone (PEFT's own LoRA forward, the solo
recipe ``train_lori_adapter``), LoRI invariants per adapter, rows routed, resume equals uninterrupted."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tclora import data, demo_corpus, lori, multi_lori
from tclora.config import LoRISection, TrainSection
from tclora.train import TorchEngine, train_loop, train_lori_adapter

LORI = LoRISection(rank=4, alpha=8, sparsity=0.8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
TRAIN = TrainSection(steps=12, sparse_steps=10, batch_size=4, lr=3e-3, sparse_lr_multiplier=3.0, weight_decay=0.01)
SEEDS = [5, 6, 7]
MAX_LENGTH = 32
# float32 on CPU: fused and solo differ only by summation order in the matmuls (measured max |ΔB| 1e-7
# with |B| up to 0.14 after 22 AdamW steps).
ATOL, RTOL = 1e-6, 1e-5


def _records() -> list[list[dict]]:
    """Three demo families' training rows (20 each). Payloads of 3-5 words under varied templates: the
    adapters' micro-batches have different widths, so fusing pads them."""
    rows = demo_corpus.generate_split("train", 20, seed=0)
    tasks = sorted({r["task_name"] for r in rows})[:3]
    return [[r for r in rows if r["task_name"] == task] for task in tasks]


RECORDS = _records()


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """The three adapters trained alone (the solo recipe, PEFT layers) and fused in one group."""
    from tclora.models import load_base

    root = tmp_path_factory.mktemp("multi-lori")
    for t, seed in enumerate(SEEDS):
        model, tok = load_base(str(tiny_base))
        train_lori_adapter(model, tok, RECORDS[t], LORI, TRAIN, seed=seed, out_dir=root / f"solo-{t}",
                           max_length=MAX_LENGTH, base_model_name_or_path=str(tiny_base))
    model, tok = load_base(str(tiny_base))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    metas = multi_lori.train_lori_group(model, tok, RECORDS, LORI, TRAIN, seeds=SEEDS,
                                        out_dirs=[root / f"fused-{t}" for t in range(3)], max_length=MAX_LENGTH,
                                        base_model_name_or_path=str(tiny_base))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)  # base untouched
    return root, metas


@pytest.mark.parametrize("t", range(3))
def test_fused_adapter_equals_solo_adapter(trained, t):
    root, _ = trained
    solo, fused = root / f"solo-{t}", root / f"fused-{t}"
    # Same files, same config bytes: the fused group saves through the single-adapter path.
    assert sorted(p.name for p in fused.iterdir()) == sorted(p.name for p in solo.iterdir())
    assert (fused / "adapter_config.json").read_bytes() == (solo / "adapter_config.json").read_bytes()
    want, got = load_file(str(solo / "adapter_model.safetensors")), load_file(str(fused / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=key)
        if "lora_A" in key:
            assert torch.equal(got[key], want[key])  # A is the seeded draw, never trained
    want_masks, got_masks = lori.load_masks(solo), lori.load_masks(fused)
    assert want_masks.keys() == got_masks.keys() and all(torch.equal(want_masks[k], got_masks[k]) for k in want_masks)
    solo_meta, fused_meta = (json.loads((d / lori.LORI_FILE).read_text()) for d in (solo, fused))
    for key in ("dense_loss_first", "dense_loss_last", "sparse_loss_first", "sparse_loss_last"):
        assert fused_meta[key] == pytest.approx(solo_meta[key], rel=1e-5)
    assert fused_meta["parameters"] == solo_meta["parameters"]


@pytest.mark.parametrize("t", range(3))
def test_fused_adapters_keep_lori_invariants_and_load_in_peft(trained, tiny_base, t):
    from tclora.models import load_base

    root, _ = trained
    adapter = root / f"fused-{t}"
    model = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(adapter))
    masks = lori.load_masks(adapter)
    b = lori.lora_b_params(model)
    assert b.keys() == masks.keys()
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round((1 - LORI.sparsity) * total)  # this adapter's own top-k
    for name, weight in b.items():
        assert torch.count_nonzero(weight[~masks[name]]) == 0, name  # masked B exactly zero
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, torch.nn.ModuleDict):
            key = name.removeprefix("base_model.model.")
            expected = lori.random_a(SEEDS[t], key, tuple(module.lora_A["default"].weight.shape))
            assert torch.equal(module.lora_A["default"].weight, expected), key
    # The group's masks are per adapter: each adapter ranks its own B's, so they differ between adapters.
    others = [lori.load_masks(root / f"fused-{u}") for u in range(3) if u != t]
    assert all(any(not torch.equal(masks[k], o[k]) for k in masks) for o in others)


def _fused_batch(tok, step_seed: int = 0) -> dict[str, torch.Tensor]:
    batches = [next(data.batches(RECORDS[t], tok, 4, MAX_LENGTH, 1, seed=step_seed + t)) for t in range(3)]
    return multi_lori.concat_batches(batches, tok.pad_token_id)


def _group_with_random_b(model) -> multi_lori.LoRIGroup:
    """The three adapters on ``model`` with non-zero B's, so every adapter's output depends on its rows."""
    group = multi_lori.LoRIGroup(model, LORI, SEEDS)
    with torch.no_grad():
        for b in group.lora_b_params().values():
            b.normal_(std=0.1)
    return group


def _b_grads(group: multi_lori.LoRIGroup, batch: dict, only: int | None = None,
             merge_aware: float = 0.0) -> dict[str, torch.Tensor]:
    """Each B's gradient of the summed per-adapter losses (or of adapter ``only``'s loss) on a fused batch, plus
    ``merge_aware`` x the merged sum's losses (train.merge_aware's term, multi_lori.summed_losses)."""
    model = group.model
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = multi_lori.adapter_losses(out.logits, batch["labels"], len(group))
    loss = losses.sum() if only is None else losses[only]
    if merge_aware:
        loss = loss + merge_aware * multi_lori.summed_losses(model, group, batch).sum()
    loss.backward()
    return {n: b.grad.clone() for n, b in group.lora_b_params().items()}


def test_rows_of_one_adapter_never_touch_another_adapters_gradient(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    group = _group_with_random_b(model)
    batch = _fused_batch(tok)
    grads = functools.partial(_b_grads, group)

    full = grads(batch)
    # Adapter 0's loss alone: every other adapter's B gets an exactly zero gradient.
    alone = grads(batch, only=0)
    for name, g in alone.items():
        assert torch.count_nonzero(g[1:]) == 0, name
        assert torch.count_nonzero(g[0]) > 0, name
    # Changing adapter 1's rows changes adapter 1's gradient and leaves 0's and 2's bit-identical.
    other = dict(batch)
    other["input_ids"] = batch["input_ids"].clone()
    segment = batch["input_ids"].shape[0] // 3
    real = batch["attention_mask"][segment : 2 * segment].bool()
    other["input_ids"][segment : 2 * segment][real] = torch.roll(batch["input_ids"][segment : 2 * segment][real], 1)
    changed = grads(other)
    for name in full:
        assert torch.equal(changed[name][0], full[name][0]) and torch.equal(changed[name][2], full[name][2]), name
        assert not torch.equal(changed[name][1], full[name][1]), name
    assert group.detach() is model and not any(isinstance(m, multi_lori.RoutedLoRILinear) for m in model.modules())


def test_gradient_checkpointing_recomputes_the_routed_layers_and_keeps_every_gradient(tiny_model_and_tokenizer):
    """train.gradient_checkpointing (transformers' non-reentrant checkpointing) over a fused group: each routed
    layer runs its forward again in the backward pass (so activations were dropped), and every adapter's B
    gradient is the one without checkpointing (recomputation is exact; float32, summation order aside)."""
    from tclora.models import set_gradient_checkpointing

    model, tok = tiny_model_and_tokenizer
    group = _group_with_random_b(model)
    batch, model = _fused_batch(tok), group.model.train()  # HF checkpoints in training mode only
    layer = next(m for m in model.modules() if isinstance(m, multi_lori.RoutedLoRILinear))
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))

    plain = _b_grads(group, batch)
    assert len(calls) == 1
    set_gradient_checkpointing(model, True)
    calls.clear()
    checkpointed = _b_grads(group, batch)
    assert len(calls) == 2  # the forward, then its recomputation inside backward
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-7, rtol=1e-6, msg=name)
    set_gradient_checkpointing(model, False)
    group.detach()


def test_gradient_checkpointing_recomputes_the_summed_pass_summed(tiny_model_and_tokenizer):
    """train.merge_aware with train.gradient_checkpointing: the merged-sum pass is recomputed in backward as a
    sum (multi_lori.checkpoint_context), not as the routed forward, and every B gradient of the routed plus
    summed loss is the one without checkpointing. Once refused: torch then recomputed the summed pass routed
    and failed deep in autograd on the recomputed shapes."""
    from tclora.config import TrainSection
    from tclora.models import set_gradient_checkpointing

    assert TrainSection(clusters_per_run=2, merge_aware=0.5, gradient_checkpointing=True).merge_aware == 0.5
    model, tok = tiny_model_and_tokenizer
    group = _group_with_random_b(model)
    batch, model = _fused_batch(tok), group.model.train()
    layer = next(m for m in model.modules() if isinstance(m, multi_lori.RoutedLoRILinear))
    widths = []  # the delta's rank each call of the layer used: r (routed) or T·r (summed)
    layer.register_forward_hook(lambda *_: widths.append(
        layer.lora_A.shape[1] * (len(group) if multi_lori._SUMMED.get() else 1)))
    grads = functools.partial(_b_grads, group, batch, merge_aware=0.5)

    plain = grads()
    rank, summed_rank = layer.lora_A.shape[1], layer.lora_A.shape[1] * len(group)
    assert widths == [rank, summed_rank]
    set_gradient_checkpointing(model, True)
    widths.clear()
    checkpointed = grads()
    # Both forwards, then each recomputed in backward in its own mode.
    assert widths[:2] == [rank, summed_rank] and sorted(widths[2:]) == sorted([rank, summed_rank])
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-7, rtol=1e-6, msg=name)
    set_gradient_checkpointing(model, False)
    group.detach()


def test_padding_to_the_group_width_leaves_the_loss_unchanged(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    batch = next(data.batches(RECORDS[0], tok, 4, MAX_LENGTH, 1, seed=0))
    fill = {"input_ids": tok.pad_token_id, "labels": -100, "attention_mask": 0}
    padded = {k: torch.nn.functional.pad(v, (0, 9), value=fill[k]) for k, v in batch.items()}
    wide = multi_lori.concat_batches([batch, padded], tok.pad_token_id)  # the same rows, 9 wider, twice
    with torch.no_grad():
        solo = model(**batch).loss
        fused = multi_lori.adapter_losses(model(input_ids=wide["input_ids"],
                                                attention_mask=wide["attention_mask"]).logits,
                                          wide["labels"], 2)
    torch.testing.assert_close(fused, solo.expand(2), atol=1e-6, rtol=1e-6)


def test_per_adapter_clipping_is_torch_clipping_of_each_adapter_alone():
    """A fused parameter stacks T adapters on dim 0; each is clipped as torch.nn.utils.clip_grad_norm_
    clips that adapter's own parameters, whatever the others' norms (a global clip would couple them)."""
    from tclora.train import clip_grad_norm_per_adapter_

    gen = torch.Generator().manual_seed(0)
    shapes, scales = [(3, 8, 4), (3, 5, 4)], torch.tensor([0.01, 1.0, 30.0])  # norms below, near, above 1
    stacked = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in stacked:
        p.grad = torch.randn(p.shape, generator=gen) * scales.view(3, 1, 1)
    alone = [[torch.nn.Parameter(torch.zeros(s[1:])) for s in shapes] for _ in range(3)]
    for t, params in enumerate(alone):
        for p, q in zip(params, stacked):
            p.grad = q.grad[t].clone()
    norms = clip_grad_norm_per_adapter_(stacked, 1.0, n_adapters=3)
    for t, params in enumerate(alone):
        want_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.testing.assert_close(norms[t], want_norm)
        for p, q in zip(params, stacked):
            torch.testing.assert_close(q.grad[t], p.grad, atol=0, rtol=1e-6)
    assert norms[0] < 1 < norms[2]  # the grid above covered both sides of the threshold
    solo = [torch.nn.Parameter(torch.zeros(8, 4))]
    solo[0].grad = torch.full((8, 4), 2.0)  # one adapter: the whole gradient is its own
    clip_grad_norm_per_adapter_(solo, 1.0)
    torch.testing.assert_close(solo[0].grad.norm(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_fused_equals_solo_when_clipping_binds(tiny_base, tmp_path):
    """max_grad_norm small enough to clip every step: still each adapter's own step, so fused == solo."""
    from tclora.models import load_base

    train = TRAIN.model_copy(update={"steps": 4, "sparse_steps": 3, "max_grad_norm": 1e-3})
    for t in range(2):
        model, tok = load_base(str(tiny_base))
        train_lori_adapter(model, tok, RECORDS[t], LORI, train, seed=SEEDS[t], out_dir=tmp_path / f"solo-{t}",
                           max_length=MAX_LENGTH)
    model, tok = load_base(str(tiny_base))
    multi_lori.train_lori_group(model, tok, RECORDS[:2], LORI, train, seeds=SEEDS[:2], max_length=MAX_LENGTH,
                                out_dirs=[tmp_path / f"fused-{t}" for t in range(2)])
    for t in range(2):
        want, got = (load_file(str(tmp_path / f"{k}-{t}" / "adapter_model.safetensors")) for k in ("solo", "fused"))
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=key)


def test_bad_group_input_is_named(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="lori.target_modules"):
        multi_lori.LoRIGroup(model, LoRISection(target_modules=["qkv_proj"]), SEEDS)
    # plain LoRA trains A; a group's A is frozen
    with pytest.raises(ValueError, match="lori.mode=lora.*train.fused=false"):
        multi_lori.LoRIGroup(model, LoRISection(mode="lora"), SEEDS)
    a = next(data.batches(RECORDS[0], tok, 4, MAX_LENGTH, 1))
    b = next(data.batches(RECORDS[1], tok, 3, MAX_LENGTH, 1))
    with pytest.raises(ValueError, match="equal rows per adapter"):
        multi_lori.concat_batches([a, b], tok.pad_token_id)
    multi_lori.LoRIGroup(model, LORI, SEEDS[:2])  # routes the model's layers: a segment per adapter
    with pytest.raises(ValueError, match="not a multiple of its 2 adapters"):
        model(input_ids=a["input_ids"][:3])


def _run(tiny_base, tmp_path, stop: int | None):
    """Dense then sparse phase on a 3-adapter group, optionally checkpointed after dense step ``stop`` and
    resumed in a fresh model, group and optimizer. Returns the final stacked B's."""
    from tclora.models import load_base

    model, tok = load_base(str(tiny_base))
    group = multi_lori.LoRIGroup(model, LORI, SEEDS)
    steps = 6
    fused = [_fused_batch(tok, step_seed=10 * s) for s in range(2 * steps)]
    loss_fn = multi_lori.routed_loss(group)
    engine = TorchEngine(model, lr=3e-3, weight_decay=0.01)
    if stop is None:
        train_loop(engine, fused[:steps], steps, loss_fn=loss_fn)
    else:
        train_loop(engine, fused[:stop], stop, loss_fn=loss_fn)
        multi_lori.save_checkpoint(tmp_path, group, engine.optimizer, None, {"phase": "dense", "step": stop})
        model, tok = load_base(str(tiny_base))
        group = multi_lori.LoRIGroup(model, LORI, SEEDS)
        engine = TorchEngine(model, lr=3e-3, weight_decay=0.01)
        masks, state = multi_lori.load_checkpoint(tmp_path, group, engine.optimizer)
        assert masks is None and state == {"phase": "dense", "step": stop}
        train_loop(engine, fused[stop:steps], steps, start_step=stop, loss_fn=loss_fn)
    masks = group.extract_masks(LORI.sparsity)
    masked = group.masked(masks)
    masked.reset_()
    engine = TorchEngine(model, lr=9e-3, weight_decay=0.01)
    train_loop(engine, fused[steps : steps + 2], 2, masked=masked, loss_fn=loss_fn)
    if stop is not None:  # a second resume, inside the sparse phase: masks travel in the checkpoint
        multi_lori.save_checkpoint(tmp_path / "sparse", group, engine.optimizer, masks, {"phase": "sparse", "step": 2})
        masked.remove()
        model, tok = load_base(str(tiny_base))
        group = multi_lori.LoRIGroup(model, LORI, SEEDS)
        engine = TorchEngine(model, lr=9e-3, weight_decay=0.01)
        restored, _ = multi_lori.load_checkpoint(tmp_path / "sparse", group, engine.optimizer)
        assert restored.keys() == masks.keys() and all(torch.equal(restored[k], masks[k]) for k in masks)
        masked = group.masked(restored)
    train_loop(engine, fused[steps + 2 :], steps, start_step=2, masked=masked, loss_fn=loss_fn)
    return {n: b.detach().clone() for n, b in group.lora_b_params().items()}


def test_resume_from_a_checkpoint_equals_uninterrupted(tiny_base, tmp_path):
    straight = _run(tiny_base, tmp_path / "a", stop=None)
    resumed = _run(tiny_base, tmp_path / "b", stop=3)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name  # same ops in the same order: bit-exact


def test_checkpoint_of_another_group_is_refused(tiny_model_and_tokenizer, tmp_path):
    model, _ = tiny_model_and_tokenizer
    group = multi_lori.LoRIGroup(model, LORI, SEEDS)
    multi_lori.save_checkpoint(tmp_path, group, None, None, {})
    group.detach()
    with pytest.raises(ValueError, match="adapter seeds"):
        multi_lori.load_checkpoint(tmp_path, multi_lori.LoRIGroup(model, LORI, [1, 2, 3]), None)


def test_group_masks_are_per_adapter_and_save_like_one_adapters(tiny_model_and_tokenizer, tmp_path):
    model, _ = tiny_model_and_tokenizer
    group = multi_lori.LoRIGroup(model, LORI, SEEDS)
    with torch.no_grad():
        for b in group.lora_b_params().values():
            b.normal_()
    masks = group.extract_masks(LORI.sparsity)
    for t in range(3):  # the LoRI rule applied to adapter t's B's alone
        want = lori.extract_masks({n: b.detach().clone() for n, b in group.adapter_b(t).items()}, LORI.sparsity)
        got = multi_lori.adapter_masks(masks, t)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    lori.save_masks(masks, tmp_path)  # the train worker's checkpoint stores a group's masks this way
    loaded = lori.load_masks(tmp_path)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(ValueError, match="masks of another group"):
        group.masked(multi_lori.adapter_masks(masks, 0))


def _peft_kl(tiny_base, adapter_dir, batch: dict[str, torch.Tensor]) -> float:
    """KL(base ‖ base + adapter), mean over the batch's real tokens, by PEFT's own forward of the saved adapter."""
    from torch.nn import functional as F

    from tclora.models import load_base

    model = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(adapter_dir))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        adapted = F.log_softmax(model(**inputs).logits, -1)
        with model.disable_adapter():
            base = F.log_softmax(model(**inputs).logits, -1)
    mask = inputs["attention_mask"].float()
    return (((base.exp() * (base - adapted)).sum(-1) * mask).sum() / mask.sum()).item()


def test_disentangle_penalty_is_each_adapters_kl_to_the_base_on_the_other_clusters_rows(tiny_base, tmp_path):
    from tclora.models import load_base

    model, tok = load_base(str(tiny_base))
    group = multi_lori.LoRIGroup(model, LORI, SEEDS)
    batch = _fused_batch(tok)
    assert torch.equal(multi_lori.other_cluster_kl(model, group, batch), torch.zeros(3))  # B = 0: the base itself
    with pytest.raises(ValueError, match="at least 2 adapters"):
        multi_lori.other_cluster_kl(model, multi_lori.LoRIGroup(load_base(str(tiny_base))[0], LORI, SEEDS[:1]), batch)
    with torch.no_grad():
        for b in group.lora_b_params().values():
            b.normal_(std=0.1)
    kl = multi_lori.other_cluster_kl(model, group, batch)
    kl[0].backward()  # adapter 0's penalty reaches adapter 0's B only
    for name, b in group.lora_b_params().items():
        assert torch.count_nonzero(b.grad[1:]) == 0 and torch.count_nonzero(b.grad[0]) > 0, name
    b = batch["input_ids"].shape[0] // 3  # 4 rows per adapter
    # Adapter t is penalised on row j of segment t+1, t+2, t+1, t+2 (mod 3) for j = 0..3: the others in turn.
    expected = {0: [1 * b + 0, 2 * b + 1, 1 * b + 2, 2 * b + 3], 1: [2 * b + 0, 0 * b + 1, 2 * b + 2, 0 * b + 3],
                2: [0 * b + 0, 1 * b + 1, 0 * b + 2, 1 * b + 3]}
    assert multi_lori.other_cluster_rows(3, b).tolist() == expected[0] + expected[1] + expected[2]
    for t in range(3):
        group.save_adapter(t, tmp_path / f"adapter-{t}", None, {})
        rows = {k: v[expected[t]] for k, v in batch.items()}
        assert kl[t].item() == pytest.approx(_peft_kl(tiny_base, tmp_path / f"adapter-{t}", rows), rel=1e-4), t


def test_disentangled_adapters_leave_the_other_clusters_rows_closer_to_the_base(tiny_base, tmp_path):
    """Same batches, same seeds: with the penalty each adapter's KL on the other clusters' rows drops, the
    group's total at least halves, and each adapter's own loss still falls (it learns its cluster). Per
    adapter only a drop is required: one whose KL is already near zero without the penalty (7e-4 nats for
    reverse_words on the tiny base, against 0.05-0.23 for the others) has little left to halve."""
    from tclora.models import load_base

    tok = load_base(str(tiny_base))[1]
    held_out = [next(data.batches(RECORDS[t], tok, 8, MAX_LENGTH, 1, seed=99)) for t in range(3)]
    kls, metas = {}, {}
    for beta in (0.0, 5.0):
        model, tok = load_base(str(tiny_base))
        cfg = TRAIN.model_copy(update={"disentangle": beta})
        dirs = [tmp_path / f"beta{beta}-{t}" for t in range(3)]
        metas[beta] = multi_lori.train_lori_group(model, tok, RECORDS, LORI, cfg, seeds=SEEDS, out_dirs=dirs,
                                                  max_length=MAX_LENGTH)
        kls[beta] = [sum(_peft_kl(tiny_base, dirs[t], held_out[u]) for u in range(3) if u != t) for t in range(3)]
    assert sum(kls[5.0]) < 0.5 * sum(kls[0.0]), kls
    for t in range(3):
        assert kls[5.0][t] < kls[0.0][t], (t, kls)
        assert metas[5.0][t]["dense_loss_last"] < metas[5.0][t]["dense_loss_first"], t


def test_routed_loss_adds_beta_times_the_penalty_gamma_times_the_summed_loss_and_records_the_cross_entropy(tiny_base):
    from tclora.models import load_base

    model, tok = load_base(str(tiny_base))
    group = multi_lori.LoRIGroup(model, LORI, SEEDS)
    with torch.no_grad():
        for b in group.lora_b_params().values():
            b.normal_(std=0.1)
    batch = _fused_batch(tok)
    with torch.no_grad():
        ce = multi_lori.adapter_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                             ).logits, batch["labels"], 3)
        kl = multi_lori.other_cluster_kl(model, group, batch)
        summed = multi_lori.summed_losses(model, group, batch)
        total, recorded = multi_lori.routed_loss(group, 2.5)(model, batch)
        both, recorded_both = multi_lori.routed_loss(group, 2.5, 0.75)(model, batch)
        plain, _ = multi_lori.routed_loss(group)(model, batch)
    assert recorded == pytest.approx(ce.tolist(), rel=1e-6) and kl.min() > 0
    assert recorded_both == pytest.approx(ce.tolist(), rel=1e-6)  # records the routed adapters' own losses
    assert total.item() == pytest.approx((ce.sum() + 2.5 * kl.sum()).item(), rel=1e-5)
    assert both.item() == pytest.approx((ce.sum() + 2.5 * kl.sum() + 0.75 * summed.sum()).item(), rel=1e-5)
    assert plain.item() == pytest.approx(ce.sum().item(), rel=1e-6)


def _group_and_its_saved_adapters_in_peft(tiny_base, tmp_path):
    """A group with random B's on a fused batch, and its three adapters saved and loaded into one PEFT model
    (adapters "a0", "a1", "a2"): the reference a summed forward is checked against."""
    from tclora.models import load_base

    model, tok = load_base(str(tiny_base))
    group = _group_with_random_b(model)
    for t in range(3):
        group.save_adapter(t, tmp_path / f"adapter-{t}", None, {})
    peft_model = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(tmp_path / "adapter-0"), adapter_name="a0")
    for t in (1, 2):
        peft_model.load_adapter(str(tmp_path / f"adapter-{t}"), adapter_name=f"a{t}")
    return model, group, _fused_batch(tok), peft_model


def test_summed_forward_is_peft_cat_merge_of_the_saved_adapters(tiny_base, tmp_path):
    """``LoRIGroup.summed()`` is the base plus every adapter's update: PEFT's own ``cat`` merge (weights 1) of
    the three saved adapters gives the same logits, and the merged-sum loss of each segment reaches every B."""
    from tclora.models import load_base

    model, group, batch, peft_model = _group_and_its_saved_adapters_in_peft(tiny_base, tmp_path)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    peft_model.add_weighted_adapter(["a0", "a1", "a2"], [1.0, 1.0, 1.0], "sum", combination_type="cat")
    peft_model.set_adapter("sum")
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        routed = model(**inputs).logits
    with group.summed():
        summed = model(**inputs).logits
    torch.testing.assert_close(summed.detach(), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(routed, expected, atol=1e-3)  # the routed forward is not the sum
    torch.testing.assert_close(model(**inputs).logits.detach(), routed)  # routed again after the block

    losses = multi_lori.summed_losses(model, group, batch)
    torch.testing.assert_close(losses.detach(), multi_lori.adapter_losses(expected, batch["labels"], 3))
    model.zero_grad(set_to_none=True)
    losses[0].backward()  # segment 0's rows under the sum depend on every adapter's B
    for name, b in group.lora_b_params().items():
        assert all(torch.count_nonzero(b.grad[t]) > 0 for t in range(3)), name
    with pytest.raises(ValueError, match="at least 2 adapters"):
        multi_lori.summed_losses(model, multi_lori.LoRIGroup(load_base(str(tiny_base))[0], LORI, SEEDS[:1]), batch)


def test_summed_with_a_mask_gives_each_segment_the_peft_cat_merge_of_its_subset(tiny_base, tmp_path):
    """``LoRIGroup.summed(mask)``: segment t's rows see the base plus the adapters s with mask[t, s] = 1 only,
    which is PEFT's own ``cat`` merge of that subset of the saved adapters (train.merge_aware_dropout)."""
    model, group, batch, peft_model = _group_and_its_saved_adapters_in_peft(tiny_base, tmp_path)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with group.summed(mask):
        got = model(**inputs).logits.detach()
    rows = got.shape[0] // 3
    for t in range(3):
        subset = [f"a{s}" for s in range(3) if mask[t, s]]
        if len(subset) > 1:
            peft_model.add_weighted_adapter(subset, [1.0] * len(subset), f"sum{t}", combination_type="cat")
        peft_model.set_adapter(f"sum{t}" if len(subset) > 1 else subset[0])
        with torch.no_grad():
            expected = peft_model(**inputs).logits[t * rows:(t + 1) * rows]
        torch.testing.assert_close(got[t * rows:(t + 1) * rows], expected, atol=1e-5, rtol=1e-4)
    with group.summed(torch.ones(3, 3)):
        ones = model(**inputs).logits.detach()
    with group.summed():
        torch.testing.assert_close(ones, model(**inputs).logits.detach())
    with pytest.raises(ValueError, match=r"mask must be \(3, 3\)"):
        with group.summed(torch.ones(2, 2)):
            pass


def test_summed_updates_send_each_segments_gradient_to_the_chosen_adapters_only(tiny_model_and_tokenizer):
    """``summed(updates=U)`` (train.merge_aware_updates): the same forward, and segment t's loss reaches B_s
    only where U[t, s], with exactly the full sum's gradient there (the activations' gradient still flows
    through every adapter). ``summed_losses(updates="others")`` is U = 1 - I: cluster 0's summed loss trains
    adapters 1 and 2, never adapter 0."""
    model, tok = tiny_model_and_tokenizer
    group = _group_with_random_b(model)
    batch, model = _fused_batch(tok), group.model

    def segment_grads(updates: torch.Tensor | None, t: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with group.summed(updates=updates):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = multi_lori.adapter_losses(logits, batch["labels"], 3)
        losses[t].backward()
        return losses.detach(), {n: b.grad.clone() for n, b in group.lora_b_params().items()}

    full = {t: segment_grads(None, t) for t in range(3)}  # (losses, grads) of the plain sum, per segment
    assert all(torch.count_nonzero(g[s]) > 0 for _, grads in full.values() for g in grads.values()
               for s in range(3))  # the full sum reaches every B from every segment
    for updates in (1 - torch.eye(3), torch.eye(3), torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])):
        for t in range(3):
            (full_losses, full_grads), (losses, got) = full[t], segment_grads(updates, t)
            torch.testing.assert_close(losses, full_losses)
            for name in full_grads:
                for s in range(3):
                    torch.testing.assert_close(got[name][s], full_grads[name][s] * updates[t, s], msg=f"{name} {t} {s}")

    model.zero_grad(set_to_none=True)
    multi_lori.summed_losses(model, group, batch, updates="others")[0].backward()
    assert all(torch.count_nonzero(b.grad[0]) == 0 and torch.count_nonzero(b.grad[1]) > 0
               for b in group.lora_b_params().values())
    with pytest.raises(ValueError, match="updates must be one of"):
        multi_lori.summed_losses(model, group, batch, updates="mine")
    with pytest.raises(ValueError, match=r"updates must be \(3, 3\)"):
        with group.summed(updates=torch.ones(2, 2)):
            pass


def test_adapter_dropout_mask_keeps_each_own_adapter_and_others_at_the_rate_and_is_fixed_by_the_batch():
    batch = {"input_ids": torch.arange(40).view(4, 10)}
    torch.testing.assert_close(multi_lori.adapter_dropout_mask(4, 0.0, batch), torch.ones(4, 4))
    masks = [multi_lori.adapter_dropout_mask(4, 0.3, {"input_ids": torch.randint(0, 50, (4, 10))}) for _ in range(400)]
    stacked = torch.stack(masks)
    assert torch.all(torch.diagonal(stacked, dim1=1, dim2=2) == 1)  # a cluster's rows always keep their adapter
    off = stacked[:, ~torch.eye(4, dtype=torch.bool)]  # (400, 12) others: kept with probability 0.7
    assert off.mean().item() == pytest.approx(0.7, abs=0.03)  # 4,800 draws: 3 standard errors is 0.02
    assert set(stacked.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(multi_lori.adapter_dropout_mask(4, 0.3, batch),
                               multi_lori.adapter_dropout_mask(4, 0.3, {"input_ids": batch["input_ids"].clone()}))


def test_merge_aware_adapters_sum_to_a_better_model_and_each_still_learns(tiny_base, tmp_path):
    """Same batches, same seeds: with train.merge_aware the sum of the three saved adapters (PEFT's ``cat``
    merge) fits the three clusters' rows better than the sum of adapters trained without it (the summed loss
    over the clusters; one cluster may give some up to the others), and each adapter's own loss still falls."""
    from tclora.models import load_base

    tok = load_base(str(tiny_base))[1]
    rows = multi_lori.concat_batches([next(data.batches(RECORDS[t], tok, 8, MAX_LENGTH, 1, seed=99))
                                      for t in range(3)], tok.pad_token_id)
    summed, metas = {}, {}
    for gamma in (0.0, 3.0):
        model, tok = load_base(str(tiny_base))
        cfg = TRAIN.model_copy(update={"merge_aware": gamma})
        dirs = [tmp_path / f"gamma{gamma}-{t}" for t in range(3)]
        metas[gamma] = multi_lori.train_lori_group(model, tok, RECORDS, LORI, cfg, seeds=SEEDS, out_dirs=dirs,
                                                   max_length=MAX_LENGTH)
        peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")  # the saved files, via PEFT
        for t in (1, 2):
            peft_model.load_adapter(str(dirs[t]), adapter_name=f"a{t}")
        peft_model.add_weighted_adapter(["a0", "a1", "a2"], [1.0, 1.0, 1.0], "sum", combination_type="cat")
        peft_model.set_adapter("sum")
        with torch.no_grad():
            logits = peft_model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
        summed[gamma] = multi_lori.adapter_losses(logits, rows["labels"], 3).sum().item()
    assert summed[3.0] < summed[0.0] - 0.1, summed  # measured: 11.81 against 12.05
    for t in range(3):
        assert metas[3.0][t]["merge_aware"] == 3.0 and metas[0.0][t]["merge_aware"] == 0.0
        assert metas[3.0][t]["dense_loss_last"] < metas[3.0][t]["dense_loss_first"], t


def test_other_cluster_rows_of_two_adapters_swap_the_segments():
    assert multi_lori.other_cluster_rows(2, 3).tolist() == [3, 4, 5, 0, 1, 2]
