"""The train stage on a real local Ray: Tune runs per-cluster TorchTrainers with DeepSpeed on CPU (gloo).

Smoke size: a tiny pre-trained demo base, two clusters of 24 and 40 rows (the first held in memory, the second
streamed from its own Ray Dataset: ``train.max_rows_in_memory = 30``), a few dozen steps. Covers concurrent
clusters (ZeRO-2), packed and fused runs (ZeRO-0), two ranks on a sharded dataset (ZeRO-1), rerun no-op, and
resume after a worker is SIGKILLed mid-run (one worker holding the rows as one object, and two ranks).
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.tune
import torch
from peft import PeftModel

from tclora import artifacts, lori
from tclora.artifacts import StageResult
from tclora.config import validate
from tclora.demo_corpus import WORDS
from tclora.evaluate import mean_loss
from tclora.models import load_base

# The timeout only guards against hangs: the file takes ~3 min on an idle 2-core box, far more when shared.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

ROWS = 24  # cluster 0: at most train.max_rows_in_memory, so it travels as one object and replays from memory
STREAMED_ROWS = 40  # cluster 1: more, so it streams from its own Ray Dataset (in every run below)
SIZES = {0: ROWS, 1: STREAMED_ROWS}


def _rows(task: str, n: int, seed: int) -> list[dict]:
    """Word lists in the demo base's vocabulary (distinct rows, distinct tokens: batch order is visible)."""
    rng = random.Random(seed)
    payloads = [rng.sample(WORDS, rng.randint(2, 4)) for _ in range(n)]
    if task == "copy":
        return [{"source": f"copy: {' '.join(p)}", "target": " ".join(p), "task_name": task} for p in payloads]
    return [{"source": f"flip: {' '.join(p)}", "target": " ".join(p[::-1]), "task_name": task} for p in payloads]


def write_clusters(root: Path, clusters: dict[int, list[dict]]) -> Path:
    """A finished cluster stage in its layout: ``clusters/cluster=<id>/*.parquet``, sizes in the manifest."""
    final = root / "cluster"
    sizes = {str(cid): len(rows) for cid, rows in clusters.items()}
    with artifacts.stage_dir(final, {"test": sorted(sizes)}, {"report": {"sizes": sizes}}) as tmp:
        for cid, rows in clusters.items():
            part = tmp / "clusters" / f"cluster={cid}"
            part.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(rows), part / "part-0.parquet")
    return final


def small_cfg(run_dir: Path, base: Path, run: dict | None = None, **train):
    return validate({
        "run": {"dir": str(run_dir), "seed": 3, **(run or {})},
        "model": {"name_or_path": str(base), "max_length": 32},
        "lori": {"rank": 4, "alpha": 8.0, "sparsity": 0.8,
                 "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]},
        "train": {"steps": 16, "sparse_steps": 12, "batch_size": 8, "lr": 3e-3, "sparse_lr_multiplier": 3.0,
                  "checkpoint_every": 8, "num_workers": 1, "cpus_per_worker": 1.0, "max_failures": 2,
                  "max_rows_in_memory": 30, **train},
    })


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory) -> Path:
    # cluster -1 holds rows the cluster stage skipped: no adapter may be trained for it.
    return write_clusters(tmp_path_factory.mktemp("clusters"), {
        0: _rows("copy", ROWS, 0), 1: _rows("flip", STREAMED_ROWS, 1), -1: _rows("copy", 3, 2)})


@pytest.fixture(scope="module")
def concurrent_run(ray_session, tiny_base, cluster_dir, tmp_path_factory):
    """Both clusters through Tune at once, ZeRO-2, one worker each."""
    return _timed_train(tiny_base, cluster_dir, tmp_path_factory.mktemp("run"), zero_stage=2, max_concurrent=2)


@pytest.fixture(scope="module")
def packed_run(ray_session, tiny_base, cluster_dir, tmp_path_factory):
    """Both clusters one after another in a single Train run (train.clusters_per_run=2, fused=false), ZeRO-0."""
    return _timed_train(tiny_base, cluster_dir, tmp_path_factory.mktemp("packed"), zero_stage=0, clusters_per_run=2,
                        fused=False)


