"""Faults with real kills: the ``tclora run`` driver SIGKILLed mid-train, the merge/eval actor killed mid-merge.

Each fault is followed by the same call again (or by Ray's own retry), and the outcome is compared with
what an uninterrupted run leaves: finished work is reused, unfinished work resumes, no partial output
survives. A Train worker killed mid-run is in ``test_pipeline_train.py``.

The driver test runs the CLI in subprocesses, each in its own process group with its own local Ray
(``RAY_ADDRESS`` unset, a private ``RAY_TMPDIR``), so the kill and the clean-up reach exactly that Ray and
never the test session's or anyone else's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from tclora import adapters, artifacts
from tclora.config import validate
from tclora.merge import LowRank
from tests.helpers import demo_run_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# The driver killed mid-train


STEPS, SPARSE_STEPS = 16, 8


def driver_config(run_dir: Path, base: Path) -> dict:
    """The demo at smoke size: 66 rows, k=2, clusters trained one at a time (a kill lands between them),
    tracked in a local MLflow store beside the run."""
    return demo_run_config(
        run_dir, base,
        run={"mlflow_tracking_uri": f"sqlite:///{run_dir.parent}/mlflow.db"},
        data={"demo_train_per_task": 6, "demo_eval_per_task": 2},
        train={"steps": STEPS, "sparse_steps": SPARSE_STEPS, "checkpoint_every": 4, "max_concurrent": 1},
        merge={"methods": ["linear"]},
        eval={"max_per_task": 1},
    )


class Driver:
    """``tclora run --config <path>`` in a subprocess that leads its own process group.

    The subprocess's ``ray.init`` starts a local Ray: GCS and raylet stay in the group, workers start
    groups of their own, and all inherit ``RAY_TMPDIR=ray_tmp`` (a worker's command line is overwritten
    with its title, its environment is not). ``kill()`` SIGKILLs the group, then whatever of that Ray
    ``leftovers()`` still finds.
    """

    def __init__(self, config: Path, ray_tmp: Path, log: Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another Ray
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
        cli = Path(sys.executable).with_name("tclora")
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "pipelines.cli"]
        self.ray_tmp, self.log = str(ray_tmp), log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([*cmd, "run", "--config", str(config)], cwd=REPO, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def leftovers(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["status"]):
            try:
                if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(p.pid) == self.proc.pid or p.environ().get("RAY_TMPDIR") == self.ray_tmp:
                    found.append(p)
            except (psutil.Error, OSError):  # exited while we looked, or not ours to read
                continue
        return found

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for p in self.leftovers():  # anything of this Ray that left the group
            p.kill()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir: short (socket paths are capped at 107 bytes) and removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="tclora-ray-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _adapter_manifests(run_dir: Path) -> dict[int, dict]:
    """Finished cluster adapters staged by the train stage, with their manifests."""
    found = {}
    for path in run_dir.glob(".train_work/*/adapters/cluster-*"):
        manifest = artifacts.read_manifest(path)
        if manifest is not None and path.name.split("-", 1)[1].isdigit():
            found[int(path.name.split("-", 1)[1])] = manifest
    return found


def _checkpointed(run_dir: Path) -> set[int]:
    """Clusters with at least one Ray Train checkpoint registered (not merely being uploaded)."""
    found = set()
    for snapshot in run_dir.glob(".train_work/**/cluster-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                found.add(int(snapshot.parent.name.split("-", 1)[1]))
        except (OSError, ValueError, KeyError):  # being rewritten
            continue
    return found


def _stage_manifests(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    paths = [run_dir / "embed" / artifacts.MANIFEST, *run_dir.glob(f"cluster/*/{artifacts.MANIFEST}")]
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


@pytest.mark.timeout(2400)  # a hang guard only: 8.5 min measured on a shared, loaded 2-core machine
def test_driver_killed_mid_train_resumes_on_rerun(tiny_base, tmp_path, ray_tmp):
    """SIGKILL ``tclora run`` once one cluster's adapter is finished and the other has a checkpoint; rerun it.

    The rerun reuses embed and cluster untouched, keeps the finished adapter, resumes the other one from
    its checkpoint and finishes the run.
    """
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(driver_config(run_dir, tiny_base)))
    log = tmp_path / "driver.log"

    first, ready = Driver(config, ray_tmp, log), False
    try:
        deadline = time.time() + 1800
        while not ready and time.time() < deadline and first.proc.poll() is None:
            finished = _adapter_manifests(run_dir)
            ready = bool(finished) and bool(_checkpointed(run_dir) - set(finished))
            time.sleep(0 if ready else 0.1)
        assert ready, f"no finished adapter beside a checkpointed one to kill at:\n{first.tail()}"
    finally:
        first.kill()
    time.sleep(1)  # the kernel reaps the group; Ray's fate-sharing takes the rest down
    assert not first.leftovers(), "processes of the killed driver's Ray survived the kill"

    finished = _adapter_manifests(run_dir)
    unfinished = sorted({0, 1} - set(finished))
    assert finished and unfinished, f"killed too late to leave an unfinished cluster: {sorted(finished)}"
    stages_before = _stage_manifests(run_dir)
    assert len(stages_before) == 2  # embed and one clustering, both finished before the kill
    assert not (run_dir / "train").exists() and not (run_dir / "metrics.json").exists()

    second = Driver(config, ray_tmp, log)
    try:
        rc = second.proc.wait(timeout=1800)
    finally:
        second.kill()
    assert rc == 0, f"the rerun failed:\n{second.tail()}"

    assert _stage_manifests(run_dir) == stages_before  # embed and cluster reused, not rewritten
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stages"]["embed"]["skipped"] and metrics["stages"]["cluster"]["skipped"]
    assert not metrics["stages"]["train"]["skipped"] and {"base", "adapters", "linear"} <= set(metrics["eval"])
    assert "routed-arrow" in metrics["eval"]
    assert all(0 <= metrics["routing"][r]["test"]["accuracy"] <= 1 for r in ("centroid", "arrow"))
    assert (run_dir / "report.md").is_file() and artifacts.read_manifest(run_dir / "merge_eval") is not None
    # The run exported its farm; a training row routes back to its own cluster's adapter.
    from pipelines.cluster import read_cluster
    from tclora.farm import Farm

    farm = Farm.load(metrics["farm"])
    assert sorted(farm.info["adapters"]) == ["0", "1"] and farm.info["embed_model"]
    assert farm.kmeans_info["view"]["head"]  # the embed stage's template view: inputs are embedded through it
    (cluster_dir,) = (run_dir / "cluster").iterdir()
    for cid in (0, 1):
        rows = read_cluster(cluster_dir, cid, columns=["source"]).column("source").to_pylist()[:3]
        assert [r.cluster for r in farm.route(rows)] == [cid] * len(rows)
        assert (farm.adapter_dir(cid) / "adapter_model.safetensors").is_file()

    train = run_dir / "train"
    report = json.loads((train / "train_report.json").read_text())
    outputs = artifacts.read_manifest(train)["outputs"]
    assert sorted(report["trained"]) == unfinished  # the finished adapter was not retrained
    for cid, manifest in finished.items():
        assert report["clusters"][str(cid)] == manifest["summary"]
        assert {f: h for f, h in outputs.items() if f.startswith(f"cluster-{cid}/")} == {
            f"cluster-{cid}/{f}": h for f, h in manifest["outputs"].items()}
    for cid in unfinished:
        summary = report["clusters"][str(cid)]
        assert summary["resumes"], f"cluster {cid} restarted from scratch instead of from its checkpoint"
        assert all(r["phase"] > 0 or r["step"] > 0 for r in summary["resumes"])
        assert len(summary["losses"]["dense"]) == STEPS and len(summary["losses"]["sparse"]) == SPARSE_STEPS
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]  # no partial stage of either run
    assert not (run_dir / ".train_work").exists() or not any((run_dir / ".train_work").iterdir())
    _check_mlflow(f"sqlite:///{run_dir.parent}/mlflow.db", metrics, unfinished)


def _check_mlflow(uri: str, metrics: dict, resumed: list[int]) -> None:
    """The rerun's merge/eval scores are those of metrics.json; the resumed cluster's Train run logged its loss."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tclora").experiment_id])
    (merge_eval,) = [r for r in runs if r.info.run_name == "merge_eval"]  # only the rerun got that far
    assert merge_eval.data.metrics["linear/test"] == metrics["eval"]["linear"]["splits"]["test"]
    assert merge_eval.data.params["recommended"] == metrics["recommended"]["method"]
    train_runs = [r for r in runs if r.data.tags.get("tclora.stage") == "train"]
    for cid in resumed:
        assert any(f"loss/cluster-{cid}" in r.data.metrics for r in train_runs), cid


