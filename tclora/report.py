"""The end of a run or sweep: tables on stdout, ``report.md``, plots, and the sweep's files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml
from tabulate import tabulate

from tclora import artifacts
from tclora.config import Config
from tclora.plots import pyplot, save_figure

# Row names beside the merge methods in every score table: the base model alone, and the oracle (each
# example answered by its own cluster's adapter). Here, not in compare.py, so tables need no torch.
BASE, ORACLE = "base", "adapters"
ARROW = "routed-arrow"  # the cluster adapters mixed per token by Arrow routing (tclora.farm.arrow_applied)


def combine_splits(per_split: Mapping[str, Mapping[str, Mapping[str, Any]]], headline: str) -> dict[str, dict]:
    """{split: {method: scores}} -> {method: {mean (headline split), splits: {split: mean}, per_task}},
    plus ``rouge_l: {split: task-averaged Rouge-L}`` where the splits were scored with it.

    ``per_task`` keys are the headline split's task names, and ``split/task`` for the other splits: one
    task may appear in several splits (the demo asks its families again as multiple choice)."""
    methods = next(iter(per_split.values())).keys()
    out = {}
    for method in methods:
        per_task: dict[str, float] = {}
        for split, scores in per_split.items():
            per_task.update({t if split == headline else f"{split}/{t}": v
                             for t, v in scores[method]["per_task"].items()})
        out[method] = {
            "mean": per_split[headline][method]["mean"],
            "splits": {split: scores[method]["mean"] for split, scores in per_split.items()},
            "per_task": per_task,
        }
        rouge = {split: scores[method]["rouge_l"] for split, scores in per_split.items() if "rouge_l" in scores[method]}
        if rouge:
            out[method]["rouge_l"] = rouge
    return out


def _ordered(metrics: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Methods with base, oracle and Arrow routing first; splits with the headline split first (JSON sorts keys)."""
    evals = metrics["eval"]
    first = (BASE, ORACLE, ARROW)  # the references, then the merges by name
    methods = [m for m in first if m in evals] + sorted(m for m in evals if m not in first)
    headline = metrics.get("eval_split")
    splits = sorted(next(iter(evals.values()))["splits"], key=lambda s: (s != headline, s))
    return methods, splits


def summary_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    evals = metrics["eval"]
    methods, splits = _ordered(metrics)
    oracle = evals.get(ORACLE, {}).get("mean") or None
    headers = ["method", *splits, "retention vs oracle", "setting"]
    rows = []
    for method in methods:
        scores = evals[method]
        retention = f"{scores['mean'] / oracle:.0%}" if oracle and method not in (BASE, ORACLE) else ""
        name = "adapters (routed-centroid)" if method == ORACLE else method  # each row: its nearest centroid's adapter
        rows.append([name, *(f"{scores['splits'][s]:.3f}" for s in splits), retention,
                     merge_setting(metrics.get("merge", {}).get(method))])
    return headers, rows


def merge_setting(info: Mapping[str, Any] | None) -> str:
    """``λ=0.5 density=0.2 (tuned)``: a merge's λ and the knobs it was tuned over, or '(untuned)' settings."""
    if not info or "params" not in info:
        return ""
    params = info["params"]
    shown = ["scale", *(k for k in info.get("knobs", []) if k in params)]
    text = " ".join(f"{'λ' if k == 'scale' else k}={_short(params.get(k))}" for k in shown if k in params)
    return f"{text} ({'tuned' if info.get('tuned') else 'untuned'})"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def recommended_line(metrics: Mapping[str, Any]) -> str:
    """The run summary's lines on the merge to ship (best on validation) and the share of the routed
    adapters' gain it keeps, or why there is none."""
    best = metrics.get("recommended")
    if not best:
        return "recommended merge: none (merges untuned: no validation split or merge.tune=false)"
    test = metrics["eval"][best["method"]]["splits"]
    scores = ", ".join(f"{s} {v:.3f}" for s, v in test.items())
    line = (f"recommended merge: {best['method']} {merge_setting({**best, 'tuned': True})}, validation "
            f"{best['validation_score']:.3f}; test: {scores}  (best_merge.yaml)")
    kept = gain_kept(metrics, best["method"])
    if kept is not None:
        line += f"\n  it keeps {kept:.0%} of the routed adapters' gain over the base on {metrics['eval_split']}"
        if kept < 0.5:
            line += ("; under half: serve the farm's routed adapters (tclora route) where routing is possible, or "
                     "train the adapters for their sum as well (train.merge_aware, 0.1 on the demo; fused groups of "
                     "train.clusters_per_run clusters; README 'Adapters that merge')")
    return line


def gain_kept(metrics: Mapping[str, Any], method: str) -> float | None:
    """(merge - base) / (routed adapters - base) on the headline split (``eval_split``): the share of the
    per-cluster adapters' gain a merge keeps (issue 12's target: 60%). None without both references or
    when the adapters do not beat the base."""
    split, ev = metrics.get("eval_split"), metrics.get("eval", {})
    try:
        base, oracle, merged = (ev[m]["splits"][split] for m in (BASE, ORACLE, method))
    except KeyError:
        return None
    return (merged - base) / (oracle - base) if oracle > base else None