@pytest.fixture(scope="module")
def fused_run(ray_session, tiny_base, cluster_dir, tmp_path_factory):
    """Both clusters in one Train run *and* one forward/backward pass per step (train.fused), ZeRO-0, with
    gradient checkpointing (as the GPU configs train: it must not change the adapters); tracked in a local
    MLflow store."""
    run_dir = tmp_path_factory.mktemp("fused")
    return _timed_train(tiny_base, cluster_dir, run_dir, zero_stage=0, clusters_per_run=2, fused=True,
                        gradient_checkpointing=True,
                        run={"mlflow_tracking_uri": f"sqlite:///{run_dir}/mlflow.db"})


def _timed_train(tiny_base, cluster_dir, run_dir, run: dict | None = None, **train):
    from pipelines.train import run_train

    cfg = small_cfg(run_dir, tiny_base, run, **train)
    started = time.time()
    out = run_train(cfg, run_dir, cluster_dir).dir
    return cfg, out, time.time() - started


def test_pack_clusters_groups_small_clusters_deterministically():
    from pipelines.train import pack_clusters

    ids = [3, 0, 1, 2, 4]  # any size packs: a big cluster streams (cluster 1 below)
    assert pack_clusters(ids, 1) == [[0], [1], [2], [3], [4]]
    assert pack_clusters(ids, 2) == [[0, 1], [2, 3], [4]]
    assert pack_clusters(ids, 8) == [[0, 1, 2, 3, 4]]


