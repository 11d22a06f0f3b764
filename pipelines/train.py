"""Train stage: one LoRI adapter per cluster; Ray Train + DeepSpeed workers, clusters in parallel via Ray Tune.

    python -m pipelines.train --config configs/demo.yaml [--set train.max_concurrent=2 ...]  # after cluster
    tclora run --config configs/demo.yaml          # the whole pipeline; this is stage 3

Ray's train/tune interop pattern: ``train_fn_per_worker`` (:mod:`pipelines.train_worker`) is the DeepSpeed
worker, a recipe that restores, trains and saves; ``train_group`` fits
one ``TorchTrainer`` for one cluster, or for several small ones packed into one run
(``train.clusters_per_run``: worker start-up, seconds to minutes, is paid once per run instead of once
per cluster); a Tune *function* trainable calls it per group (``grid_search``), ``max_concurrent_trials``
at a time (``train_clusters``); ``run_train`` is the stage driver.

Restart safety: Train runs are named ``cluster-<id>`` (or ``clusters-<id>-<id>...``) under
``<run>/.train_work/<key>/ray`` (no timestamps), so rerunning after a crash resumes each unfinished run
from its last checkpoint; a finished cluster's adapter waits in
``<run>/.train_work/<key>/adapters/cluster-<id>`` (own manifest) and is not retrained. The work
directory is deleted once ``<run>/train`` is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import ray
import ray.tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from pipelines import session, tracking
from pipelines.cluster import finished_cluster, list_clusters, read_cluster
from pipelines.session import TRIAL_CPUS
from pipelines.train_worker import TrainCheckpoint, train_fn_per_worker
from tclora import artifacts, lori, storage
from tclora.artifacts import StageResult, short_hash
from tclora.config import Config

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------
# [1] One group of clusters: a TorchTrainer run. Its name has no timestamp, so a restart resumes it.


def stage_key(cfg: Config, cluster_dir: Path) -> dict:
    """What the train stage depends on: the clusters, the model/LoRI/train sections and the seed."""
    return {"cluster": artifacts.tree_digest(Path(cluster_dir)),
            "config": cfg.section_hash("model", "lori", "train"), "seed": cfg.run.seed}


def pack_clusters(cluster_ids: Iterable[int], per_run: int) -> list[list[int]]:
    """Cluster ids in Train-run groups of up to ``per_run`` consecutive ids. Deterministic, so a restarted
    driver finds the same run names. Any size packs: each cluster's rows reach the worker as they would alone
    (:func:`_trainer`)."""
    ids = sorted(cluster_ids)
    return [ids[i:i + per_run] for i in range(0, len(ids), per_run)]


def _run_name(cluster_ids: list[int]) -> str:
    return f"cluster-{cluster_ids[0]}" if len(cluster_ids) == 1 else "clusters-" + "-".join(map(str, cluster_ids))


def _cluster_tables(cluster_dir: Path, cluster_ids: list[int], store: storage.RunStore) -> dict[int, pa.Table]:
    """Each cluster's rows (``source``, ``target``), read in the trial's process: no read task can then starve
    once the Train workers' placement group holds the CPUs (a hang seen with 2 concurrent trials filling a
    2-CPU Ray), and a run pays no Ray Data job start-up. Read from the run's store: this runs inside a Tune
    trial, on any node."""
    return {c: read_cluster(store.path(cluster_dir), c, store.filesystem, columns=["source", "target"])
            for c in cluster_ids}


class _QueueReports(UserCallback):
    """Runs in the Train controller: puts each report (rank 0's metrics, plus ``checkpoint_path``, as Ray's
    ``TuneReportCallback``) on a queue that :func:`_reports_to_tune` drains in the trial."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint:
            item["checkpoint_path"] = checkpoint.path
        self.queue.put(item)  # unbounded: Train never waits for Tune


