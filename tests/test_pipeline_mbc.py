"""``cluster.by: adapters`` (model-based clustering) through the real pipeline on a local Ray: embed,
one short LoRA per task through the train stage (Ray Train + DeepSpeed), tasks grouped by their updates.

The corpus is the demo's trained families, each split into two task names (``<family>-0``, ``<family>-1``):
tasks whose halves ask the same thing, so grouping them into k = one per family must pair the halves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel

from tclora.config import ConfigError, validate
from tclora.data import write_jsonl
from tclora.demo_corpus import TASK_FAMILIES, generate_split
from tests.helpers import demo_run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

MBC_STEPS = 6
K = len(TASK_FAMILIES)  # one cluster per family


def _raw(run_dir: Path, base: Path, corpus: Path) -> dict:
    return demo_run_config(run_dir, base, data={"path": str(corpus)}, embed={"view": "source"},
                           cluster={"k": K, "by": "adapters", "mbc_steps": MBC_STEPS},
                           lori={"target_modules": ["q_proj", "v_proj", "down_proj"]},
                           train={"clusters_per_run": 2 * K, "lr": 1e-2})


@pytest.fixture(scope="module")
def mbc_run(ray_session, tiny_base, tmp_path_factory):
    from pipelines.run import run

    root = tmp_path_factory.mktemp("mbc")
    rows = generate_split("train", 24, 0)
    for i, r in enumerate(rows):
        r["task_name"] = f"{r['task_name']}-{i % 2}"
    write_jsonl(root / "corpus.jsonl", rows)
    raw = _raw(root / "run", tiny_base, root / "corpus.jsonl")
    stages = run(validate(raw), until="cluster")["stages"]
    return root, raw, stages


def test_mbc_pairs_the_halves_of_each_family_and_writes_a_cluster_stage(mbc_run):
    root, _, _ = mbc_run
    final = next((root / "run" / "cluster").glob(f"mbc-k{K}-*"))
    report = json.loads((final / "report.json").read_text())
    info = json.loads((final / "mbc.json").read_text())
    families = {t: t.rsplit("-", 1)[0] for t in info["tasks"]}
    pairs = {}
    for task, cluster in info["cluster_of"].items():
        pairs.setdefault(cluster, set()).add(families[task])
    assert sorted(len(f) for f in pairs.values()) == [1] * K, info["cluster_of"]  # halves together
    assert report["by"] == "adapters" and report["k"] == K and report["n_rows"] == K * 24
    # Every row once, whole tasks: each task's rows are all in its cluster's partition.
    for cid in range(K):
        part = pq.read_table(final / "clusters" / f"cluster={cid}", partitioning=None)
        assert {info["cluster_of"][t] for t in part.column("task_name").to_pylist()} == {cid}
    assert (final / "centroids.npy").is_file() and (final / "mbc_similarity.png").is_file()
    assert "mbc_similarity.png" in (final / "cluster_report.md").read_text()


def test_mbc_similarity_is_the_cosine_of_peft_deltas_of_plain_lora_adapters(mbc_run, tiny_base):
    from sklearn.cluster import KMeans

    from tclora.models import load_base

    root, raw, _ = mbc_run
    final = next((root / "run" / "cluster").glob(f"mbc-k{K}-*"))
    info = json.loads((final / "mbc.json").read_text())
    short = next(p for p in (root / "run" / "cluster").glob("tasks-*-adapters"))
    flat = []
    for i, _ in enumerate(info["tasks"]):
        adapter = short / f"cluster-{i}"
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        lori_meta = json.loads((adapter / "lori.json").read_text())
        assert lori_meta["mode"] == "lora" and lori_meta["steps"] == {"dense": MBC_STEPS}  # short, plain LoRA
        model = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(adapter))
        deltas = [m.get_delta_weight("default").flatten() for name, m in sorted(model.named_modules())
                  if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})]
        assert len(deltas) == 2 * len(cfg["target_modules"])  # 2 layers x 3 modules: PEFT's own deltas
        flat.append(torch.cat(deltas).double())
    flat = torch.stack(flat)
    unit = flat / flat.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(info["similarity"], (unit @ unit.T).numpy(), atol=1e-5)
    expected = KMeans(K, n_init=10, random_state=raw["run"]["seed"]).fit_predict(np.array(info["similarity"]))
    got = [info["cluster_of"][t] for t in info["tasks"]]
    assert len({(e, g) for e, g in zip(expected, got)}) == K  # the same partition as scikit-learn's


def test_mbc_rerun_is_a_no_op_and_another_k_reuses_the_short_adapters(mbc_run):
    from pipelines.run import run

    root, raw, _ = mbc_run
    final = next((root / "run" / "cluster").glob(f"mbc-k{K}-*"))
    short = next((root / "run" / "cluster").glob("tasks-*-adapters"))
    before, short_before = (final / "manifest.json").read_bytes(), (short / "manifest.json").read_bytes()
    # The main adapters' own settings (LoRI-S steps) are not what the short LoRAs train with: no re-clustering.
    again = {**raw, "train": {**raw["train"], "steps": raw["train"]["steps"] + 1}}
    stages = run(validate(again), until="cluster")["stages"]
    assert stages["cluster"]["skipped"] and (final / "manifest.json").read_bytes() == before
    stages = run(validate({**raw, "cluster": {**raw["cluster"], "k": 2}}), until="cluster")["stages"]
    assert not stages["cluster"]["skipped"] and (short / "manifest.json").read_bytes() == short_before
    info = json.loads((next((root / "run" / "cluster").glob("mbc-k2-*")) / "mbc.json").read_text())
    assert sorted(set(info["cluster_of"].values())) == [0, 1]


def _embedded(tasks: list[str | None]):
    """A dataset laid out as the embed stage writes it: row i has task ``tasks[i]`` and embedding [i] * 4."""
    import pyarrow as pa
    import ray.data

    n = len(tasks)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(np.arange(n), 4), pa.float32()), 4)
    return ray.data.from_arrow(pa.table({"row_id": [f"corpus.jsonl:{i + 1}" for i in range(n)],
                                         "source": [f"s{i}" for i in range(n)],
                                         "task_name": pa.array(tasks, pa.string()), "embedding": vectors}))


def test_mbc_task_summary_needs_a_task_name_on_every_row(ray_session):
    from pipelines.mbc import _task_summary

    summary = _task_summary(_embedded(["b", "a"] * 3))
    assert {t: e["n"] for t, e in summary.items()} == {"a": 3, "b": 3}
    np.testing.assert_allclose(summary["a"]["mean"], np.full(4, 3.0))  # rows 1, 3, 5
    with pytest.raises(ConfigError, match=r"task_name, but 1 rows have none \(e.g. corpus.jsonl:5\)"):
        _task_summary(_embedded(["b", "a", "b", "a", None, "a"]))
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        _task_summary(_embedded(["a"] * 6))
    with pytest.raises(ConfigError, match="k 'auto'.*by 'adapters'"):
        validate({"cluster": {"k": "auto", "by": "adapters"}})
