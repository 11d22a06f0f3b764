"""Train stage: one LoRI adapter per cluster; Ray Train + DeepSpeed workers, clusters in parallel via Ray Tune.

    python -m pipelines.train --config configs/demo.yaml [--set train.max_concurrent=2 ...]
    python -m pipelines.run --config configs/demo.yaml          # the whole pipeline, this is stage 3

Ray's train/tune interop pattern (``train_tune_interop.py``): ``train_fn_per_worker`` is the DeepSpeed
worker; ``train_cluster`` builds a ``TorchTrainer`` for one cluster and fits it; a Tune *function*
trainable calls ``train_cluster`` once per cluster id (``grid_search``), ``max_concurrent_trials`` of them
at a time. ``run_train`` is the stage driver (manifest, reuse, assembly of ``<run>/train/``).

Restart safety: Train runs are named ``cluster-<id>`` under ``<run>/.train_work/<key>/ray`` (no
timestamps), so a rerun after a crash resumes every unfinished cluster from its last checkpoint; a
finished cluster's adapter sits in ``<run>/.train_work/<key>/adapters/cluster-<id>`` with its own
manifest and is not trained again. The work directory is deleted once ``<run>/train`` is complete.
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

import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.cluster import list_clusters, read_cluster
from tclora import artifacts, data, lori
from tclora.config import Config, ConfigError, load_config
from tclora.train import lori_phases, train_loop

log = logging.getLogger(__name__)

TRIAL_CPUS = 0.1  # a Tune trial only drives its TorchTrainer; its workers reserve the real CPUs
DS_TAG = "engine"  # DeepSpeed checkpoint tag inside every Ray checkpoint
STATE_FILE = "state.json"
ADAPTER_SUBDIR = "adapter"
READ_BATCH = 256  # rows per Ray Data batch; tokenised and regrouped into train batches in the worker
CACHE_ROWS = 100_000  # shards up to this many rows are replayed from memory after the first epoch


def lori_seed(cfg: Config, cluster_id: int) -> int:
    """Seed of a cluster's frozen random A: one per cluster, or the run seed for all with ``lori.shared_a``."""
    return cfg.run.seed if cfg.lori.shared_a else cfg.run.seed + cluster_id


# ------------------------------------------------------------------------------------------------
# [1] The Ray Train worker: plain DeepSpeed training plus four Ray touchpoints (marked "Ray:").