@contextlib.contextmanager
def _reports_to_tune() -> Iterator[UserCallback]:
    """A Train callback whose reports this Tune trial reports as its own results, one by one, from a thread of
    its own; on exit every report has been handed to Tune.

    Ray's ``TuneReportCallback`` (Ray 2.60) hangs a trial when Tune asks for its next result only after the
    training function has returned: the last Train report still waits in Ray's one-slot inter-actor queue,
    the function trainable's closing ``RESULT_DUPLICATE`` report fills the one-slot result queue, and the
    trial's main thread, moving the waiting report across, blocks forever on that full queue (its own
    consumer; ``ray/train/_internal/session.py``, ``get_next``). Seen twice in the suite's driver-kill test,
    once a trial showing 4 of its run's 5 reports for 20 minutes (py-spy: ``_report_training_result`` from
    ``get_next``'s last, non-blocking fetch); ``test_pipeline_train.py`` reproduces it. Here each report goes
    through ``ray.tune.report`` from a thread that is not the consumer, and the training function returns only
    after the last one was put.
    """
    queue = Queue(actor_options={"num_cpus": 0})

    def forward() -> None:
        while (item := queue.get()) is not None:
            ray.tune.report(item)  # blocks until the trial's main thread has taken the previous one

    thread = threading.Thread(target=forward, name="tclora-train-reports", daemon=True)
    thread.start()
    try:
        yield _QueueReports(queue)
    finally:
        queue.put(None)  # fit() has returned (or raised): the controller made its last after_report call
        thread.join()
        queue.shutdown()


def _trainer(cluster_ids: list[int], cfg: Config, cluster_dir: Path, storage_path: str | Path,
             store: storage.RunStore, callbacks: list[UserCallback]) -> TorchTrainer:
    """The group's ``TorchTrainer``: ``train.num_workers`` workers running :func:`train_fn_per_worker`,
    a run name without timestamp (a restart resumes it), the run's rows handed to the workers.

    With one worker, every cluster of at most ``train.max_rows_in_memory`` rows is held in memory anyway: those travel
    together as one object (``train_loop_config["table"]``, an ObjectRef, with a ``cluster_id`` column), with
    no Ray Data split, which costs a DatasetManager and a SplitCoordinator actor per run (the worker waited
    ~6 s for them before its first step, 2 cores). A larger cluster, or any cluster of a run with several
    workers, is its own Ray Dataset ``cluster-<id>``, split evenly across the workers and streamed. The path
    is chosen per cluster, by its own size: a cluster sees the same batches alone, packed or fused."""
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker > 0 else {}),
                 **t.resources}
    storage_path, storage_fs = store.ray_storage(storage_path)
    tables = _cluster_tables(Path(cluster_dir), cluster_ids, store)
    held = [c for c in cluster_ids if t.num_workers == 1 and tables[c].num_rows <= t.max_rows_in_memory]
    loop_config = {"cfg": cfg.model_dump(mode="json"), "cluster_ids": list(cluster_ids)}
    if held:  # owned by this trial, which lives as long as the run
        loop_config["table"] = ray.put(pa.concat_tables(
            tables[c].append_column("cluster_id", pa.array([c] * tables[c].num_rows, pa.int64())) for c in held))
    datasets = {f"cluster-{c}": ray.data.from_arrow(tables[c]) for c in cluster_ids if c not in held}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=_run_name(cluster_ids), storage_path=storage_path, storage_filesystem=storage_fs, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures,
                                         preemption_grace_s=t.preemption_grace_s),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # No worker_runtime_env of ours: DeepSpeed's accelerator is set by the worker itself, and every
            # extra runtime env is one more kind of worker process Ray cannot take from those it has started.
        ),
        datasets=datasets or None,
    )


def train_group(cluster_ids: list[int], cfg: Config, cluster_dir: Path, out_dir: Path, storage_path: str | Path,
                *, report_to_tune: bool = False, store: storage.RunStore | None = None,
                sizes: dict[int, int] | None = None) -> dict[int, dict]:
    """Train (or resume, or reuse) these clusters' adapters in one Ray Train run; returns their summaries.

    Each adapter lands in ``out_dir/cluster-<id>`` (written atomically, its manifest holding the
    summary). Ray Train checkpoints live in ``storage_path/<run name>``: after a worker failure Train
    restarts the workers from the last one (``train.max_failures`` times); calling this again after a
    driver crash resumes from it.

    ``store`` (default: ``out_dir``'s own local directory) is the run's store when this runs in a Tune
    trial on another node: the paths are then the driver's, mapped onto the store (:meth:`RunStore.path`),
    the adapters are published there, and ``sizes`` (rows per cluster) come from the driver.
    """
    store = store or storage.store_for(cfg, out_dir)
    key = stage_key(cfg, cluster_dir)
    finals = {c: Path(out_dir) / f"cluster-{c}" for c in cluster_ids}
    if not store.remote and all(artifacts.is_complete(finals[c], {**key, "cluster_id": c}) for c in cluster_ids):
        return {c: artifacts.read_manifest(finals[c])["summary"] for c in cluster_ids}
    started, t = time.time(), cfg.train
    sizes = sizes or list_clusters(Path(cluster_dir))  # from the stage manifest: Dataset.count() costs a read
    for c in cluster_ids:
        if sizes[c] < t.num_workers:
            raise ValueError(f"cluster {c} has {sizes[c]} rows, fewer than train.num_workers={t.num_workers}")
    # In a Tune trial every Train report becomes a trial result (progress table, MLflow curves).
    with _reports_to_tune() if report_to_tune else contextlib.nullcontext() as forward:
        result = _trainer(cluster_ids, cfg, cluster_dir, storage_path, store, [forward] if forward else []).fit()
    summaries = {}
    with result.checkpoint.as_directory() as ckpt:
        wall = round(time.time() - started, 2)
        for c in cluster_ids:
            src = TrainCheckpoint.adapter(ckpt, c)
            meta = json.loads((src / lori.LORI_FILE).read_text())
            summaries[c] = {"rows": sizes[c], "wall_seconds": wall, "run_clusters": len(cluster_ids), **meta}
            summary_key = {**key, "cluster_id": c}
            with storage.stage_dir_anywhere(store, finals[c], summary_key, {"summary": summaries[c]}) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            log.info("cluster %d: adapter in %s (%d rows, %.0fs in the worker, %d resumes)", c, finals[c],
                     sizes[c], meta["seconds"], len(meta["resumes"]))
    return summaries


