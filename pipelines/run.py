"""The end-to-end driver: embed -> cluster -> train -> merge + eval, each stage reused when finished.

    tclora run --config configs/demo.yaml [--set key=value ...]
    python -m pipelines.run --config configs/demo.yaml
    ray job submit --working-dir . -- tclora run --config configs/phi3-flan.yaml

Before Ray starts, :func:`pipelines.session.preflight` checks what the config alone cannot
(``lori.target_modules`` against the model's modules); ``cluster.k`` is checked against the valid row count as soon as the embed stage has
counted them, before clustering.

Connects to the cluster in ``run.ray_address`` / ``RAY_ADDRESS`` or starts a local Ray instance. Every
stage writes ``<run.dir>/<stage>/`` atomically with a manifest; a rerun skips stages whose inputs and
config did not change, so ``--set merge.cp_rank=8`` reruns merge + eval only and ``--set cluster.k=4``
re-clusters without re-embedding.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pipelines import session
from pipelines.cluster import run_cluster
from pipelines.embed import run_embed
from pipelines.merge_eval import run_merge_eval
from pipelines.train import run_train
from tclora import artifacts, report, storage
from tclora.cluster import check_k
from tclora.config import Config, ConfigError

log = logging.getLogger("tclora")


def _stage(name: str, fn, started: float, stages: dict, cfg: Config, run_dir: Path) -> Path:
    log.info("stage %s ...", name)
    t0 = time.time()
    out = fn()
    storage.store_for(cfg, run_dir).publish(out)
    manifest = artifacts.read_manifest(out) or {}
    reused = (out / artifacts.MANIFEST).stat().st_mtime < started
    stages[name] = {"seconds": manifest.get("seconds", time.time() - t0), "skipped": reused,
                    "wall_seconds": round(time.time() - t0, 2)}
    log.info("stage %s %s (%.1fs)", name, "reused" if reused else "done", time.time() - t0)
    return out


def run(cfg: Config) -> dict:
    """Run (or resume) the whole pipeline; returns the metrics also written to ``metrics.json``."""
    started = time.time()
    cfg, run_dir = session.start(cfg)
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
    store = storage.store_for(cfg, run_dir)
    for name in ("metrics.json", "report.md", "merge_comparison.png"):
        store.publish(run_dir / name)
    print("\n" + report.summary_table(metrics) + "\n")
    if "lm_eval" in metrics:
        print(report.lm_eval_table(metrics) + "\n")
    print(report.stage_table(metrics) + "\n")
    print(f"metrics: {store.uri_of(run_dir / 'metrics.json')}\nreport:  {store.uri_of(run_dir / 'report.md')}")
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
    parser = argparse.ArgumentParser(description="embed -> cluster -> train -> merge + eval, reusing finished stages")
    session.add_config_args(parser)
    args = parser.parse_args(argv)
    session.setup_logging()
    try:
        run(session.config_from_args(args))
    except ConfigError as err:
        print(f"tclora: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
