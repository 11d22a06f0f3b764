"""The end-to-end driver: embed -> cluster -> train -> merge + eval, each stage reused when finished.

    tclora run --config configs/demo.yaml [--set key=value ...]
    tclora run --config configs/demo.yaml --until cluster      # stop after a stage (inspect the clusters)
    python -m pipelines.run --config configs/demo.yaml
    ray job submit --working-dir . -- tclora run --config configs/phi3-flan.yaml

Before Ray starts, :func:`pipelines.session.preflight` checks what the config alone cannot
(``lori.target_modules`` against the model's modules); ``cluster.k`` is checked against the valid row
count as soon as the embed stage has counted them, before clustering.

Connects to the cluster in ``run.ray_address`` / ``RAY_ADDRESS`` or starts a local Ray instance. Every
stage writes ``<run.dir>/<stage>/`` atomically with a manifest; a rerun skips stages whose inputs and
config did not change, so ``--set merge.cp_rank=8`` reruns merge + eval only and ``--set cluster.k=4``
re-clusters without re-embedding.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from pathlib import Path

from pipelines import session, tracking
from pipelines.cluster import run_cluster
from pipelines.embed import run_embed
from pipelines.mbc import run_mbc
from pipelines.merge_eval import run_merge_eval
from pipelines.train import run_train
from tclora import artifacts, farm, report, storage
from tclora.artifacts import StageResult
from tclora.cluster import check_k
from tclora.config import Config, ConfigError

log = logging.getLogger("tclora")


def _embed(cfg: Config, run_dir: Path, dirs: dict[str, Path]) -> StageResult:
    return run_embed(cfg, run_dir)


def _cluster(cfg: Config, run_dir: Path, dirs: dict[str, Path]) -> StageResult:
    # The valid-row count exists only after validation, i.e. the embed stage. Checking here rather than
    # before embedding costs little (k > rows means a tiny corpus), and the embeddings are cached, so the
    # rerun with a smaller k goes straight to clustering.
    check_k(cfg.cluster.k, artifacts.read_manifest(dirs["embed"])["rows"])
    if cfg.cluster.by == "adapters":  # model-based clustering: short per-task adapters (issue 17)
        return run_mbc(cfg, run_dir, dirs["embed"])
    return run_cluster(cfg, run_dir, dirs["embed"])


def _train(cfg: Config, run_dir: Path, dirs: dict[str, Path]) -> StageResult:
    return run_train(cfg, run_dir, dirs["cluster"])


def _merge_eval(cfg: Config, run_dir: Path, dirs: dict[str, Path]) -> StageResult:
    return run_merge_eval(cfg, run_dir, dirs["cluster"], dirs["train"])


STEPS = {"embed": _embed, "cluster": _cluster, "train": _train, "merge_eval": _merge_eval}  # in session.STAGES order


def run(cfg: Config, until: str = session.STAGES[-1]) -> dict:
    """Run (or resume) the pipeline; returns the metrics also written to ``metrics.json``.

    ``until`` stops after that stage (e.g. ``cluster``, to inspect clusters before paying for training);
    the return value then holds ``stages`` only and no ``metrics.json`` is written.

    Raises:
        ConfigError: a bad config (before Ray starts), ``cluster.k`` above the valid rows, or an unknown ``until``.
    """
    if until not in session.STAGES:
        raise ConfigError(f"--until: unknown stage {until!r}; use one of {list(session.STAGES)}")
    started = time.time()
    cfg, run_dir = session.start(cfg)
    dirs: dict[str, Path] = {}
    stages: dict[str, dict] = {}
    for name in session.STAGES[: session.STAGES.index(until) + 1]:
        step = functools.partial(STEPS[name], cfg, run_dir, dirs)
        dirs[name], stages[name] = session.run_stage(name, step, cfg, run_dir)
    if until != session.STAGES[-1]:
        print("\n" + report.stage_table({"stages": stages}) + "\n")
        print(f"stopped after {until}: {dirs[until]}")
        return {"stages": stages}
    metrics = assemble_metrics(dirs["embed"], dirs["cluster"], dirs["merge_eval"], stages, time.time() - started)
    metrics["farm"] = str(export_run_farm(cfg, run_dir, dirs))
    write_outputs(metrics, cfg, run_dir)
    tracking.log_merge_eval(cfg, metrics)  # MLflow, when run.mlflow_tracking_uri is set
    return metrics


def export_run_farm(cfg: Config, run_dir: Path, dirs: dict[str, Path]) -> Path:
    """``<run.dir>/farm``: the cluster adapters, their router and the recommended merge (``tclora.farm``),
    published to the run's store; a no-op when already exported from the same stages."""
    import numpy as np
    import pyarrow.dataset as pads

    from pipelines.merge_eval import adapter_dirs

    # Calibration: every training row's distance to its own k-means centroid (squared in the cluster stage).
    squared = pads.dataset(dirs["cluster"] / "clusters", format="parquet").to_table(columns=["distance"])
    best = (artifacts.read_manifest(dirs["merge_eval"]) or {}).get("recommended")
    path = farm.export_farm(
        run_dir / "farm", cluster_dir=dirs["cluster"], adapter_dirs=adapter_dirs(dirs["train"]),
        train_distances=np.sqrt(np.maximum(squared.column("distance").to_numpy(), 0)),
        base_model=cfg.model.name_or_path, embed_model=cfg.embed.model, recommended=best,
        merge_dir=dirs["merge_eval"] / "merges" / best["method"] if best else None)
    storage.store_for(cfg, run_dir).publish(path)
    return path