def _late_asking_tune(tmp_path: Path, callback_factory) -> list[int]:
    """A Tune trial running a Train run of two quick reports, forwarded by ``callback_factory()`` (a context
    manager giving the Train callback), while Tune takes 2 s per result before it asks for the next one: the
    Train run and the trial's function end while a report still waits. Returns the steps the trial reported."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def worker(config):
        for step in range(2):
            ray.train.report({"step": step})

    def trial(config):
        with callback_factory() as forward:
            TorchTrainer(worker, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                         run_config=RunConfig(name="late", storage_path=str(tmp_path / "train"),
                                              callbacks=[forward])).fit()

    class SlowTune(ray.tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            time.sleep(2)

    tuner = ray.tune.Tuner(ray.tune.with_resources(trial, {"CPU": 0.1}), run_config=ray.tune.RunConfig(
        name="late", storage_path=str(tmp_path / "tune"), callbacks=[SlowTune()], verbose=0))
    (result,) = tuner.fit()
    assert result.error is None, result.error
    return result.metrics_dataframe["step"].tolist()


@pytest.mark.timeout(300)  # Ray 2.60's TuneReportCallback hangs here for good
def test_every_train_report_reaches_tune_when_tune_asks_late(ray_session, tmp_path):
    """The hang of Ray's TuneReportCallback (pipelines.train._reports_to_tune's docstring): with our forwarding
    the trial ends, with both reports, in order."""
    from pipelines.train import _reports_to_tune

    assert _late_asking_tune(tmp_path, _reports_to_tune) == [0, 1]


def test_max_concurrent_trials_from_the_scarce_resource(tmp_path):
    from pipelines.train import max_concurrent_trials

    cfg = small_cfg(tmp_path, tmp_path, cpus_per_worker=0.9)
    assert max_concurrent_trials(cfg, 5, {"CPU": 2.0}) == 2  # 2 x (0.9 + 0.1 for the trial)
    assert max_concurrent_trials(cfg, 1, {"CPU": 16.0}) == 1  # never more trials than clusters
    assert max_concurrent_trials(small_cfg(tmp_path, tmp_path, max_concurrent=3), 5, {"CPU": 1.0}) == 3
    gpu = small_cfg(tmp_path, tmp_path, num_workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
    assert max_concurrent_trials(gpu, 8, {"CPU": 32.0, "GPU": 4.0}) == 2  # GPUs are the scarce resource


def test_zero_stage_3_is_rejected_when_the_config_loads(tmp_path):
    from tclora.config import ConfigError

    with pytest.raises(ConfigError, match="train.zero_stage: .*3 is not supported"):
        small_cfg(tmp_path, tmp_path, zero_stage=3)  # the validator, before embedding and clustering


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model."): m.lora_A["default"].weight.detach().clone()
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("run", ["concurrent_run", "packed_run", "fused_run"])
def test_adapters_are_plain_peft_dirs_with_lori_invariants(run, request, tiny_base, cluster_dir):
    from pipelines.train_worker import lori_seed

    cfg, out, seconds = request.getfixturevalue(run)
    packed = run != "concurrent_run"
    report = json.loads((out / "train_report.json").read_text())
    assert sorted(p.name for p in out.glob("cluster-*")) == ["cluster-0", "cluster-1"]  # -1 skipped
    assert report["max_concurrent"] == (1 if packed else 2) and sorted(report["clusters"]) == ["0", "1"]
    for cid in (0, 1):
        adapter_dir = out / f"cluster-{cid}"
        model = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(adapter_dir))
        masks = lori.load_masks(adapter_dir)
        for name, b in lori.lora_b_params(model).items():
            assert torch.count_nonzero(b[~masks[name]]) == 0, name  # masked B entries exactly zero
            assert torch.count_nonzero(b[masks[name]]) > 0, name
        seeded = lori.attach_lori(load_base(str(tiny_base))[0], cfg.lori, lori_seed(cfg, cid))
        expected, got = _lora_a(seeded), _lora_a(model)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in got)

        summary = report["clusters"][str(cid)]
        assert summary["rows"] == SIZES[cid] and summary["world_size"] == 1
        assert summary["zero_stage"] == cfg.train.zero_stage
        assert summary["run_clusters"] == (2 if packed else 1)  # packed: both adapters from one Train run
        assert summary["steps"] == {"dense": 16, "sparse": 12}
        assert len(summary["losses"]["dense"]) == 16 and len(summary["losses"]["sparse"]) == 12
        assert summary["dense_loss_last"] < summary["dense_loss_first"]
        params = summary["parameters"]
        assert 0 < params["lori_s"] == sum(int(m.sum()) for m in masks.values()) < params["lori_d"]
    manifest = artifacts.read_manifest(out)
    assert set(manifest["adapters"]) == {"0", "1"} and manifest["seconds"] > 0
    assert not (Path(cfg.run.dir) / ".train_work").exists() or not any((Path(cfg.run.dir) / ".train_work").iterdir())


def test_fused_adapters_equal_the_ones_trained_one_after_another(packed_run, fused_run):
    """The same DeepSpeed engine, the same per-cluster batch streams (from memory for cluster 0, from its Ray
    Dataset for cluster 1, as it would alone): fusing changes only float rounding (tolerance as in
    tests/test_multi_lori.py)."""
    from safetensors.torch import load_file

    for cid in (0, 1):
        alone, fused = packed_run[1] / f"cluster-{cid}", fused_run[1] / f"cluster-{cid}"
        assert (fused / "adapter_config.json").read_bytes() == (alone / "adapter_config.json").read_bytes()
        want, got = (load_file(str(d / "adapter_model.safetensors")) for d in (alone, fused))
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
        want_masks, got_masks = lori.load_masks(alone), lori.load_masks(fused)
        assert all(torch.equal(want_masks[k], got_masks[k]) for k in want_masks)
        fused_meta = json.loads((fused / lori.LORI_FILE).read_text())
        assert fused_meta["fused"] == 2 and len(fused_meta["losses"]["dense"]) == 16


def test_a_cluster_sees_the_same_batches_alone_or_packed(concurrent_run, packed_run):
    """Both runs draw each cluster's rows by the same seed (cluster 0 replayed from memory, cluster 1 streamed):
    the first step, which no optimizer setting touches yet (B = 0), has the same loss for every adapter. (The
    runs then differ in ZeRO stage.)"""
    for cid in (0, 1):
        alone, packed = (json.loads((run[1] / f"cluster-{cid}" / lori.LORI_FILE).read_text())
                         for run in (concurrent_run, packed_run))
        assert packed["losses"]["dense"][0] == pytest.approx(alone["losses"]["dense"][0], rel=1e-6)
        assert alone["shard_rows"] == packed["shard_rows"] == SIZES[cid]


def test_fused_run_logs_each_adapters_losses_to_mlflow(fused_run):
    """Ray Tune's MLflowLoggerCallback: one MLflow run per Train run, a loss curve per adapter whose last
    point is the adapter's final loss as lori.json records it (mean of its last 10 LoRI-S steps)."""
    import mlflow

    cfg, out, _ = fused_run
    client = mlflow.MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.run.mlflow_experiment).experiment_id])
    assert run.data.tags["tclora.stage"] == "train" and run.info.run_name == "clusters-0-1"
    for cid in (0, 1):
        history = sorted(client.get_metric_history(run.info.run_id, f"loss/cluster-{cid}"), key=lambda m: m.step)
        # Reports: dense step 8, end of dense (16), sparse step 8, done (checkpoint_every=8).
        assert len(history) == 4
        meta = json.loads((out / f"cluster-{cid}" / lori.LORI_FILE).read_text())
        assert history[-1].value == pytest.approx(meta["sparse_loss_last"], rel=1e-6)


