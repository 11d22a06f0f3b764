"""The end-to-end driver: embed -> cluster -> train -> merge + eval, each stage reused when finished.

    tclora run --config configs/demo.yaml [--set key=value ...]
    python -m pipelines.run --config configs/demo.yaml
    ray job submit --working-dir . -- tclora run --config configs/phi3-flan.yaml

Before Ray starts, :func:`preflight` checks what the config alone cannot (``lori.target_modules`` against
the model's modules); ``cluster.k`` is checked against the valid row count as soon as the embed stage has
counted them, before clustering.

Connects to the cluster in ``run.ray_address`` / ``RAY_ADDRESS`` or starts a local Ray instance. Every
stage writes ``<run.dir>/<stage>/`` atomically with a manifest; a rerun skips stages whose inputs and
config did not change, so ``--set merge.cp_rank=8`` reruns merge + eval only and ``--set cluster.k=4``
re-clusters without re-embedding.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import ray

from pipelines import storage
from pipelines.cluster import run_cluster
from pipelines.embed import run_embed
from pipelines.merge_eval import run_merge_eval
from pipelines.train import run_train
from tclora import artifacts, report
from tclora.cluster import check_k
from tclora.config import Config, ConfigError

log = logging.getLogger("tclora")


def preflight(cfg: Config) -> None:
    """Checks that need the model, run before Ray starts: a bad value fails in seconds, not after embedding.

    Raises:
        ConfigError: ``lori.target_modules`` names modules the model does not have; the message lists
            the missing names and the linear modules the model does have.
    """
    from tclora.lori import check_target_modules
    from tclora.models import module_skeleton

    try:
        skeleton = module_skeleton(cfg.model)
    except OSError as err:
        # The driver may not see the checkpoint the workers load (offline head node): the train stage
        # runs the same check on the real model, so warn rather than refuse to start.
        log.warning("preflight: cannot read the config of model.name_or_path=%r here (%s); "
                    "lori.target_modules will be checked when training starts", cfg.model.name_or_path, err)
        return
    try:
        check_target_modules(skeleton, cfg.lori.target_modules)
    except ValueError as err:
        raise ConfigError(f"{err} (model.name_or_path={cfg.model.name_or_path!r})") from None


def init_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # A local instance: the dashboard (when installed) listens on localhost only. Logical CPUs are
        # oversubscribed 2x so a Tune trial, its Train workers and the Ray Data tasks feeding them can
        # all be scheduled on a small machine instead of waiting on each other forever.
        ray.init(num_cpus=2 * (os.cpu_count() or 1), dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 log_to_driver=False)


def prepare_inputs(cfg: Config, run_dir: Path) -> Config:
    """Materialise the embedded demo (corpus and base model) and point the config at it."""
    updates: dict = {}
    if cfg.data.path == "demo":
        from tclora.demo_corpus import build_demo_corpus

        splits = build_demo_corpus(run_dir / "corpus", train_per_task=cfg.data.demo_train_per_task,
                                   eval_per_task=cfg.data.demo_eval_per_task, seed=cfg.run.seed)
        data = cfg.data.model_copy(update={"path": str(splits["train"])})
        if not cfg.data.eval_paths:
            data = data.model_copy(update={"eval_paths": [str(splits["test"]), str(splits["compose_test"])]})
        updates["data"] = data
    if cfg.model.name_or_path == "demo":
        from tclora.models import build_demo_base, demo_spec

        # Built here, once, before any worker starts: workers must not race to build the same cache.
        path = build_demo_base(cfg.model.cache_dir, demo_spec(cfg.model))
        updates["model"] = cfg.model.model_copy(update={"name_or_path": str(path)})
    return cfg.model_copy(update=updates) if updates else cfg


def _stage(name: str, fn, started: float, stages: dict, cfg: Config, run_dir: Path) -> Path:
    log.info("stage %s ...", name)
    t0 = time.time()
    out = fn()
    storage.mirror_stage(cfg, run_dir, out)
    manifest = artifacts.read_manifest(out) or {}
    reused = (out / artifacts.MANIFEST).stat().st_mtime < started
    stages[name] = {"seconds": manifest.get("seconds", time.time() - t0), "skipped": reused,
                    "wall_seconds": round(time.time() - t0, 2)}
    log.info("stage %s %s (%.1fs)", name, "reused" if reused else "done", time.time() - t0)
    return out


def run(cfg: Config) -> dict:
    """Run (or resume) the whole pipeline; returns the metrics also written to ``metrics.json``."""
    started = time.time()
    preflight(cfg)
    if cfg.eval.lm_eval_tasks:
        from tclora.harness import check_tasks

        check_tasks(cfg.eval)  # a misspelt benchmark fails now, not after training
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    storage.restore_run(cfg, run_dir)  # a driver restarted on a fresh node: pull back finished stages
    cfg = prepare_inputs(cfg, run_dir)
    stages: dict = {}
    stage = lambda name, fn: _stage(name, fn, started, stages, cfg, run_dir)  # noqa: E731
    embed_dir = stage("embed", lambda: run_embed(cfg, run_dir))
    # The valid-row count exists only after validation, i.e. the embed stage. Checking here rather than
    # before embedding costs little (k > rows means a tiny corpus), and the embeddings are cached, so the
    # rerun with a smaller k goes straight to clustering.
    check_k(cfg.cluster.k, artifacts.read_manifest(embed_dir)["rows"])
    cluster_dir = stage("cluster", lambda: run_cluster(cfg, run_dir, embed_dir))
    train_dir = stage("train", lambda: run_train(cfg, run_dir, cluster_dir))
    eval_dir = stage("merge_eval", lambda: run_merge_eval(cfg, run_dir, cluster_dir, train_dir))

    metrics = assemble_metrics(embed_dir, cluster_dir, eval_dir, stages, time.time() - started)
    artifacts.atomic_write_json(run_dir / "metrics.json", metrics)
    report.write_report_md(metrics, run_dir / "report.md")
    report.plot_merge_comparison(metrics, run_dir / "merge_comparison.png")
    print("\n" + report.summary_table(metrics) + "\n")
    if "lm_eval" in metrics:
        print(report.lm_eval_table(metrics) + "\n")
    print(report.stage_table(metrics) + "\n")
    print(f"metrics: {run_dir / 'metrics.json'}\nreport:  {run_dir / 'report.md'}")
    return metrics


def assemble_metrics(embed_dir: Path, cluster_dir: Path, eval_dir: Path, stages: dict, seconds: float) -> dict:
    embed = artifacts.read_manifest(embed_dir)
    cluster = artifacts.read_manifest(cluster_dir)
    evaluation = artifacts.read_manifest(eval_dir)
    return {
        "data": {"rows": embed["rows"], "quarantined": embed["quarantined"],
                 "duplicates": embed.get("duplicates", 0)},  # absent from manifests of older runs
        "clustering": {k: cluster["report"].get(k) for k in ("k", "nmi", "ari", "sizes")},
        "eval": evaluation["eval"],
        "eval_split": evaluation["eval_split"],
        "merge": evaluation["merge"],
        **({"lm_eval": evaluation["lm_eval"]} if "lm_eval" in evaluation else {}),
        "stages": stages,
        "total_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    from tclora.cli import main as cli_main

    return cli_main(["run", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