def _ds_config(cfg: Config, use_gpu: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # we pass torch's AdamW: ZeRO partitions its state fine
        "bf16": {"enabled": use_gpu and cfg.model.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,  # DeepSpeed's own step logging would drown Tune's progress table
    }


def _examples(shard, tokenizer, cfg: Config, seed: int, stats: dict):
    """Endless tokenised examples from this worker's shard, epoch after epoch.

    The first epoch streams through Ray Data. A shard of at most ``CACHE_ROWS`` rows is then replayed
    from memory, reshuffled each epoch: re-executing the read for every epoch of a small cluster cost
    more than the training steps on 2 cores (tens of seconds per epoch under load). Larger shards
    stream every epoch.
    """
    cache: list | None = []
    for epoch in itertools.count():
        if epoch and cache is not None:
            gen = torch.Generator().manual_seed(seed + epoch)
            yield from (cache[i] for i in torch.randperm(len(cache), generator=gen).tolist())
            continue
        rows = 0
        # Ray: each iter_batches call is one (streamed) epoch over this worker's share of the cluster.
        for chunk in shard.iter_batches(batch_size=READ_BATCH, batch_format="numpy",
                                        local_shuffle_buffer_size=4 * READ_BATCH, local_shuffle_seed=seed + epoch):
            for source, target in zip(chunk["source"], chunk["target"]):
                example = data.tokenize_example(tokenizer, str(source), str(target), cfg.model.max_length)
                rows += 1
                if cache is not None:
                    cache.append(example)
                    if len(cache) > CACHE_ROWS:
                        cache = None
                yield example
        if rows == 0:
            raise RuntimeError("this worker's data shard is empty (more workers than rows?)")
        stats["shard_rows"] = rows


def _batches(examples, batch_size: int, pad_id: int):
    """Fixed-size batches across epoch boundaries: a shard smaller than a batch still trains."""
    while True:
        yield data.collate([next(examples) for _ in range(batch_size)], pad_id)


def _make_engine(deepspeed, model, cfg: Config, lr: float, use_gpu: bool):
    """A fresh DeepSpeed engine + AdamW over the trainable B's (one per LoRI phase)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    # Ray Train already initialised torch.distributed (gloo on CPU, NCCL on GPU); DeepSpeed wraps it.
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(cfg, use_gpu))
    return engine


def _report(metrics: dict, engine, state: dict, masks, adapter_meta: dict | None, model, rank: int) -> None:
    """Ray: checkpoint every rank's share (DeepSpeed writes per-rank ZeRO files; Ray merges the dirs)."""
    with tempfile.TemporaryDirectory() as tmp:
        if engine is not None:  # frozen base weights are excluded: a checkpoint holds B + optimizer only
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            artifacts.atomic_write_json(Path(tmp) / STATE_FILE, state)
            if masks is not None:
                lori.save_masks(masks, tmp)
            if adapter_meta is not None:
                lori.save_lori_adapter(model, Path(tmp) / ADAPTER_SUBDIR, masks, adapter_meta)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def train_fn_per_worker(config: dict) -> None:
    """One rank of one cluster's LoRI training: attach → LoRI-D → mask → LoRI-S, resumable at any report.

    ``config``: ``{"cfg": Config as JSON, "cluster_id": int}``. State in each checkpoint: ``state.json``
    (phase index, steps done, losses, resumes), the mask, DeepSpeed's engine checkpoint (B, AdamW moments,
    per-rank ZeRO partitions) and, in the last one, the finished PEFT adapter in ``adapter/``.
    """
    cfg, cluster_id = Config.model_validate(config["cfg"]), int(config["cluster_id"])
    use_gpu = cfg.train.gpus_per_worker > 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")  # before deepspeed's import
    import deepspeed

    from tclora.models import load_base_for

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    started = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = lori_seed(cfg, cluster_id)
    torch.manual_seed(seed + rank)
    model, tokenizer = load_base_for(cfg.model)
    model = lori.attach_lori(model, cfg.lori, seed, cfg.model.name_or_path)
    if use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        model.to(device)
    phases = lori_phases(cfg.train, cfg.lori)
    state: dict[str, Any] = {"phase": 0, "step": 0, "losses": {}, "resumes": [], "seconds": 0.0}
    masks = restore = None
    checkpoint = ray.train.get_checkpoint()  # Ray: set after a worker failure or a driver restart
    if checkpoint is not None:
        restore = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="tclora-restore-")))
        state = json.loads((restore / STATE_FILE).read_text())
        masks = lori.load_masks(restore) if (restore / lori.MASK_FILE).is_file() else None
        state["resumes"].append({"phase": state["phase"], "step": state["step"]})
        log.info("cluster %d rank %d: resuming at phase %d step %d", cluster_id, rank, state["phase"], state["step"])
    if state["phase"] >= len(phases):  # finished before a driver restart: hand back the same adapter
        _rereport_final(restore, state, rank)
        return
    shard = ray.train.get_dataset_shard("train")  # Ray: this rank's share of the cluster's rows
    stats: dict = {}
    examples = _examples(shard, tokenizer, cfg, seed * 1000 + rank + 17 * len(state["resumes"]), stats)
    stream = _batches(examples, cfg.train.batch_size, tokenizer.pad_token_id)
    meta: dict[str, Any] = {"cluster_id": cluster_id, "seed": seed, "rank": cfg.lori.rank, "alpha": cfg.lori.alpha,
                            "mode": cfg.lori.mode, "sparsity": cfg.lori.sparsity, "mask_scope": cfg.lori.mask_scope,
                            "shared_a": cfg.lori.shared_a, "world_size": world, "zero_stage": cfg.train.zero_stage}
    for index in range(state["phase"], len(phases)):
        phase = phases[index]
        masked = None
        if phase.name == "sparse":
            masked = lori.MaskedB(model, masks)  # hooks before the engine: masked grads reach ZeRO's buckets
            masked.reset_()
        engine = _make_engine(deepspeed, model, cfg, phase.lr, use_gpu)
        if restore is not None and state["step"] > 0:
            path, _ = engine.load_checkpoint(str(restore / "ds"), tag=DS_TAG, load_module_strict=False)
            if path is None:
                raise RuntimeError(f"cluster {cluster_id}: no DeepSpeed state in checkpoint {restore}")
        restore = None
        history = state["losses"].setdefault(phase.name, [])[: state["step"]]
        state["losses"][phase.name] = history

        def on_step(step: int, loss: float) -> None:
            history.append(loss)
            done = step + 1
            if done % cfg.train.checkpoint_every == 0 and done < phase.steps:
                state.update(phase=index, step=done, seconds=state["seconds"] + time.time() - started)
                _report(_metrics(cluster_id, phase.name, index, done, history, state), engine, state, masks, None, model, rank)

        train_loop(engine, stream, phase.steps, masked=masked, start_step=state["step"], on_step=on_step,
                   desc=f"cluster {cluster_id} LoRI {phase.name}")
        engine.destroy()  # drops ZeRO's grad hooks: the next phase's engine installs its own
        if masked is not None:
            masked.remove()
        meta[f"{phase.name}_loss_first"] = history[0]
        meta[f"{phase.name}_loss_last"] = sum(history[-10:]) / len(history[-10:])
        if index + 1 < len(phases) and phases[index + 1].name == "sparse":
            masks = lori.extract_masks(lori.lora_b_params(model), cfg.lori.sparsity, cfg.lori.mask_scope)
        last = index + 1 == len(phases)
        state.update(phase=index + 1, step=0, seconds=state["seconds"] + time.time() - started)
        started = time.time()
        if last:
            if masks is not None:
                meta["parameters"] = lori.parameter_counts(masks, lori.lora_a_shapes(model))
            meta.update(steps={p.name: p.steps for p in phases}, losses=state["losses"], shard_rows=stats.get("shard_rows"),
                        resumes=state["resumes"], seconds=round(state["seconds"], 2))
        _report(_metrics(cluster_id, phase.name, index, phase.steps, history, state), None, state, masks,
                meta if last else None, model, rank)