# ------------------------------------------------------------------------------------------------
# The merge/eval actor killed mid-merge


@pytest.fixture(scope="module")
def merge_inputs(tiny_base, tmp_path_factory) -> dict:
    """Two adapters (random factors on the tiny base), a 2-centroid clustering and a small eval split."""
    from tclora.models import load_base

    root = tmp_path_factory.mktemp("merge-inputs")
    model, _ = load_base(str(tiny_base))
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    gen = torch.Generator().manual_seed(0)
    for cid in (0, 1):
        factors = {n: LowRank(0.05 * torch.randn(d_out, 4, generator=gen), torch.randn(4, d_in, generator=gen))
                   for n, (d_out, d_in) in shapes.items()}
        adapters.save_factors(factors, root / "train" / f"cluster-{cid}", str(tiny_base), pad_for_vllm=False)
    cluster = root / "cluster"
    cluster.mkdir()
    np.save(cluster / "centroids.npy", np.random.default_rng(0).standard_normal((2, 384)).astype(np.float32))
    (cluster / "kmeans.json").write_text(json.dumps({"mapping": {"0": 0, "1": 1}}))
    words = ["apple", "river", "stone", "cloud", "tiger", "piano"]
    rows = [{"source": f"{task}: {w}", "target": w if task == "copy" else w[::-1], "task_name": task}
            for task in ("copy", "reverse") for w in words]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": tiny_base}


