"""The end-to-end driver: embed -> cluster -> train -> merge + eval, each stage reused when finished.

    tclora run --config configs/demo.yaml [--set key=value ...]
    python -m pipelines.run --config configs/demo.yaml
    ray job submit --working-dir . -- tclora run --config configs/phi3-flan.yaml

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

from pipelines.cluster import run_cluster
from pipelines.embed import run_embed
from pipelines.merge_eval import run_merge_eval
from pipelines.train import run_train
from tclora import artifacts, report
from tclora.config import Config

log = logging.getLogger("tclora")


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
        from tclora.models import DemoBaseSpec, build_demo_base

        # Built here, once, before any worker starts: workers must not race to build the same cache.
        path = build_demo_base(cfg.model.cache_dir, DemoBaseSpec(pretrain_steps=cfg.model.demo_pretrain_steps))
        updates["model"] = cfg.model.model_copy(update={"name_or_path": str(path)})
    return cfg.model_copy(update=updates) if updates else cfg


def _stage(name: str, fn, started: float, stages: dict) -> Path:
    log.info("stage %s ...", name)
    t0 = time.time()
    out = fn()
    manifest = artifacts.read_manifest(out) or {}
    reused = (out / artifacts.MANIFEST).stat().st_mtime < started
    stages[name] = {"seconds": manifest.get("seconds", time.time() - t0), "skipped": reused,
                    "wall_seconds": round(time.time() - t0, 2)}
    log.info("stage %s %s (%.1fs)", name, "reused" if reused else "done", time.time() - t0)
    return out


def run(cfg: Config) -> dict:
    """Run (or resume) the whole pipeline; returns the metrics also written to ``metrics.json``."""
    started = time.time()
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    cfg = prepare_inputs(cfg, run_dir)
    stages: dict = {}
    embed_dir = _stage("embed", lambda: run_embed(cfg, run_dir), started, stages)
    cluster_dir = _stage("cluster", lambda: run_cluster(cfg, run_dir, embed_dir), started, stages)
    train_dir = _stage("train", lambda: run_train(cfg, run_dir, cluster_dir), started, stages)
    eval_dir = _stage("merge_eval", lambda: run_merge_eval(cfg, run_dir, cluster_dir, train_dir), started, stages)

    metrics = assemble_metrics(embed_dir, cluster_dir, eval_dir, stages, time.time() - started)
    artifacts.atomic_write_json(run_dir / "metrics.json", metrics)
    report.write_report_md(metrics, run_dir / "report.md")
    report.plot_merge_comparison(metrics, run_dir / "merge_comparison.png")
    print("\n" + report.summary_table(metrics) + "\n")
    print(report.stage_table(metrics) + "\n")
    print(f"metrics: {run_dir / 'metrics.json'}\nreport:  {run_dir / 'report.md'}")
    return metrics


def assemble_metrics(embed_dir: Path, cluster_dir: Path, eval_dir: Path, stages: dict, seconds: float) -> dict:
    embed = artifacts.read_manifest(embed_dir)
    cluster = artifacts.read_manifest(cluster_dir)
    evaluation = artifacts.read_manifest(eval_dir)
    return {
        "data": {"rows": embed["rows"], "quarantined": embed["quarantined"]},
        "clustering": {k: cluster["report"].get(k) for k in ("k", "nmi", "ari", "sizes")},
        "eval": evaluation["eval"],
        "eval_split": evaluation["eval_split"],
        "merge": evaluation["merge"],
        "stages": stages,
        "total_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    from tclora.cli import main as cli_main

    return cli_main(["run", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