def _metrics(cluster_id: int, phase: str, index: int, step: int, history: list[float], state: dict) -> dict:
    window = history[-10:] or [float("nan")]
    return {"cluster_id": cluster_id, "phase": phase, "phase_index": index, "step": step,
            "loss": sum(window) / len(window), "resumes": len(state["resumes"]), "phase_done": state["phase"] > index}


def _rereport_final(restore: Path, state: dict, rank: int) -> None:
    """Every rank reports once (Ray's report is a barrier); rank 0 re-uploads the finished checkpoint."""
    metrics = {"resumes": len(state["resumes"]), "done": True}
    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(restore)) if rank == 0 else None)


# ------------------------------------------------------------------------------------------------
# [2] One cluster: a TorchTrainer run. Its name has no timestamp, so a restart resumes it.


def stage_key(cfg: Config, cluster_dir: Path) -> dict:
    """What the train stage depends on: the clusters, the model/LoRI/train sections and the seed."""
    return {"cluster": artifacts.tree_digest(Path(cluster_dir)),
            "config": cfg.section_hash("model", "lori", "train"), "seed": cfg.run.seed}


def _scaling_config(cfg: Config) -> ScalingConfig:
    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def train_cluster(cluster_id: int, cfg: Config, cluster_dir: Path, out_dir: Path, storage_path: Path,
                  *, report_to_tune: bool = False) -> dict:
    """Train (or resume, or reuse) one cluster's adapter into ``out_dir/cluster-<id>``; returns its summary.

    Ray Train checkpoints live in ``storage_path/cluster-<id>``: after a worker failure Train restarts
    the workers from the last one (``train.max_failures`` times); after a driver crash calling this again
    resumes from it. The adapter directory is written atomically with a manifest holding the summary.
    """
    final = Path(out_dir) / f"cluster-{cluster_id}"
    key = {**stage_key(cfg, cluster_dir), "cluster_id": cluster_id}
    if artifacts.is_complete(final, key):
        return artifacts.read_manifest(final)["summary"]
    started = time.time()
    rows = list_clusters(Path(cluster_dir))[cluster_id]  # from the stage manifest: Dataset.count() costs a read
    dataset = read_cluster(Path(cluster_dir), cluster_id).select_columns(["source", "target"])
    if rows < cfg.train.num_workers:
        raise ValueError(f"cluster {cluster_id} has {rows} rows, fewer than train.num_workers={cfg.train.num_workers}")
    callbacks = []
    if report_to_tune:  # forwards every Train report to the Tune trial (progress table, trial metrics)
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "cluster_id": cluster_id},
        scaling_config=_scaling_config(cfg),
        run_config=RunConfig(
            name=f"cluster-{cluster_id}",
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # DeepSpeed picks its accelerator at import time; workers must see this before importing it.
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cfg.train.gpus_per_worker > 0 else "cpu"}},
            callbacks=callbacks,
        ),
        datasets={"train": dataset},  # split evenly across the workers (streaming_split)
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        meta = json.loads((Path(ckpt) / ADAPTER_SUBDIR / lori.LORI_FILE).read_text())
        summary = {"rows": rows, "wall_seconds": round(time.time() - started, 2), **meta}
        with artifacts.stage_dir(final, key, {"summary": summary}) as tmp:
            shutil.copytree(Path(ckpt) / ADAPTER_SUBDIR, tmp, dirs_exist_ok=True)
    log.info("cluster %d: adapter in %s (%d rows, %.0fs, resumed %d times)", cluster_id, final, rows,
             summary["wall_seconds"], len(meta.get("resumes", [])))
    return summary