def merge_config(run_dir: Path, inputs: dict):
    # cp runs second (many ALS iterations, no early stop), then eval: the kill lands in one of them.
    return validate({
        "run": {"dir": str(run_dir)},
        "data": {"eval_paths": [str(inputs["root"] / "test.jsonl")]},
        "model": {"name_or_path": str(inputs["base"]), "max_length": 64},
        "merge": {"methods": ["linear", "cp"], "cp_iters": 300, "params": {"cp": {"tol": 0}}},
        "eval": {"batch_size": 64, "max_new_tokens": 6},
    })


def _merge_actor_pid() -> int | None:
    """pid of this session's MergeEvalActor process (Ray's raylet and workers descend from us)."""
    me = os.getpid()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if " ".join(p.info["cmdline"] or []).startswith("ray::MergeEvalActor") and \
                    me in {q.pid for q in p.parents()}:
                return p.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.timeout(1200)
def test_merge_actor_killed_mid_merge_is_restarted_and_redoes_the_stage(ray_session, merge_inputs, tmp_path):
    """SIGKILL the actor once its first merge is saved: Ray restarts it, retries the call, and the stage
    equals an uninterrupted run's, with nothing of the killed attempt left in it."""
    from pipelines.merge_eval import run_merge_eval

    root = merge_inputs["root"]
    clean = run_merge_eval(merge_config(tmp_path / "clean", merge_inputs), tmp_path / "clean", root / "cluster",
                           root / "train").dir

    run_dir = tmp_path / "killed"
    result: dict = {}

    def run() -> None:
        try:
            result["out"] = run_merge_eval(merge_config(run_dir, merge_inputs), run_dir, root / "cluster",
                                           root / "train").dir
        except BaseException as err:  # surfaced by the assertions below
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    killed = killed_at = None
    deadline = time.time() + 900
    while time.time() < deadline and thread.is_alive() and killed is None:
        saved = list(run_dir.glob(f".merge_eval.tmp-*/merges/linear/{adapters.ADAPTER_WEIGHTS}"))
        pid = _merge_actor_pid() if saved else None
        if pid is not None:
            # A torn write as a kill inside artifacts.atomic_write_* leaves it: a temp file no retry
            # rewrites. Planted by hand because the real window is microseconds wide.
            (saved[0].parents[2] / ".eval.json.tmp-0badc0de").write_text('{"eval": {')
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.02)
    thread.join(timeout=900)
    assert killed is not None, "the stage finished before its actor could be killed"
    assert "error" not in result, result.get("error")
    out = result["out"]

    manifest, reference = artifacts.read_manifest(out), artifacts.read_manifest(clean)
    assert manifest["actor_restarted"] and not reference["actor_restarted"]
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    assert manifest["eval"] == reference["eval"]
    formats = {m: i["format"] for m, i in reference["merge"].items()}
    assert {m: i["format"] for m, i in manifest["merge"].items()} == formats
    # Complete and intact; the same files, byte for byte, as without the kill (eval.json holds timings).
    assert artifacts.hash_tree(out) == manifest["outputs"]
    assert {f: h for f, h in manifest["outputs"].items() if f != "eval.json"} == {
        f: h for f, h in reference["outputs"].items() if f != "eval.json"}
    assert set(manifest["outputs"]) == set(reference["outputs"])
    # Everything was written after the kill: the merges were redone, nothing of the killed attempt kept.
    assert all(p.stat().st_mtime >= killed_at for p in out.rglob("*") if p.is_file())
    assert [p.name for p in run_dir.iterdir()] == ["merge_eval"]  # no temp stage directory left behind
