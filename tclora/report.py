"""The end of a run: the summary table on stdout, ``report.md`` and the merge-comparison plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from tabulate import tabulate

from tclora.compare import BASE, ORACLE


def combine_splits(per_split: Mapping[str, Mapping[str, Mapping[str, Any]]], headline: str) -> dict[str, dict]:
    """{split: {method: scores}} -> {method: {mean (headline split), splits: {split: mean}, per_task}}."""
    methods = next(iter(per_split.values())).keys()
    out = {}
    for method in methods:
        per_task: dict[str, float] = {}
        for scores in per_split.values():
            per_task.update(scores[method]["per_task"])
        out[method] = {
            "mean": per_split[headline][method]["mean"],
            "splits": {split: scores[method]["mean"] for split, scores in per_split.items()},
            "per_task": per_task,
        }
    return out


def _ordered(metrics: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Methods with base and oracle first; splits with the headline split first (JSON sorts keys)."""
    evals = metrics["eval"]
    methods = [m for m in (BASE, ORACLE) if m in evals] + sorted(m for m in evals if m not in (BASE, ORACLE))
    headline = metrics.get("eval_split")
    splits = sorted(next(iter(evals.values()))["splits"], key=lambda s: (s != headline, s))
    return methods, splits


def summary_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    evals = metrics["eval"]
    methods, splits = _ordered(metrics)
    oracle = evals.get(ORACLE, {}).get("mean") or None
    headers = ["method", *splits, "retention vs oracle"]
    rows = []
    for method in methods:
        scores = evals[method]
        retention = f"{scores['mean'] / oracle:.0%}" if oracle and method not in (BASE, ORACLE) else ""
        rows.append([method, *(f"{scores['splits'][s]:.3f}" for s in splits), retention])
    return headers, rows


def summary_table(metrics: Mapping[str, Any], fmt: str = "github") -> str:
    headers, rows = summary_rows(metrics)
    return tabulate(rows, headers=headers, tablefmt=fmt)


def stage_table(metrics: Mapping[str, Any], fmt: str = "github") -> str:
    rows = [[stage, f"{info['seconds']:.1f}", "reused" if info.get("skipped") else "ran"]
            for stage, info in metrics.get("stages", {}).items()]
    return tabulate(rows, headers=["stage", "seconds", ""], tablefmt=fmt)


def write_report_md(metrics: Mapping[str, Any], path: Path) -> None:
    clustering = metrics.get("clustering", {})
    nmi = clustering.get("nmi")
    lines = [
        "# tclora run report",
        "",
        f"- rows: {metrics['data']['rows']} trained on ({metrics['data'].get('duplicates', 0)} duplicates), "
        f"{metrics['data']['quarantined']} quarantined",
        f"- clusters: k = {clustering.get('k')}, NMI vs task_name = {'n/a' if nmi is None else f'{nmi:.3f}'}",
        "",
        "## Exact match (mean over tasks)",
        "",
        summary_table(metrics),
        "",
        "## Per task",
        "",
        per_task_table(metrics),
        "",
        *(["## lm-eval benchmarks", "", lm_eval_table(metrics), ""] if "lm_eval" in metrics else []),
        "## Stages",
        "",
        stage_table(metrics),
        "",
        "![merge comparison](merge_comparison.png)",
        "",
    ]
    Path(path).write_text("\n".join(lines))


def per_task_table(metrics: Mapping[str, Any], fmt: str = "github") -> str:
    evals = metrics["eval"]
    methods, _ = _ordered(metrics)
    tasks = sorted({t for s in evals.values() for t in s["per_task"]})
    rows = [[t, *(f"{evals[m]['per_task'].get(t, float('nan')):.2f}" for m in methods)] for t in tasks]
    return tabulate(rows, headers=["task", *methods], tablefmt=fmt)


def lm_eval_table(metrics: Mapping[str, Any], fmt: str = "github") -> str:
    """One row per lm-eval task and metric (stderrs left out), one column per model, base first."""
    scores = metrics["lm_eval"]  # {model: {task: {metric: value}}}
    models = [BASE] + sorted(m for m in scores if m != BASE)
    rows = []
    for task, task_scores in sorted(scores[BASE].items()):
        for metric in task_scores:
            if metric == "n" or "_stderr" in metric:
                continue
            rows.append([task, metric, task_scores.get("n"), *(scores[m].get(task, {}).get(metric) for m in models)])
    return tabulate(rows, headers=["task", "metric", "n", *models], tablefmt=fmt, floatfmt=".3f", missingval="-")


def plot_merge_comparison(metrics: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = metrics["eval"]
    methods, splits = _ordered(metrics)
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods)), 3.5))
    for j, split in enumerate(splits):
        xs = [i + j * width for i in range(len(methods))]
        ax.bar(xs, [evals[m]["splits"][split] for m in methods], width, label=split)
    ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(methods))], methods, rotation=30)
    ax.set_ylabel("exact match (mean over tasks)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Base, oracle adapters and merges")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
