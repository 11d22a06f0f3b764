"""Train stage: one LoRI adapter per cluster; Ray Train + DeepSpeed workers, clusters in parallel via Ray Tune.

    python -m pipelines.train --config configs/demo.yaml [--set train.max_concurrent=2 ...]
    python -m pipelines.run --config configs/demo.yaml          # the whole pipeline; this is stage 3

Ray's train/tune interop pattern: ``train_fn_per_worker`` is the DeepSpeed worker; ``train_group`` fits
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

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.cluster import list_clusters, read_cluster
from tclora import artifacts, data, lori, storage
from tclora.config import Config, load_config
from tclora.train import lori_phases, train_loop

log = logging.getLogger(__name__)

TRIAL_CPUS = 0.1  # a Tune trial only drives its TorchTrainer; its workers reserve the real CPUs
DS_TAG = "engine"  # DeepSpeed checkpoint tag inside every Ray checkpoint
STATE_FILE = "state.json"
ADAPTERS_SUBDIR = "adapters"  # finished PEFT adapters (cluster-<id>/) in every later checkpoint
READ_BATCH = 256  # rows per Ray Data batch; tokenised and regrouped into train batches in the worker
CACHE_ROWS = 100_000  # shards up to this many rows are replayed from memory after the first epoch


def lori_seed(cfg: Config, cluster_id: int) -> int:
    """Seed of a cluster's frozen random A: one per cluster, or the run seed for all with ``lori.shared_a``."""
    return cfg.run.seed if cfg.lori.shared_a else cfg.run.seed + cluster_id


# ------------------------------------------------------------------------------------------------
# [1] The Ray Train worker: plain DeepSpeed training plus a few Ray touchpoints (marked "Ray:").


def _replay(cache: list, seed: int, first_epoch: int = 0):
    """Endless epochs over examples held in memory, reshuffled per epoch."""
    for epoch in itertools.count(first_epoch):
        order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield from (cache[i] for i in order)


def _examples(shard, tokenizer, cfg: Config, seed: int, stats: dict):
    """Endless tokenised examples from this worker's shard, epoch after epoch.

    The first epoch streams through Ray Data. A shard of at most ``CACHE_ROWS`` rows is then replayed
    from memory, reshuffled per epoch: a Ray Data epoch costs a fixed 0.2-30 s on 2 cores (split
    coordination, task processes; more under load), more than a small cluster's training steps.
    Larger shards stream again every epoch.
    """
    cache: list | None = []
    for epoch in itertools.count():
        if epoch and cache is not None:
            yield from _replay(cache, seed, first_epoch=epoch)  # endless
        rows = 0
        # Ray: each iter_batches call is one epoch over this worker's share of the cluster.
        for chunk in shard.iter_batches(batch_size=READ_BATCH, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * READ_BATCH, local_shuffle_seed=seed + epoch):
            for source, target in zip(chunk["source"], chunk["target"]):
                example = data.tokenize_example(tokenizer, str(source), str(target), cfg.model.max_length)
                rows += 1
                if cache is not None:
                    cache.append(example)
                    cache = cache if len(cache) <= CACHE_ROWS else None  # too big to hold: stream each epoch
                yield example
        if rows == 0:
            raise RuntimeError("this worker's data shard is empty (more workers than rows?)")
        stats["shard_rows"] = rows


def _by_cluster(shard, tokenizer, cfg: Config) -> dict[int, list]:
    """Packed clusters: this worker's shard read once, tokenised examples per cluster id (they fit:
    ``pack_clusters`` caps a group at ``CACHE_ROWS`` rows)."""
    buckets: dict[int, list] = {}
    for chunk in shard.iter_batches(batch_size=READ_BATCH, batch_format="numpy"):  # Ray: one pass
        for cluster_id, source, target in zip(chunk["cluster_id"], chunk["source"], chunk["target"]):
            example = data.tokenize_example(tokenizer, str(source), str(target), cfg.model.max_length)
            buckets.setdefault(int(cluster_id), []).append(example)
    return buckets


def _batches(examples, batch_size: int, pad_id: int):
    """Fixed-size batches across epoch boundaries: a shard smaller than a batch still trains."""
    while True:
        yield data.collate([next(examples) for _ in range(batch_size)], pad_id)


