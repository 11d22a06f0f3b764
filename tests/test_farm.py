"""The adapter farm: export, load, route by nearest centroid, fall back to the merge beyond the threshold.

Expected routes and distances are computed here with numpy from the embeddings (argmin of the
Euclidean distance), not by the code under test.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli
from tclora import artifacts
from tclora.config import EmbedSection
from tclora.embed import Embedder
from tclora.farm import Farm, calibrate_threshold, export_farm

GROUPS = {  # cluster id -> training sources
    0: [f"Reverse the words: {w}" for w in ("box cup pen", "arm bag dot", "fan gem hat", "jam key kit map")],
    1: [f"How many words? {w}" for w in ("box cup pen", "arm bag dot", "fan gem hat", "jam key kit map")],
}
HELD_OUT = ["Reverse the words: mop mug pot", "How many words? rug sun tin van"]
FAR = "The striker scored three goals in the championship final."
MODEL = EmbedSection().model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("farm")
    embed = Embedder(MODEL)
    vectors = {c: embed.encode(texts, 64) for c, texts in GROUPS.items()}
    centroids = np.stack([vectors[c].mean(0) for c in sorted(GROUPS)]).astype(np.float32)  # (2, 384)
    cluster_dir = root / "cluster"
    cluster_dir.mkdir()
    np.save(cluster_dir / "centroids.npy", centroids)
    # k-means label 0 is final cluster 1 and vice versa: the farm must route to final ids
    (cluster_dir / "kmeans.json").write_text(json.dumps({"mapping": {"0": 1, "1": 0}, "view": None}))
    adapters = {}
    for final in (0, 1):
        adapters[final] = root / f"adapter-{final}"
        adapters[final].mkdir()
        (adapters[final] / "adapter_config.json").write_text(json.dumps({"r": 4, "final": final}))
    merged = root / "merged-src"
    merged.mkdir()
    (merged / "merge.json").write_text(json.dumps({"method": "ties"}))
    distances = np.concatenate([np.linalg.norm(vectors[c] - centroids[c], axis=1) for c in sorted(GROUPS)])
    out = export_farm(root / "farm", cluster_dir=cluster_dir, adapter_dirs=adapters, train_distances=distances,
                      base_model="demo", embed_model=MODEL, merge_dir=merged,
                      recommended={"method": "ties", "params": {"scale": 1.0}})
    return out, centroids, distances, cluster_dir, adapters, merged


def test_routes_go_to_the_nearest_centroid_with_its_distance(exported):
    out, centroids, distances, *_ = exported
    farm = Farm.load(out)
    assert farm.info["threshold"] == pytest.approx(np.quantile(distances, 0.99))
    vectors = Embedder(MODEL).encode(HELD_OUT, 64)
    gaps = np.linalg.norm(vectors[:, None, :] - centroids[None], axis=2)  # (2 inputs, 2 centroids)
    routes = farm.route(HELD_OUT, threshold=10.0)  # everything near: no fallback
    for route, gap in zip(routes, gaps):
        label = int(gap.argmin())
        assert route.cluster == {0: 1, 1: 0}[label] and route.distance == pytest.approx(gap[label], abs=1e-4)
        assert not route.fallback and route.adapter == str(farm.adapter_dir(route.cluster))
        saved = json.loads((farm.adapter_dir(route.cluster) / "adapter_config.json").read_text())
        assert saved["final"] == route.cluster


def test_inputs_beyond_the_threshold_fall_back_to_the_recommended_merge(exported):
    farm = Farm.load(exported[0])
    near, far = farm.route([GROUPS[0][0], FAR])
    assert not near.fallback and near.distance <= farm.info["threshold"]
    assert far.fallback and far.distance > farm.info["threshold"] and far.adapter == str(farm.merged_dir)
    assert json.loads((farm.merged_dir / "merge.json").read_text())["method"] == "ties"
    # A row at the threshold (shared template views make exact ties common) is inside despite float noise.
    assert not farm.route([GROUPS[0][0]], threshold=near.distance - 1e-7)[0].fallback
    assert farm.route([GROUPS[0][0]], threshold=near.distance - 1e-3)[0].fallback
    assert farm.info["recommended"]["method"] == "ties"


def test_export_is_idempotent_and_follows_its_inputs(exported, tmp_path):
    out, _, distances, cluster_dir, adapters, merged = exported
    before = (out / artifacts.MANIFEST).stat().st_mtime_ns
    kwargs = dict(cluster_dir=cluster_dir, adapter_dirs=adapters, train_distances=distances, base_model="demo",
                  embed_model=MODEL, merge_dir=merged, recommended={"method": "ties", "params": {"scale": 1.0}})
    export_farm(out, **kwargs)
    assert (out / artifacts.MANIFEST).stat().st_mtime_ns == before  # same inputs: nothing rewritten
    without_merge = export_farm(tmp_path / "farm2", **{**kwargs, "merge_dir": None})
    routes = Farm.load(without_merge).route([FAR])
    assert routes[0].fallback and routes[0].adapter is None  # says so, never silently the nearest adapter
    with pytest.raises(FileNotFoundError, match="not an exported tclora farm"):
        Farm.load(tmp_path)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(distances, 0)


def test_cli_route_prints_the_adapter_and_the_fallback(exported, capsys):
    assert cli.main(["route", "--farm", str(exported[0]), GROUPS[0][0], FAR]) == 0
    out = capsys.readouterr().out
    assert "adapter" in out and "merge (far from every cluster)" in out and "cluster-" in out
    assert cli.main(["route", "--farm", "/nonexistent/farm", "x"]) == 2


def test_arrow_routing_matches_peft_and_leaves_the_model_as_it_was(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from tclora.farm import arrow_applied
    from tests.helpers import tiny_llama

    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    dirs = []
    for seed in (1, 2):
        base_model = tiny_llama()  # seeds torch itself: seed the adapter's initialisation after it
        torch.manual_seed(seed)
        peft_model = get_peft_model(base_model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["q_proj", "v_proj"]))
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        dirs.append(tmp_path / f"a{seed}")
    model = tiny_llama()
    with torch.no_grad():
        base = model(input_ids=ids).logits
        alone = PeftModel.from_pretrained(tiny_llama(), str(dirs[0]))(input_ids=ids).logits
        # One adapter, or the same adapter twice (softmax weights 1/2 + 1/2): exactly that adapter.
        for routed_dirs, k in (([dirs[0]], 1), ([dirs[0], dirs[0]], 2)):
            with arrow_applied(model, routed_dirs, top_k=k) as routed:
                torch.testing.assert_close(routed(input_ids=ids).logits, alone, atol=1e-5, rtol=1e-5)
        with arrow_applied(model, dirs, top_k=2) as routed:  # two different adapters: a per-token mixture
            mixed = routed(input_ids=ids).logits
        with arrow_applied(model, dirs, top_k=2) as routed:  # seeded prototypes: the same mixture every time
            torch.testing.assert_close(routed(input_ids=ids).logits, mixed, atol=0, rtol=0)
        assert not torch.allclose(mixed, base, atol=1e-4) and not torch.allclose(mixed, alone, atol=1e-4)
        torch.testing.assert_close(model(input_ids=ids).logits, base)  # unloaded: the base again
    assert not any("lora" in name for name, _ in model.named_modules())


def test_routing_accuracy_counts_rows_sent_to_their_tasks_majority_cluster():
    from tclora.cluster import routing_accuracy

    top_tasks = {"0": {"a": 30, "b": 2}, "1": {"b": 20, "a": 5}}  # a lives in cluster 0, b in cluster 1
    records = [{"task_name": "a", "cluster": 0}, {"task_name": "a", "cluster": 1}, {"task_name": "b", "cluster": 1},
               {"task_name": "ood", "cluster": 0}, {"cluster": 1}]  # no right adapter: not counted
    assert routing_accuracy(records, top_tasks) == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert routing_accuracy([{"task_name": "ood", "cluster": 0}], top_tasks) is None


def test_arrow_choices_follow_the_adapters_not_their_order(served_farm):
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from tclora.farm import arrow_applied, arrow_choices
    from tclora.models import load_base

    farm = Farm.load(served_farm)
    model, tok = load_base(farm.base_model)
    dirs = [farm.adapter_dir(0), farm.adapter_dir(1)]
    prompts = [*GROUPS[0], *GROUPS[1], FAR]
    with arrow_applied(model, dirs, top_k=1) as routed:
        forward = arrow_choices(routed, tok, prompts)
        assert not any(m._forward_hooks for m in routed.modules() if isinstance(m, ArrowLoraLinearLayer))
    with arrow_applied(model, dirs[::-1], top_k=1) as routed:
        backward = arrow_choices(routed, tok, prompts)
    assert set(forward) <= {0, 1} and backward == [1 - c for c in forward]  # the same adapter, renumbered


def test_arrow_weights_of_a_padded_batch_equal_one_prompt_at_a_time(served_farm):
    """Batched prompts of different lengths (right-padded) get the totals each prompt gets alone."""
    import torch

    from tclora.farm import arrow_applied, arrow_choices, arrow_weights
    from tclora.models import load_base

    farm = Farm.load(served_farm)
    model, tok = load_base(farm.base_model)
    prompts = [*GROUPS[0], *GROUPS[1], FAR]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # the batch really is padded
    with arrow_applied(model, [farm.adapter_dir(0), farm.adapter_dir(1)], top_k=2) as routed:
        alone = arrow_weights(routed, tok, prompts, batch_size=1)
        batched = arrow_weights(routed, tok, prompts, batch_size=len(prompts))
        assert arrow_choices(routed, tok, []) == []  # a split with no rows routes none (as before batching)
    assert alone.shape == (len(prompts), 2) and (alone > 0).any(1).all()
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def served_farm(tiny_base, tmp_path_factory):
    """A farm of two adapters saved by plain PEFT on the tiny demo base, with a linear merge to fall back on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tclora.peft_merge import merge_peft_adapters

    root = tmp_path_factory.mktemp("served")
    adapters = {}
    for cid in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        torch.manual_seed(20 + cid)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))
        adapters[cid] = root / f"adapter-{cid}"
        peft_model.save_pretrained(adapters[cid])
    merge_peft_adapters(list(adapters.values()), root / "merged", ["linear"])
    vectors = {c: Embedder(MODEL).encode(texts, 64) for c, texts in GROUPS.items()}
    cluster_dir = root / "cluster"
    cluster_dir.mkdir()
    np.save(cluster_dir / "centroids.npy", np.stack([vectors[c].mean(0) for c in (0, 1)]).astype(np.float32))
    (cluster_dir / "kmeans.json").write_text(json.dumps({"mapping": {"0": 0, "1": 1}, "view": None}))
    distances = np.concatenate([np.linalg.norm(vectors[c] - vectors[c].mean(0), axis=1) for c in (0, 1)])
    return export_farm(root / "farm", cluster_dir=cluster_dir, adapter_dirs=adapters, train_distances=distances,
                       base_model=str(tiny_base), embed_model=MODEL, merge_dir=root / "merged",
                       recommended={"method": "linear"}, quantile=1.0)  # every training row is inside


def test_mixed_batches_answer_each_row_as_its_adapter_alone(served_farm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tclora.evaluate import generate_answers
    from tclora.models import load_base

    farm = Farm.load(served_farm)
    model, tok = load_base(farm.base_model)
    prompts = [GROUPS[0][1], GROUPS[1][2], FAR, GROUPS[0][3]]
    served = farm.generate(farm.peft_model(model), tok, prompts, max_new_tokens=6)
    assert [name for _, name, _ in served] == ["cluster-0", "cluster-1", "merged", "cluster-0"]
    assert len({answer for *_, answer in served}) > 1  # the adapters answer differently: a real check
    for prompt, (route, name, answer) in zip(prompts, served):
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(farm.base_model),
                                          str(farm.merged_dir if route.fallback else farm.adapter_dir(route.cluster)))
        assert answer == generate_answers(alone, tok, [prompt], max_new_tokens=6)[0]


def test_the_serving_example_runs_on_the_farm(served_farm, capsys):
    import runpy

    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "route_and_generate.py"))
    served = example["main"](["--farm", str(served_farm), "--max-new-tokens", "4", GROUPS[1][0], FAR])
    assert [name for _, name, _ in served] == ["cluster-1", "merged"] and "cluster-1" in capsys.readouterr().out
