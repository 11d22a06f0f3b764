"""Single process, no Ray: demo corpus -> one LoRI adapter per family -> merges -> evaluation."""

import pytest
import torch

from tclora import adapters, compare, evaluate, report
from tclora.config import EvalSection, LoRISection, MergeSection, TrainSection
from tclora.data import read_jsonl
from tclora.demo_corpus import TASK_FAMILIES, build_demo_corpus
from tclora.models import load_base
from tclora.train import train_lori_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("e2e")
    splits = build_demo_corpus(out / "corpus", train_per_task=40, eval_per_task=6, seed=0)
    train, test = read_jsonl(splits["train"]), read_jsonl(splits["test"])
    model, tok = load_base(str(tiny_base))
    lori_cfg = LoRISection(rank=4, alpha=8, sparsity=0.8)
    train_cfg = TrainSection(steps=20, batch_size=8, lr=3e-3, sparse_lr_multiplier=3)
    families = list(TASK_FAMILIES)
    metas = {}
    for cid, family in enumerate(families):
        rows = [r for r in train if r["task_name"] == family]
        metas[family] = train_lori_adapter(model, tok, rows, lori_cfg, train_cfg, seed=cid,
                                           out_dir=out / f"cluster-{cid}", max_length=64,
                                           base_model_name_or_path=str(tiny_base))
    return out, model, tok, families, test, metas


def test_base_model_is_left_untouched_by_training(demo_world, tiny_base):
    _, model, _, _, _, _ = demo_world
    fresh, _ = load_base(str(tiny_base))
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_each_adapter_beats_the_base_on_its_own_family(demo_world):
    out, model, tok, families, test, metas = demo_world
    for cid, family in enumerate(families):
        rows = [r for r in test if r["task_name"] == family]
        base_loss = evaluate.mean_loss(model, tok, rows, max_length=64)
        with adapters.deltas_applied(model, adapters.load_factors(out / f"cluster-{cid}")):
            adapted_loss = evaluate.mean_loss(model, tok, rows, max_length=64)
        assert adapted_loss < base_loss, (family, adapted_loss, base_loss)
        # LoRI-S: ~20% of B trainable, far below LoRA's A + B at the same rank.
        params = metas[family]["parameters"]
        assert params["lori_s"] == pytest.approx(0.2 * params["lori_d"], abs=1)
        assert params["lori_s_fraction_of_lora"] < 0.2


def test_merges_and_evaluation_produce_a_comparison(demo_world):
    out, model, tok, families, test, _ = demo_world
    factors = {cid: adapters.load_factors(out / f"cluster-{cid}") for cid in range(len(families))}
    merge_cfg = MergeSection(methods=["cp", "linear", "ties"], cp_rank=4, cp_iters=30)
    merged = {m: compare.merge_one(list(factors.values()), m, merge_cfg) for m in merge_cfg.methods}
    # CP exports as a rank-4 LoRA (padded to vLLM's 8); TIES is dense and becomes a merged checkpoint.
    assert compare.save_merge(merged["cp"], out / "cp", "tiny") == "peft_adapter"
    assert compare.save_merge(merged["ties"], out / "ties", "tiny", model, tok) == "merged_model"
    records = [dict(r, cluster=families.index(r["task_name"])) for r in test]
    results = compare.evaluate_all(model, tok, records, factors, merged, EvalSection(batch_size=64, max_new_tokens=8))
    assert list(results) == ["base", "adapters", "cp", "linear", "ties"]
    for scores in results.values():
        assert set(scores["per_task"]) == set(families)
        assert 0 <= scores["mean"] <= 1
    metrics = {"eval": report.combine_splits({"test": results}, "test"), "data": {"rows": 1, "quarantined": 0}}
    table = report.summary_table(metrics)
    assert "cp" in table and "adapters" in table