def _make_engine(deepspeed, model, cfg: Config, lr: float, use_gpu: bool):
    """A fresh DeepSpeed engine + AdamW over the trainable B's (one per LoRI phase)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=cfg.train.weight_decay)
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: ZeRO-1/2 partition its state fine
        "bf16": {"enabled": use_gpu and cfg.model.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,  # DeepSpeed's step logging would drown Tune's progress table
    }
    # Ray Train already initialised torch.distributed (gloo on CPU, NCCL on GPU); DeepSpeed wraps it.
    return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)[0]


def _meta(cfg: Config, cluster_id: int, phases, state: dict, model, masks, world: int, stats: dict) -> dict:
    """``lori.json`` of the finished adapter: LoRI settings, losses per phase, parameter counts, resumes."""
    meta: dict[str, Any] = {
        "cluster_id": cluster_id, "seed": lori_seed(cfg, cluster_id), "rank": cfg.lori.rank, "alpha": cfg.lori.alpha,
        "mode": cfg.lori.mode, "sparsity": cfg.lori.sparsity, "mask_scope": cfg.lori.mask_scope,
        "shared_a": cfg.lori.shared_a, "world_size": world, "zero_stage": cfg.train.zero_stage,
        "steps": {p.name: p.steps for p in phases}, "losses": state["losses"], "resumes": state["resumes"],
        "shard_rows": stats.get("shard_rows"), "seconds": round(state["seconds"], 2)}
    for name, losses in state["losses"].items():
        meta[f"{name}_loss_first"], meta[f"{name}_loss_last"] = losses[0], sum(losses[-10:]) / len(losses[-10:])
    if masks is not None:
        meta["parameters"] = lori.parameter_counts(masks, lori.lora_a_shapes(model))
    return meta


def _report(metrics: dict, engine, state: dict, masks, finished: Path, rank: int) -> None:
    """Ray: every rank checkpoints its share (DeepSpeed writes per-rank ZeRO files; Ray merges the dirs).

    Rank 0 adds the run's state, the current mask and every adapter finished so far (``finished``), so
    the last checkpoint holds all of the run's adapters and any checkpoint resumes the rest.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if engine is not None:  # frozen base weights are excluded: a checkpoint holds B + optimizer only
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            artifacts.atomic_write_json(Path(tmp) / STATE_FILE, state)
            if masks is not None:
                lori.save_masks(masks, tmp)
            if any(finished.iterdir()):
                shutil.copytree(finished, Path(tmp) / ADAPTERS_SUBDIR)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def train_fn_per_worker(config: dict) -> None:
    """One rank of one Train run: attach → LoRI-D → mask → LoRI-S for each of its clusters in turn.

    ``config``: ``{"cfg": Config as JSON, "cluster_ids": [int, ...]}``; more than one id means packed
    small clusters on one worker, trained one after another on the same loaded base (PEFT's ``unload``
    gives it back untouched). Resumable at any report: a checkpoint holds ``state.json`` (cluster
    position, phase, steps done, losses, resumes), the current mask, DeepSpeed's engine checkpoint (B,
    AdamW moments, per-rank ZeRO partitions; resuming is bit-exact for ZeRO 0-2) and every finished
    PEFT adapter in ``adapters/cluster-<id>/``.
    """
    started = [time.time()]  # wall time since the last report (a list: the report closure resets it)
    cfg, cluster_ids = Config.model_validate(config["cfg"]), [int(c) for c in config["cluster_ids"]]
    use_gpu = cfg.train.gpus_per_worker > 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")  # read when deepspeed is imported
    import deepspeed

    from tclora.models import load_base_for

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    phases = lori_phases(cfg.train, cfg.lori)
    state: dict[str, Any] = {"position": 0, "phase": 0, "step": 0, "losses": {}, "resumes": [], "seconds": 0.0}
    finished = Path(tempfile.mkdtemp(prefix="tclora-adapters-"))  # this run's adapters, in every checkpoint
    masks = restore = None
    checkpoint = ray.train.get_checkpoint()  # Ray: set after a worker failure or a driver restart
    if checkpoint is not None:
        restore = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="tclora-restore-")))
        state = json.loads((restore / STATE_FILE).read_text())
        masks = lori.load_masks(restore) if (restore / lori.MASK_FILE).is_file() else None
        if (restore / ADAPTERS_SUBDIR).is_dir():
            shutil.copytree(restore / ADAPTERS_SUBDIR, finished, dirs_exist_ok=True)
        state["resumes"].append({"position": state["position"], "phase": state["phase"], "step": state["step"]})
        log.info("clusters %s rank %d: resuming at cluster %d phase %d step %d", cluster_ids, rank,
                 state["position"], state["phase"], state["step"])
        if state["position"] >= len(cluster_ids):  # finished before a driver restart: hand back the same adapters
            ray.train.report({"finished": True}, checkpoint=Checkpoint.from_directory(str(restore)) if rank == 0 else None)
            for tmp in (restore, finished):
                shutil.rmtree(tmp, ignore_errors=True)
            return
    base, tokenizer = load_base_for(cfg.model)
    if use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    shard = ray.train.get_dataset_shard("train")  # Ray: this rank's share of the run's rows
    packed = _by_cluster(shard, tokenizer, cfg) if len(cluster_ids) > 1 else None
    for position in range(state["position"], len(cluster_ids)):
        cluster_id = cluster_ids[position]
        seed = lori_seed(cfg, cluster_id)
        torch.manual_seed(seed + rank)
        model = lori.attach_lori(base, cfg.lori, seed, cfg.model.name_or_path)
        if use_gpu:
            model.to(ray.train.torch.get_device())
        stats: dict = {}
        example_seed = seed * 1000 + 100 * len(state["resumes"]) + rank
        if packed is None:
            examples = _examples(shard, tokenizer, cfg, example_seed, stats)
        else:
            stats["shard_rows"] = len(packed[cluster_id])
            examples = _replay(packed[cluster_id], example_seed)
        stream = _batches(examples, cfg.train.batch_size, tokenizer.pad_token_id)
        for index in range(state["phase"], len(phases)):
            phase, masked = phases[index], None
            if phase.name == "sparse":
                masked = lori.MaskedB(model, masks)  # hooks before the engine: masked grads reach ZeRO's buckets
                masked.reset_()
            engine = _make_engine(deepspeed, model, cfg, phase.lr, use_gpu)
            if restore is not None:
                loaded = state["step"] == 0 or engine.load_checkpoint(str(restore / "ds"), tag=DS_TAG,
                                                                      load_module_strict=False)[0] is not None
                if not loaded:
                    raise RuntimeError(f"cluster {cluster_id}: no DeepSpeed state in checkpoint {restore}")
                shutil.rmtree(restore, ignore_errors=True)
                restore = None
            history = state["losses"][phase.name] = state["losses"].get(phase.name, [])[: state["step"]]

            def report(step: int, engine=None, done: bool = False) -> None:
                state["seconds"] += time.time() - started[0]
                started[0] = time.time()
                metrics = {"cluster_id": cluster_id, "phase": phase.name, "step": step,
                           "finished": done and position + 1 == len(cluster_ids), "clusters_done": state["position"],
                           "loss": sum(history[-10:]) / len(history[-10:]), "resumes": len(state["resumes"])}
                _report(metrics, engine, state, masks, finished, rank)

            def on_step(step: int, loss: float) -> None:
                history.append(loss)
                if (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < phase.steps:
                    state.update(phase=index, step=step + 1)
                    report(step + 1, engine)

            train_loop(engine, stream, phase.steps, masked=masked, start_step=state["step"], on_step=on_step,
                       desc=f"cluster {cluster_id} LoRI {phase.name}")
            engine.destroy()  # drops ZeRO's grad hooks: the next phase's engine installs its own
            if masked is not None:
                masked.remove()
            if index + 1 < len(phases):
                if phases[index + 1].name == "sparse":
                    masks = lori.extract_masks(lori.lora_b_params(model), cfg.lori.sparsity, cfg.lori.mask_scope)
                state.update(phase=index + 1, step=0)  # a phase-end checkpoint resumes at the next phase's start
                if phase.steps >= cfg.train.checkpoint_every:  # a shorter phase is cheaper to redo than to save
                    report(phase.steps)
        # The cluster is done: its adapter joins the finished ones and the next cluster starts afresh.
        state["seconds"] += time.time() - started[0]
        started[0] = time.time()
        if rank == 0:  # B is replicated on every rank under ZeRO 0-2: rank 0 saves it whole
            meta = _meta(cfg, cluster_id, phases, state, model, masks, world, stats)
            lori.save_lori_adapter(model, finished / f"cluster-{cluster_id}", masks, meta)
        state.update(position=position + 1, phase=0, step=0, losses={}, seconds=0.0)
        masks = None
        report(phases[-1].steps, done=True)
        base = model.unload()  # the base without LoRI layers (B never touched its weights)
    shutil.rmtree(finished, ignore_errors=True)  # every adapter is in the last checkpoint now


# ------------------------------------------------------------------------------------------------
# [2] One cluster: a TorchTrainer run. Its name has no timestamp, so a restart resumes it.


def stage_key(cfg: Config, cluster_dir: Path) -> dict:
    """What the train stage depends on: the clusters, the model/LoRI/train sections and the seed."""
    return {"cluster": artifacts.tree_digest(Path(cluster_dir)),
            "config": cfg.section_hash("model", "lori", "train"), "seed": cfg.run.seed}


def pack_clusters(sizes: dict[int, int], per_run: int, max_rows: int = CACHE_ROWS) -> list[list[int]]:
    """Cluster ids in Train-run groups: up to ``per_run`` consecutive ids and ``max_rows`` rows each
    (a larger cluster runs alone). Deterministic, so a restarted driver finds the same run names."""
    groups: list[list[int]] = []
    rows = 0
    for cluster_id in sorted(sizes):
        if not groups or len(groups[-1]) >= per_run or rows + sizes[cluster_id] > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(cluster_id)
        rows += sizes[cluster_id]
    return groups


def _run_name(cluster_ids: list[int]) -> str:
    return f"cluster-{cluster_ids[0]}" if len(cluster_ids) == 1 else "clusters-" + "-".join(map(str, cluster_ids))


def _run_dataset(cluster_dir: Path, cluster_ids: list[int], store: storage.RunStore):
    """The run's rows, read before ``fit()``: once the Train workers' placement group holds its CPUs,
    read tasks that still need a whole free CPU can starve (a hang seen with 2 concurrent trials filling
    a 2-CPU Ray). A materialised dataset is split per epoch without any task. Packed runs get a
    ``cluster_id`` column. Read from the run's store: this runs inside a Tune trial, on any node."""
    parts = []
    for cluster_id in cluster_ids:
        part = read_cluster(store.path(cluster_dir), cluster_id, store.filesystem).select_columns(["source", "target"])
        if len(cluster_ids) > 1:
            part = part.add_column("cluster_id", lambda batch, c=cluster_id: pa.array([c] * batch.num_rows, pa.int64()),
                                   batch_format="pyarrow")
        parts.append(part)
    return parts[0].union(*parts[1:]).materialize() if len(parts) > 1 else parts[0].materialize()


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
    callbacks = []
    if report_to_tune:  # forwards every Train report to the Tune trial (progress table, trial metrics)
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker > 0 else {}),
                 **t.resources}
    storage_path, storage_fs = store.ray_storage(storage_path)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "cluster_ids": list(cluster_ids)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=_run_name(cluster_ids), storage_path=storage_path, storage_filesystem=storage_fs, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures,
                                         preemption_grace_s=t.preemption_grace_s),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # DeepSpeed picks its accelerator when imported: the workers' environment must say which.
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if t.gpus_per_worker > 0 else "cpu"}},
        ),
        datasets={"train": _run_dataset(Path(cluster_dir), cluster_ids, store)},  # split evenly across the workers
    )
    summaries = {}
    with trainer.fit().checkpoint.as_directory() as ckpt:
        wall = round(time.time() - started, 2)
        for c in cluster_ids:
            src = Path(ckpt) / ADAPTERS_SUBDIR / f"cluster-{c}"
            meta = json.loads((src / lori.LORI_FILE).read_text())
            summaries[c] = {"rows": sizes[c], "wall_seconds": wall, "run_clusters": len(cluster_ids), **meta}
            with storage.stage_dir_anywhere(store, finals[c], {**key, "cluster_id": c}, {"summary": summaries[c]}) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            log.info("cluster %d: adapter in %s (%d rows, %.0fs in the worker, %d resumes)", c, finals[c],
                     sizes[c], meta["seconds"], len(meta["resumes"]))
    return summaries