# ------------------------------------------------------------------------------------------------
# [2] All clusters: a Tune function trainable per group, max_concurrent_trials at once.


def max_concurrent_trials(cfg: Config, n_clusters: int, resources: dict | None = None) -> int:
    """``train.max_concurrent``, or as many trials as the scarce resource (CPU or GPU) fits at once."""
    t = cfg.train
    if t.max_concurrent:
        return max(1, min(t.max_concurrent, n_clusters))
    fits = session.trials_that_fit({"CPU": t.num_workers * t.cpus_per_worker + TRIAL_CPUS,
                                    "GPU": t.num_workers * t.gpus_per_worker}, resources)
    return max(1, min(fits, n_clusters))


def _group_trial(config: dict, cfg_json: dict, cluster_dir: str, work_dir: str, store: storage.RunStore,
                 sizes: dict[int, int]) -> None:
    """Tune function trainable: one group's ``train_group`` (the trial itself needs almost no CPU).

    It may run on any node: it reads and writes through ``store``, never the driver's disk.

    The trial's results are the Train run's own reports (:func:`_reports_to_tune`); it reports nothing else.
    """
    ids = [int(c) for c in config["cluster_ids"]]
    train_group(ids, Config.model_validate(cfg_json), Path(cluster_dir), Path(work_dir) / "adapters",
                Path(work_dir) / "ray", report_to_tune=True, store=store, sizes=sizes)


def train_clusters(groups: list[list[int]], cfg: Config, cluster_dir: Path, work_dir: Path,
                   store: storage.RunStore | None = None) -> int:
    """Train the groups of clusters (:func:`pack_clusters`; ``[[0], [1], ...]`` unpacked) through Ray Tune,
    one Train run per group, into ``work_dir/adapters``; returns the concurrency used.

    Ray Train checkpoints and Tune's experiment state go below ``work_dir`` on the run's ``store``
    (default: ``work_dir``'s local directory); with an object store the adapters are published there and
    this pulls them into ``work_dir/adapters`` afterwards.

    Raises:
        RuntimeError: naming every cluster whose trial failed.
    """
    concurrent = max_concurrent_trials(cfg, len(groups))
    log.info("training %d cluster adapter(s) in %d Train run(s), %d at a time", sum(map(len, groups)),
             len(groups), concurrent)
    store = store or storage.store_for(cfg, work_dir)
    sizes = list_clusters(Path(cluster_dir))
    trainable = ray.tune.with_parameters(_group_trial, cfg_json=cfg.model_dump(mode="json"), store=store,
                                         cluster_dir=str(cluster_dir), work_dir=str(work_dir), sizes=sizes)
    tune_path, tune_fs = store.ray_storage(Path(work_dir) / "tune")
    name = lambda trial: _run_name(trial.config["cluster_ids"])  # noqa: E731
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        param_space={"cluster_ids": ray.tune.grid_search([list(g) for g in groups])},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=name,
                                        trial_dirname_creator=name),
        run_config=ray.tune.RunConfig(name="train", storage_path=tune_path, storage_filesystem=tune_fs, verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=cfg.train.trial_max_failures),
                                      callbacks=tracking.tune_callbacks(cfg, "train")),  # MLflow, when configured
    )
    failed = {tuple(r.config.get("cluster_ids", ())): r.error for r in tuner.fit() if r.error}
    if failed:
        ids = sorted(c for group in failed for c in group)
        raise RuntimeError(f"training failed for cluster(s) {ids}: {next(iter(failed.values()))}")
    store.fetch(Path(work_dir) / "adapters")  # adapters the trials published (a no-op for a local store)
    return concurrent