def write_outputs(metrics: dict, cfg: Config, run_dir: Path) -> None:
    """``metrics.json``, ``report.md`` and the merge-comparison plot (published to the run's store); tables
    on stdout."""
    artifacts.atomic_write_json(run_dir / "metrics.json", metrics)
    report.write_report_md(metrics, run_dir / "report.md")
    report.plot_merge_comparison(metrics, run_dir / "merge_comparison.png")
    store = storage.store_for(cfg, run_dir)
    for name in ("metrics.json", "report.md", "merge_comparison.png"):
        store.publish(run_dir / name)
    print("\n" + report.summary_table(metrics) + "\n")
    print(report.recommended_line(metrics))
    print(report.routing_line(metrics) + "\n")
    if "lm_eval" in metrics:
        print(report.lm_eval_table(metrics) + "\n")
    print(report.stage_table(metrics) + "\n")
    print(f"metrics: {store.uri_of(run_dir / 'metrics.json')}\nreport:  {store.uri_of(run_dir / 'report.md')}")
    if "farm" in metrics:
        print(f"farm:    {store.uri_of(Path(metrics['farm']))}  (tclora route --farm ... \"some input\")")


def assemble_metrics(embed_dir: Path, cluster_dir: Path, eval_dir: Path, stages: dict, seconds: float) -> dict:
    embed = artifacts.read_manifest(embed_dir)
    cluster = artifacts.read_manifest(cluster_dir)
    evaluation = artifacts.read_manifest(eval_dir)
    return {
        "data": {"rows": embed["rows"], "quarantined": embed["quarantined"],
                 "duplicates": embed.get("duplicates", 0)},  # absent from manifests of older runs
        "clustering": {k: cluster["report"].get(k) for k in ("k", "k_auto", "nmi", "ari", "sizes")},
        "eval": evaluation["eval"],
        "eval_split": evaluation["eval_split"],
        "merge": evaluation["merge"],
        **({"lm_eval": evaluation["lm_eval"]} if "lm_eval" in evaluation else {}),
        # merge settings chosen on validation (absent from manifests of runs before tuning existed)
        **{k: evaluation[k] for k in ("tuning", "recommended", "routing") if k in evaluation},
        "stages": stages,
        "total_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="embed -> cluster -> train -> merge + eval, reusing finished stages")
    session.add_config_args(parser)
    session.add_run_args(parser)
    args = parser.parse_args(argv)
    session.setup_logging()
    try:
        run(session.config_from_args(args), until=args.until)
    except ConfigError as err:
        print(f"tclora: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
