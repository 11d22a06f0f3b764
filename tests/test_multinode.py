"""Runs on real infrastructure, each the whole tiny demo pipeline, with run.dir on a real S3 server (SeaweedFS):

- the reference, in this session's own local Ray (one node): every output read back from the bucket, nothing
  written to a local directory named ``s3:``;
- the same run as users submit it, ``ray job submit --runtime-env cluster_configs/runtime_env.yaml -- tclora
  run ...``, on a two-node Ray cluster whose second node cannot see the driver's working copy, the merge/eval
  actor forced onto that node: the same files, adapters and scores as the reference (1e-6);
- autoscaling, simulated: the reference rerun from a fresh working copy on a head whose autoscaler (Ray's
  ``fake_multinode`` provider) adds accelerator workers (min 0) for the train stage and the merge/eval actor
  and removes them when idle; embed and cluster come back from the bucket.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import yaml
from safetensors.numpy import load as load_safetensors

from tests.cluster_fixtures import BIN, EVAL_NODE_RESOURCE, FAKE_GPU, IDLE_TIMEOUT_MINUTES
from tests.helpers import demo_run_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.multinode]
ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = int(os.environ.get("TCLORA_TEST_RUN_TIMEOUT", "2400"))  # seconds; minutes on a quiet machine


def _config(tmp: Path, base: Path, seaweedfs: dict, name: str, local_dir: Path, **sections) -> Path:
    # Both clusters' adapters in one Train run, fused and trained for their sum as well, as configs/demo.yaml
    # trains them: half the worker start-ups.
    sections["train"] = {"clusters_per_run": 2, "merge_aware": 0.1, **sections.get("train", {})}
    raw = demo_run_config(Path("unused"), base, **sections)
    raw["run"].update(dir=f"s3://{seaweedfs['bucket']}/runs/{name}", local_dir=str(local_dir),
                      storage_options={"endpoint": seaweedfs["endpoint"]})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tclora_run(config: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "tclora"), "run", "--config", str(config)], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, f"tclora run failed:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return out


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _outputs(fs: pafs.FileSystem, root: str) -> dict:
    """What a run left in the bucket: metrics, every adapter's tensors, the stage manifests."""
    files = {f.path[len(root) + 1:] for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if f.type == pafs.FileType.File}
    adapters = {p: load_safetensors(_read(fs, f"{root}/{p}")) for p in files
                if p.startswith("train/cluster-") and p.endswith(".safetensors")}
    lori_meta = {p: json.loads(_read(fs, f"{root}/{p}")) for p in files
                 if p.startswith("train/cluster-") and p.endswith("/lori.json")}
    return {"files": {_comparable_path(f) for f in files}, "metrics": json.loads(_read(fs, f"{root}/metrics.json")),
            "adapters": adapters, "lori": lori_meta,
            "merge_eval": json.loads(_read(fs, f"{root}/merge_eval/manifest.json"))}


def _comparable_path(path: str) -> str:
    """``path`` without what differs between equal runs: the names Ray Data gives the Parquet files it writes
    (the dataset's id), and the input hash in a cluster stage's directory (the corpus lies under run.dir)."""
    path = re.sub(r"^cluster/k(\d+)-[0-9a-f]+/", r"cluster/k\1-*/", path)
    return path.rsplit("/", 1)[0] + "/*.parquet" if path.endswith(".parquet") else path