def run_train(cfg: Config, run_dir: Path, cluster_dir: Path, final: Path | None = None) -> StageResult:
    """Stage driver: ``<run_dir>/train/cluster-<id>/`` PEFT adapters + ``train_report.json`` + manifest.

    ``final`` puts the stage elsewhere in the run (model-based clustering trains its short per-task
    adapters into the cluster stage's area, ``pipelines/mbc.py``).

    A no-op when the manifest matches; after a crash, finished clusters are reused and unfinished ones
    resume from their Ray Train checkpoints. Clusters the cluster stage skipped (id -1) get no adapter.

    Raises:
        ValueError: the cluster stage produced no cluster to train.
    """
    run_dir, cluster_dir = Path(run_dir).resolve(), Path(cluster_dir).resolve()
    final, key = Path(final or run_dir / "train").resolve(), stage_key(cfg, cluster_dir)
    if artifacts.is_complete(final, key):
        log.info("train: reusing %s", final)
        return StageResult(final, reused=True)
    started = time.time()
    sizes = {cid: n for cid, n in list_clusters(cluster_dir).items() if cid >= 0 and n > 0}
    if not sizes:
        raise ValueError(f"{cluster_dir}: no cluster with rows to train on")
    work = run_dir / ".train_work" / short_hash(key, 12)
    store = storage.store_for(cfg, run_dir)
    store.fetch(work / "adapters")  # adapters a killed earlier driver's trials finished
    todo = [c for c in sorted(sizes)
            if not artifacts.is_complete(work / "adapters" / f"cluster-{c}", {**key, "cluster_id": c})]
    log.info("train: %d clusters, %d to train, %d reused (%s)", len(sizes), len(todo), len(sizes) - len(todo), work)
    groups = pack_clusters(todo, cfg.train.clusters_per_run)
    if (cfg.train.disentangle or cfg.train.merge_aware) and (alone := [g[0] for g in groups if len(g) == 1]):
        log.warning("train: cluster(s) %s train alone in their Train run, so without train.disentangle's penalty "
                    "or train.merge_aware's merged-sum loss (no other cluster of their run)", alone)
    if cfg.train.merge_aware and len(groups) > 1:
        log.warning("train: train.merge_aware trains the %d clusters in %d Train runs; clusters of different runs "
                    "never learn to sum with each other (demo, 2 runs of 2: the merge kept 39%% of the gain, 93%% "
                    "in one run): raise train.clusters_per_run as far as a worker's memory allows",
                    len(todo), len(groups))
    concurrent = train_clusters(groups, cfg, cluster_dir, work, store) if todo else 0
    extra: dict[str, Any] = {}
    with artifacts.stage_dir(final, key, extra) as tmp:
        clusters = {}
        for cid in sorted(sizes):
            src = work / "adapters" / f"cluster-{cid}"
            artifacts.link_tree(src, tmp / src.name, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
            clusters[str(cid)] = artifacts.read_manifest(src)["summary"]
        seconds = round(time.time() - started, 2)
        artifacts.atomic_write_json(tmp / "train_report.json", {
            "clusters": clusters, "trained": todo, "max_concurrent": concurrent, "seconds": seconds})
        extra.update(seconds=seconds, adapters={str(c): f"cluster-{c}" for c in sorted(sizes)})
    store.remove(work)  # Ray checkpoints + staged adapters, here and on the store: all now inside `final`
    return StageResult(final, reused=False)


def finished_train(cfg: Config, run_dir: Path, cluster_dir: Path) -> Path:
    """This config's finished train stage in ``run_dir`` (for a later stage run alone).

    Raises:
        pipelines.session.MissingStageError: the train stage has not finished for these clusters.
    """
    run_dir, cluster_dir = Path(run_dir).resolve(), Path(cluster_dir).resolve()
    return session.require_finished(run_dir / "train", stage_key(cfg, cluster_dir), "train")


def _run_alone(cfg: Config, run_dir: Path) -> StageResult:
    return run_train(cfg, run_dir, finished_cluster(cfg, run_dir))


def main(argv: list[str] | None = None) -> int:
    return session.stage_main("train", _run_alone, argv)


if __name__ == "__main__":
    sys.exit(main())