@pytest.mark.parametrize("run", ["concurrent_run", "packed_run"])
def test_adapter_beats_base_on_its_cluster(run, request, tiny_base, cluster_dir):
    _, out, _ = request.getfixturevalue(run)
    base, tok = load_base(str(tiny_base))
    for cid, rows in ((0, _rows("copy", ROWS, 0)), (1, _rows("flip", STREAMED_ROWS, 1))):
        base_loss = mean_loss(base, tok, rows, max_length=32)
        tuned = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(out / f"cluster-{cid}"))
        assert mean_loss(tuned, tok, rows, max_length=32) < base_loss


def test_rerun_is_a_no_op(concurrent_run, cluster_dir):
    """Also on another cluster: other resources, concurrency, failure budgets and checkpoint cadence (the train
    section's PLACEMENT fields) keep the finished adapters."""
    from pipelines.train import run_train

    cfg, out, first_seconds = concurrent_run
    moved = cfg.model_copy(update={"train": cfg.train.model_copy(update=dict(
        cpus_per_worker=2.0, resources={"accelerator_type:L4": 0.001}, max_concurrent=1, checkpoint_every=7,
        max_failures=0, trial_max_failures=5, gradient_checkpointing=True))})
    before = (out / artifacts.MANIFEST).read_bytes()
    started = time.time()
    assert run_train(moved, Path(cfg.run.dir), cluster_dir) == StageResult(out, reused=True)
    assert time.time() - started < 5 < first_seconds
    assert (out / artifacts.MANIFEST).read_bytes() == before


def _train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of *this* test session's Ray (raylet and workers descend from us)."""
    me, found = os.getpid(), []
    for p in psutil.process_iter(["cmdline"]):
        try:
            is_worker = " ".join(p.info["cmdline"] or []).startswith("ray::RayTrainWorker")
            if is_worker and me in {q.pid for q in p.parents()}:
                found.append(p)
        except psutil.Error:  # exited while we looked
            continue
    return found


def _registered_checkpoints(run_storage: Path) -> int:
    """Checkpoints Train has registered (a checkpoint_* dir appears earlier, while still uploading)."""
    try:  # the controller rewrites this snapshot after registering each reported checkpoint
        return len(json.loads((run_storage / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("n_workers", [1, 2])
def test_ranks_resume_after_a_worker_is_killed(ray_session, tiny_base, cluster_dir, tmp_path, n_workers):
    """SIGKILL a rank once the first checkpoint is reported: Train restarts every rank from it. One worker
    gets the run's rows as one object (train_loop_config["table"]), two split a Ray Dataset (ZeRO-1)."""
    from pipelines.train import train_group

    cfg = small_cfg(tmp_path, tiny_base, num_workers=n_workers, cpus_per_worker=1.0 / n_workers,
                    zero_stage=n_workers - 1, steps=40, sparse_steps=24, checkpoint_every=4)
    storage = tmp_path / "ray"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = train_group([0], cfg, cluster_dir, tmp_path / "adapters", storage)[0]
        except BaseException as err:  # surfaced by the assertion below
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline, killed = time.time() + 900, None
    while time.time() < deadline and thread.is_alive() and killed is None:
        if _registered_checkpoints(storage / "cluster-0"):
            workers = _train_workers()
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=900)
    assert killed is not None, "training finished before a worker could be killed"
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary["world_size"] == n_workers and summary["zero_stage"] == n_workers - 1
    assert summary["resumes"], "the run restarted from scratch instead of resuming"
    assert all(r["phase"] > 0 or r["step"] > 0 for r in summary["resumes"])  # resumed past step 0
    assert len(summary["losses"]["dense"]) == 40 and len(summary["losses"]["sparse"]) == 24
    adapter_dir = tmp_path / "adapters" / "cluster-0"
    masks = lori.load_masks(adapter_dir)
    model = PeftModel.from_pretrained(load_base(str(tiny_base))[0], str(adapter_dir))
    for name, b in lori.lora_b_params(model).items():
        assert torch.count_nonzero(b[~masks[name]]) == 0
