"""Text-level vs parameter-level clustering, side by side through the whole pipeline (issue 17, part 5).

    python -m benchmarks.bench_cluster_routes            # the demo at its config's size (~15 min on 2 cores)
    python -m benchmarks.bench_cluster_routes --smoke    # 40 rows per family, a few steps

TC-LoRA clusters rows by their text; model-based clustering (MBC, Ostapenko et al. 2024) trains a short
LoRA per task and groups tasks by their adapters. On the demo each task_name is a family, so with k = the
family count MBC has nothing to decide; here the demo's train split gets one task name per *template*
(``reverse_words/t0`` ...: 12 tasks, 3 per family) and both routes must find the 4 families:
  - ``text``: ``cluster.by: text`` (k-means on the template view, configs/demo.yaml);
  - ``adapters``: ``cluster.by: adapters`` (a ``cluster.mbc_steps`` LoRA per template task).
Each route runs ``tclora run`` (a subprocess, as users run it) on configs/demo.yaml in one run directory
(the embed stage is shared; train and merge + eval rerun per route). Reported per route: NMI/ARI of the
clusters against the families, the cluster stage's seconds, and the in-domain test exact match of the
routed adapters (oracle), the recommended merge and every merge, from metrics.json.
Writes ``bench_cluster_routes[_smoke].json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import yaml
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from benchmarks.common import REPO, arg_parser, headline, machine_info, result_stem, setup_logging, write_result
from tclora import demo_corpus
from tclora.data import read_jsonl, write_jsonl

log = logging.getLogger("benchmarks.cluster_routes")
ROUTES = ("text", "adapters")
SMOKE_SETS = ["data.demo_train_per_task=40", "data.demo_eval_per_task=4", "train.steps=5", "cluster.mbc_steps=5"]


def template_tasks(rows: list[dict]) -> list[dict]:
    """Rows with ``task_name`` = ``<family>/t<template index>`` and ``family`` = the family."""
    patterns = {name: [re.compile(re.escape(t).replace(re.escape("{x}"), demo_corpus.PAYLOAD_RE) + "$")
                       for t in family.templates] for name, family in demo_corpus.FAMILIES.items()}
    out = []
    for r in rows:
        index = next((i for i, p in enumerate(patterns[r["task_name"]]) if p.match(r["source"])), None)
        if index is None:
            raise ValueError(f"{r['source']!r} matches no template of {r['task_name']}")
        out.append({**r, "family": r["task_name"], "task_name": f"{r['task_name']}/t{index}"})
    return out


def write_config(root: Path, sets: list[str]) -> Path:
    """configs/demo.yaml pointed at a corpus whose train split has template-level task names."""
    from tclora.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", sets)
    splits = demo_corpus.build_demo_corpus(root / "corpus", train_per_task=cfg.data.demo_train_per_task,
                                           eval_per_task=cfg.data.demo_eval_per_task, seed=cfg.run.seed)
    write_jsonl(root / "train_by_template.jsonl", template_tasks(read_jsonl(splits["train"])))
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["run"]["dir"] = str(root / "run")
    raw["data"] = {"path": str(root / "train_by_template.jsonl"), "validation_path": str(splits["validation"]),
                   "eval_paths": [str(splits[s]) for s in demo_corpus.EVAL_SPLITS]}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def family_scores(cluster_dir: Path) -> dict:
    """NMI/ARI of a finished cluster stage's rows against their families (the task name's prefix)."""
    table = pads.dataset(cluster_dir / "clusters", format="parquet", partitioning="hive").to_table(
        columns=["task_name", "cluster"])
    families = [t.split("/")[0] for t in table.column("task_name").to_pylist()]
    labels = np.asarray(table.column("cluster").to_pylist())
    return {"nmi": round(float(normalized_mutual_info_score(families, labels)), 4),
            "ari": round(float(adjusted_rand_score(families, labels)), 4)}


def run_route(config: Path, route: str, sets: list[str], root: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "tclora"), "run", "--config", str(config),
           "--set", f"cluster.by={route}", *(x for s in sets for x in ("--set", s))]
    log.info("route %s: %s", route, " ".join(cmd))
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    seconds = time.perf_counter() - started
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    shutil.copy(root / "run" / "metrics.json", root / f"metrics_{route}.json")
    pattern = "mbc-k*" if route == "adapters" else "k[0-9]*"
    cluster_dir = max((root / "run" / "cluster").glob(pattern), key=lambda p: p.stat().st_mtime)
    evals = metrics["eval"]
    merges = {m: round(v["mean"], 4) for m, v in evals.items() if m not in ("base", "adapters", "routed-arrow")}
    best = (metrics.get("recommended") or {}).get("method")
    return {"seconds": round(seconds, 1), "cluster_seconds": metrics["stages"]["cluster"]["wall_seconds"],
            "families": family_scores(cluster_dir), "nmi_vs_task_name": metrics["clustering"]["nmi"],
            "sizes": metrics["clustering"]["sizes"], "base": round(evals["base"]["mean"], 4),
            "oracle": round(evals["adapters"]["mean"], 4), "merges": merges, "recommended": best,
            "recommended_test": merges.get(best)}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    routes = list(result["routes"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(routes, [result["routes"][r]["families"]["nmi"] for r in routes], color=["tab:blue", "tab:orange"])
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("NMI vs families")
    names = sorted({m for r in routes for m in result["routes"][r]["merges"]})
    x = np.arange(len(names) + 1)
    for j, r in enumerate(routes):
        v = result["routes"][r]
        axes[1].bar(x + 0.4 * j, [v["oracle"], *(v["merges"].get(m, 0) for m in names)], 0.4, label=r)
    axes[1].set_xticks(x + 0.2, ["oracle", *names], rotation=45, fontsize=7)
    axes[1].set_ylabel("in-domain test exact match")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--set", action="append", default=[], help="extra config overrides for both routes")
    args = p.parse_args()
    setup_logging()
    sets = (SMOKE_SETS if args.smoke else []) + args.set
    started = time.perf_counter()
    result = {"benchmark": "cluster_routes", "smoke": args.smoke, "machine": machine_info(),
              "config": {"base_config": "configs/demo.yaml", "sets": sets, "tasks": "one per template (12)",
                         "k": 4}, "routes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_routes_") as tmp:
        root = Path(tmp)
        config = write_config(root, sets)
        for route in ROUTES:
            result["routes"][route] = run_route(config, route, sets, root)
            log.info("route %s: %s", route, result["routes"][route])
    text, mbc = result["routes"]["text"], result["routes"]["adapters"]
    result["headline"] = [
        headline("families recovered from 12 template tasks (NMI): text vs adapters (MBC)",
                 [text["families"]["nmi"], mbc["families"]["nmi"]],
                 f"text {text['families']['nmi']:.3f}, MBC {mbc['families']['nmi']:.3f}"),
        headline("in-domain test EM, oracle / recommended merge: text vs adapters (MBC)",
                 [text["oracle"], mbc["oracle"]],
                 f"text {text['oracle']:.3f} / {text['recommended']} {text['recommended_test'] or 0:.3f}; "
                 f"MBC {mbc['oracle']:.3f} / {mbc['recommended']} {mbc['recommended_test'] or 0:.3f}"),
    ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_result(args.out, result_stem("cluster_routes", args.smoke), result, plot)


if __name__ == "__main__":
    main()