def routing_line(metrics: Mapping[str, Any]) -> str:
    """Routing accuracy per router and split: the share of rows sent to their task's majority cluster."""
    routers = {name: by_split for name, by_split in (metrics.get("routing") or {}).items() if by_split}
    if not routers:
        return "routing accuracy: n/a (no task_name on the evaluation rows)"
    parts = "; ".join(f"{name}: " + ", ".join(f"{split} {v['accuracy']:.3f}" for split, v in by_split.items())
                      for name, by_split in routers.items())
    return f"routing accuracy (share of rows sent to the cluster holding most of their task): {parts}"


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
        recommended_line(metrics),
        "",
        routing_line(metrics),
        "",
        "Merge settings marked *tuned* were chosen on the validation split (λ and each method's knobs, "
        "tclora.tune_merge); *untuned* ones are the configured settings.",
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
    plt = pyplot()
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
    save_figure(fig, path, dpi=120)


# ---- sweep outputs: table, JSON, plots, the best point as a full config --------------------------------
def sweep_table(results: dict, fmt: str = "github") -> str:
    """One row per sweep point: k, R, s, the objective (on ``results["objective"]["split"]``, validation) and
    every method's score on the reported split, the objective's method first (oracle, base last)."""
    metric = results["objective"]["metric"]
    where = results["objective"].get("split", "")
    methods = [metric] + [m for m in results["rows"][0]["scores"] if m != metric]
    methods = [m for m in methods if m not in (ORACLE, BASE)] + [m for m in (ORACLE, BASE) if m in methods]
    rows = [[r["k"], r["cp_rank"], r["sparsity"], r["objective"], *(r["scores"][m] for m in methods)]
            for r in results["rows"]]
    report_split = results["objective"].get("report_split")
    headers = [f"{m} ({report_split})" if report_split and m == metric else m for m in methods]
    return tabulate(rows, headers=["k", "R", "s", f"{metric} {where} (objective)", *headers], tablefmt=fmt,
                    floatfmt=["g", "g", "g"] + [".3f"] * (1 + len(methods)))


def plot_sweep_scores(results: dict, x: str, path: Path) -> None:
    """Each curve: a method's best score over the other swept values, against ``x`` (k or cp_rank)."""
    plt = pyplot()
    metric, rows = results["objective"]["metric"], results["rows"]
    xs = sorted({r[x] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method in rows[0]["scores"]:
        ys = [max(r["scores"][method] for r in rows if r[x] == v) for v in xs]
        main = method == metric
        label = {ORACLE: "oracle: own-cluster adapter", BASE: "base model",
                 ARROW: "routed-arrow: adapters mixed per token"}.get(method, method)
        ax.plot(xs, ys, marker="o", linewidth=2.5 if main else 1.2, linestyle="-" if main else "--",
                zorder=3 if main else 2, label=f"{label} (objective)" if main else label)
    ax.set_xticks(xs)
    ax.set_xlabel({"k": "clusters k", "cp_rank": "CP rank R"}[x])
    ax.set_ylabel(f"exact match, {results['objective']['split']} (best over the rest)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"sweep: {metric} vs baselines")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def write_sweep_outputs(results: dict, best_cfg: Config, sweep_dir: Path) -> None:
    """``best_config.yaml`` (``best_cfg``: the user's config at the best point), ``sweep_results.json``,
    ``score_vs_k.png``, ``score_vs_rank.png``, and the table on stdout; adds ``best_config`` to ``results``."""
    best, path = results["best"], sweep_dir / "best_config.yaml"
    header = (f"# tclora sweep best point: k={best['k']}, cp_rank={best['cp_rank']}, sparsity={best['sparsity']:g}, "
              f"{results['objective']['key']}={best['objective']:.4f}\n#   tclora run --config {path}\n")
    body = yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False)
    artifacts.atomic_write_bytes(path, (header + body).encode())
    results["best_config"] = str(path)
    artifacts.atomic_write_json(sweep_dir / "sweep_results.json", results)
    plot_sweep_scores(results, "k", sweep_dir / "score_vs_k.png")
    plot_sweep_scores(results, "cp_rank", sweep_dir / "score_vs_rank.png")
    t = results["training"]
    print("\n" + sweep_table(results) + "\n")
    test = f", {results['objective'].get('report_split')} {best['test']:.3f}" if "test" in best else ""
    print(f"best: k={best['k']} R={best['cp_rank']} s={best['sparsity']:g} -> {best['objective']:.3f} "
          f"({results['objective'].get('split', 'objective')}){test}; "
          f"adapters trained {t['adapters_trained']}, reused {t['adapters_reused']} "
          f"({t['adapter_sets']} (k, s) sets); embed {'reused' if results['embed']['reused'] else 'ran'}")
    print(f"results: {sweep_dir / 'sweep_results.json'}\nbest config: {path}")