# ------------------------------------------------------------------------------------------------
# [3] All clusters: a Tune function trainable per cluster, max_concurrent_trials at once.


def max_concurrent_trials(cfg: Config, n_clusters: int, resources: dict | None = None) -> int:
    """``train.max_concurrent``, or as many trials as the scarce resource (CPU or GPU) fits at once."""
    t = cfg.train
    if t.max_concurrent:
        return max(1, min(t.max_concurrent, n_clusters))
    resources = resources if resources is not None else ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 0) / (t.num_workers * t.cpus_per_worker + TRIAL_CPUS) + 1e-9)
    if t.gpus_per_worker > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0) / (t.num_workers * t.gpus_per_worker) + 1e-9))
    return max(1, min(fits, n_clusters))


def _group_trial(config: dict, cfg_json: dict, cluster_dir: str, work_dir: str, store: storage.RunStore,
                 sizes: dict[int, int]) -> None:
    """Tune function trainable: one group's ``train_group`` (the trial itself needs almost no CPU).

    It may run on any node: it reads and writes through ``store``, never the driver's disk."""
    ids = [int(c) for c in config["cluster_ids"]]
    summaries = train_group(ids, Config.model_validate(cfg_json), Path(cluster_dir), Path(work_dir) / "adapters",
                            Path(work_dir) / "ray", report_to_tune=True, store=store, sizes=sizes)
    last = summaries[ids[-1]]
    ray.tune.report({"cluster_id": ids[-1], "finished": True,
                     "loss": last.get("sparse_loss_last", last.get("dense_loss_last"))})


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
                                      failure_config=ray.tune.FailureConfig(max_failures=cfg.train.trial_max_failures)),
    )
    failed = {tuple(r.config.get("cluster_ids", ())): r.error for r in tuner.fit() if r.error}
    if failed:
        ids = sorted(c for group in failed for c in group)
        raise RuntimeError(f"training failed for cluster(s) {ids}: {next(iter(failed.values()))}")
    store.fetch(Path(work_dir) / "adapters")  # adapters the trials published (a no-op for a local store)
    return concurrent