# ------------------------------------------------------------------------------------------------
# [3] All clusters: a Tune function trainable per cluster, max_concurrent_trials at once.


def max_concurrent_trials(cfg: Config, n_clusters: int, resources: dict | None = None) -> int:
    """``train.max_concurrent``, or as many trials as the scarce resource (CPU or GPU) fits at once."""
    if cfg.train.max_concurrent:
        return max(1, min(cfg.train.max_concurrent, n_clusters))
    resources = resources if resources is not None else ray.cluster_resources()
    t = cfg.train
    fits = math.floor(resources.get("CPU", 0) / (t.num_workers * t.cpus_per_worker + TRIAL_CPUS) + 1e-9)
    if t.gpus_per_worker > 0:
        fits = min(fits, math.floor(resources.get("GPU", 0) / (t.num_workers * t.gpus_per_worker) + 1e-9))
    return max(1, min(fits, n_clusters))


def _cluster_trial(config: dict, cfg_json: dict, cluster_dir: str, work_dir: str) -> None:
    """Tune function trainable: one cluster's ``train_cluster`` (the trial itself needs almost no CPU)."""
    work = Path(work_dir)
    summary = train_cluster(int(config["cluster_id"]), Config.model_validate(cfg_json), Path(cluster_dir),
                            work / "adapters", work / "ray", report_to_tune=True)
    ray.tune.report({"cluster_id": config["cluster_id"], "finished": True,
                     "loss": summary.get("sparse_loss_last", summary.get("dense_loss_last"))})