def _scores(tree, prefix="") -> dict[str, float]:
    """Every number in ``metrics["eval"]``, by dotted key."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _scores(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


@pytest.fixture(scope="module")
def single_node_s3_run(ray_session, tmp_path_factory, tiny_base, seaweedfs):
    """The reference: the tiny demo with run.dir on the bucket, run in this test session's own local Ray
    (one node, one filesystem). Run from an empty directory, so a run.dir turned into a local path shows."""
    from pipelines.run import run
    from tclora.config import load_config

    tmp = tmp_path_factory.mktemp("s3run")
    config = _config(tmp, tiny_base, seaweedfs, "single", tmp / "working-copy")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        run(load_config(config))
    finally:
        os.chdir(cwd)
    return {"tmp": tmp, "outputs": _outputs(seaweedfs["filesystem"], "tclora/runs/single")}


@pytest.fixture(scope="module")
def submitted_job(tmp_path_factory, tiny_base, seaweedfs, ray_cluster):
    """The same run as users submit it: ``ray job submit --runtime-env cluster_configs/runtime_env.yaml`` to
    the two-node cluster, the merge/eval actor forced onto the node that cannot see the driver's working copy
    (which lies in the directory that node sees as an empty tmpfs)."""
    tmp = tmp_path_factory.mktemp("job")
    config = _config(tmp, tiny_base, seaweedfs, "job", ray_cluster["hidden"] / "job",
                     eval={"resources": {EVAL_NODE_RESOURCE: 1}})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_cluster["dashboard"], "--working-dir", ".",
           "--runtime-env", "cluster_configs/runtime_env.yaml", "--", "tclora", "run", "--config", str(config)]
    out = subprocess.run(cmd, env=ray_cluster["env"], cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, f"job failed:\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}"
    return {"log": log, "outputs": _outputs(seaweedfs["filesystem"], "tclora/runs/job")}


def test_s3_run_dir_outputs_are_read_back_from_the_bucket(single_node_s3_run):
    run = single_node_s3_run
    out, files = run["outputs"], run["outputs"]["files"]
    for name in ("metrics.json", "report.md", "merge_comparison.png", "embed/manifest.json",
                 "embed/quarantine/rows.jsonl", "train/manifest.json", "train/train_report.json",
                 "merge_eval/manifest.json", "merge_eval/eval.json", "corpus/train.jsonl"):
        assert name in files, f"{name} missing from the bucket"
    assert any(f.startswith("embed/embeddings/") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("cluster/") and f.endswith("centroids.npy") for f in files)
    assert any(f.startswith("merge_eval/merges/cp/") for f in files)
    assert sorted(p for p in out["adapters"] if p.endswith("adapter_model.safetensors")) == [
        "train/cluster-0/adapter_model.safetensors", "train/cluster-1/adapter_model.safetensors"]  # k=2 (+ LoRI masks)
    assert not any(f.startswith(".staging/") or "/.train_work/" in f or f.startswith(".train_work/") for f in files)
    assert out["metrics"]["data"]["rows"] > 0 and "cp" in out["metrics"]["eval"]
    for cid in (0, 1):  # the Train worker trained them as one fused group, with the merged-sum loss
        meta = out["lori"][f"train/cluster-{cid}/lori.json"]
        assert meta["fused"] == 2 and meta["merge_aware"] == 0.1
    for cwd in (run["tmp"], ROOT):  # the driver's, and the suite's Ray workers' (started from the checkout)
        assert not (cwd / "s3:").exists(), "run.dir=s3://... must never become a local directory 's3:'"


def test_job_on_two_nodes_equals_the_single_node_run(submitted_job, single_node_s3_run, ray_cluster):
    log, two, one = submitted_job["log"], submitted_job["outputs"], single_node_s3_run["outputs"]
    assert "Failed to merge the Job's runtime env" not in log  # the shipped env_vars and the driver's own
    assert "connecting to the cluster" in log  # the job's driver joins the cluster, never starts its own Ray
    assert two["files"] == one["files"], "the two runs left different files in the bucket"

    nodes = json.loads(subprocess.run([str(BIN / "ray"), "list", "nodes", "--format", "json", "--address",
                                       ray_cluster["dashboard"]], env=ray_cluster["env"], capture_output=True,
                                      text=True, timeout=120, check=True).stdout)
    eval_node = [n["node_id"] for n in nodes if EVAL_NODE_RESOURCE in (n.get("resources_total") or {})]
    assert two["merge_eval"]["node_id"] == eval_node[0], "the merge/eval actor ran off the second node"

    assert sorted(two["adapters"]) == sorted(one["adapters"])
    for name, tensors in one["adapters"].items():
        for key, value in tensors.items():
            np.testing.assert_allclose(two["adapters"][name][key], value, atol=1e-6, rtol=0, err_msg=f"{name}:{key}")
    a, b = _scores(one["metrics"]["eval"]), _scores(two["metrics"]["eval"])
    assert a.keys() == b.keys() and a
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-6, f"eval.{key}: single node {a[key]}, two nodes {b[key]}"


def _nodes(env: dict) -> list[dict]:
    """The cluster's node table, dead nodes included, from a short client process (this test process keeps
    the suite's own local Ray)."""
    code = ("import json, ray; ray.init(log_to_driver=False); print(json.dumps([{'node_id': n['NodeID'], "
            "'alive': n['Alive'], 'resources': n['Resources']} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_autoscaler_adds_accelerator_workers_for_the_run_and_removes_them_when_idle(tmp_path, tiny_base, seaweedfs,
                                                                                    single_node_s3_run,
                                                                                    autoscaling_cluster):
    env = autoscaling_cluster["env"]
    before = _nodes(env)
    assert [n for n in before if FAKE_GPU in n["resources"]] == []  # min_workers 0: the run starts on a head alone
    # The reference run again, from a fresh working copy, now with training and the merge/eval actor asking
    # for the accelerator only the autoscaled worker type has (as train.gpus_per_worker / eval.num_gpus do on
    # cluster_configs/aws.yaml): embed and cluster come back from the bucket. Resources alone would leave the
    # finished stages reusable (placement is not in a stage's key), so another learning rate makes train, and
    # with new adapters merge_eval, run anew.
    config = _config(tmp_path, tiny_base, seaweedfs, "single", tmp_path / "working-copy",
                     train={"resources": {FAKE_GPU: 1}, "lr": 2e-3}, eval={"resources": {FAKE_GPU: 1}})
    started = time.time()
    _tclora_run(config, env, cwd=tmp_path)
    out = _outputs(seaweedfs["filesystem"], "tclora/runs/single")
    stages = out["metrics"]["stages"]
    assert stages["embed"]["skipped"] and stages["cluster"]["skipped"], "the finished stages were redone"
    assert not stages["train"]["skipped"] and not stages["merge_eval"]["skipped"] and "cp" in out["metrics"]["eval"]
    assert len([p for p in out["adapters"] if p.endswith("adapter_model.safetensors")]) == 2
    # The merge/eval actor's node, from the stage manifest: not the head, so the autoscaler launched it. Checked
    # by id, not by looking for a live accelerator node now: on a slow machine the worker may already have been
    # idle for idle_timeout_minutes and removed (a dead node's resources read as empty in ray.nodes()).
    eval_node = out["merge_eval"]["node_id"]
    assert eval_node not in {n["node_id"] for n in before}, "the merge/eval actor ran on the head: nothing was launched"
    deadline = time.time() + IDLE_TIMEOUT_MINUTES * 60 + 180
    while True:  # idle_timeout_minutes: every launched worker is removed again
        nodes = _nodes(env)
        alive = [n for n in nodes if n["alive"] and n["node_id"] not in {b["node_id"] for b in before}]
        assert all(FAKE_GPU in n["resources"] for n in alive), f"a launched node of another type: {alive}"
        if not alive:
            assert eval_node in {n["node_id"] for n in nodes}, "the launched worker is unknown to the head"
            break
        assert time.time() < deadline, f"idle workers still up {time.time() - started:.0f} s after the run started"
        time.sleep(5)