def run_train(cfg: Config, run_dir: Path, cluster_dir: Path) -> Path:
    """Stage driver: ``<run_dir>/train/cluster-<id>/`` PEFT adapters + ``train_report.json`` + manifest.

    A no-op when the manifest matches; after a crash, finished clusters are reused and unfinished ones
    resume from their Ray Train checkpoints. Clusters the cluster stage skipped (id -1) get no adapter.

    Raises:
        ValueError: the cluster stage produced no cluster to train.
    """
    run_dir, cluster_dir = Path(run_dir).resolve(), Path(cluster_dir).resolve()
    final, key = run_dir / "train", stage_key(cfg, cluster_dir)
    if artifacts.is_complete(final, key):
        log.info("train: reusing %s", final)
        return final
    started = time.time()
    sizes = {cid: n for cid, n in list_clusters(cluster_dir).items() if cid >= 0 and n > 0}
    if not sizes:
        raise ValueError(f"{cluster_dir}: no cluster with rows to train on")
    work = run_dir / ".train_work" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    store = storage.store_for(cfg, run_dir)
    store.fetch(work / "adapters")  # adapters a killed earlier driver's trials finished
    todo = [c for c in sorted(sizes)
            if not artifacts.is_complete(work / "adapters" / f"cluster-{c}", {**key, "cluster_id": c})]
    log.info("train: %d clusters, %d to train, %d reused (%s)", len(sizes), len(todo), len(sizes) - len(todo), work)
    groups = pack_clusters({c: sizes[c] for c in todo}, cfg.train.clusters_per_run)
    concurrent = train_clusters(groups, cfg, cluster_dir, work, store) if todo else 0
    extra: dict[str, Any] = {}
    with artifacts.stage_dir(final, key, extra) as tmp:
        clusters = {}
        for cid in sorted(sizes):
            src = work / "adapters" / f"cluster-{cid}"
            shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
            clusters[str(cid)] = artifacts.read_manifest(src)["summary"]
        seconds = round(time.time() - started, 2)
        artifacts.atomic_write_json(tmp / "train_report.json", {
            "clusters": clusters, "trained": todo, "max_concurrent": concurrent, "seconds": seconds})
        extra.update(seconds=seconds, adapters={str(c): f"cluster-{c}" for c in sorted(sizes)})
    store.remove(work)  # Ray checkpoints + staged adapters, here and on the store: all now inside `final`
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one LoRI adapter per cluster (the train stage).")
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--cluster-dir", help="cluster stage output (default: the run's, for this config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipelines.cluster import run_cluster
    from pipelines.session import init_ray, prepare_inputs

    cfg = load_config(args.config, args.set)
    run_dir = Path(cfg.run.dir).resolve()
    init_ray(cfg)
    cfg = prepare_inputs(cfg, run_dir)
    if args.cluster_dir is None and artifacts.read_manifest(run_dir / "embed") is None:
        parser.error(f"no finished embed stage in {run_dir}: run the embed and cluster stages first")
    cluster_dir = Path(args.cluster_dir) if args.cluster_dir else run_cluster(cfg, run_dir, run_dir / "embed")
    print(run_train(cfg, run_dir, cluster_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