def train_clusters(cluster_ids: list[int], cfg: Config, cluster_dir: Path, work_dir: Path) -> int:
    """Train the given clusters through Ray Tune; adapters land in ``work_dir/adapters``.

    Returns the number of concurrent trials used. Raises RuntimeError naming every failed cluster.
    """
    concurrent = max_concurrent_trials(cfg, len(cluster_ids))
    log.info("training %d cluster adapter(s), %d at a time", len(cluster_ids), concurrent)
    trainable = ray.tune.with_parameters(_cluster_trial, cfg_json=cfg.model_dump(mode="json"),
                                         cluster_dir=str(cluster_dir), work_dir=str(work_dir))
    name = lambda trial: f"cluster-{trial.config['cluster_id']}"  # noqa: E731
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        param_space={"cluster_id": ray.tune.grid_search(list(cluster_ids))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=name,
                                        trial_dirname_creator=name),
        run_config=ray.tune.RunConfig(name="train", storage_path=str(Path(work_dir, "tune").resolve()), verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    failed = {r.config.get("cluster_id"): r.error for r in results if r.error}
    if failed:
        raise RuntimeError(f"training failed for cluster(s) {sorted(failed)}: {next(iter(failed.values()))}")
    return concurrent


def run_train(cfg: Config, run_dir: Path, cluster_dir: Path) -> Path:
    """Stage driver: ``<run_dir>/train/cluster-<id>/`` PEFT adapters + ``train_report.json`` + manifest.

    A no-op when the manifest matches; after a crash, finished clusters are reused and unfinished ones
    resume from their Ray Train checkpoints.

    Raises:
        ConfigError: ``train.zero_stage`` is 3 (see below).
        ValueError: the cluster stage produced no trainable cluster.
    """
    run_dir, cluster_dir = Path(run_dir).resolve(), Path(cluster_dir).resolve()
    final, key = run_dir / "train", stage_key(cfg, cluster_dir)
    if artifacts.is_complete(final, key):
        log.info("train: reusing %s", final)
        return final
    if cfg.train.zero_stage == 3:
        # ZeRO-3 shards every parameter, B included: masks, projection and saving would need gathers
        # around every step. B is tiny, so ZeRO-3 saves nothing here; the base is frozen anyway.
        raise ConfigError("train.zero_stage: 3 is not supported for LoRI adapters; use 0, 1 or 2")
    started = time.time()
    sizes = {cid: n for cid, n in list_clusters(cluster_dir).items() if cid >= 0 and n > 0}  # -1: skipped rows
    if not sizes:
        raise ValueError(f"{cluster_dir}: no cluster with rows to train on")
    work = run_dir / ".train_work" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    adapters_dir = work / "adapters"
    todo = [c for c in sorted(sizes)
            if not artifacts.is_complete(adapters_dir / f"cluster-{c}", {**key, "cluster_id": c})]
    log.info("train: %d cluster(s), %d to train, %d reused from %s", len(sizes), len(todo), len(sizes) - len(todo), work)
    concurrent = train_clusters(todo, cfg, cluster_dir, work) if todo else 0
    extra: dict[str, Any] = {}
    with artifacts.stage_dir(final, key, extra) as tmp:
        clusters = {}
        for cid in sorted(sizes):
            src = adapters_dir / f"cluster-{cid}"
            shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns(artifacts.MANIFEST))
            clusters[str(cid)] = artifacts.read_manifest(src)["summary"]
        artifacts.atomic_write_json(tmp / "train_report.json", {
            "clusters": clusters, "trained": todo, "max_concurrent": concurrent,
            "seconds": round(time.time() - started, 2)})
        extra.update(seconds=round(time.time() - started, 2), adapters={str(c): f"cluster-{c}" for c in sorted(sizes)})
    shutil.rmtree(work, ignore_errors=True)  # Ray checkpoints + staged adapters: all now inside `final`
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train one LoRI adapter per cluster (the train stage).")
    parser.add_argument("--config", help="YAML config (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--cluster-dir", help="cluster stage output (default: <run.dir>/cluster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipelines.run import init_ray, prepare_inputs

    cfg = load_config(args.config, args.set)
    run_dir = Path(cfg.run.dir).resolve()
    init_ray(cfg)
    cfg = prepare_inputs(cfg, run_dir)
    cluster_dir = Path(args.cluster_dir or run_dir / "cluster")
    if artifacts.read_manifest(cluster_dir) is None:
        parser.error(f"{cluster_dir} is not a finished cluster stage; run the cluster stage first")
    print(run_train(cfg, run_dir, cluster_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
