"""Merge the cluster adapters with every configured method, then evaluate everything side by side.

What gets compared on each held-out split:

- ``base``: the base model alone;
- ``adapters``: the oracle upper bound, each example answered by its own cluster's adapter;
- one entry per merge method: a single merged update applied to the base.

With ``eval.lm_eval_tasks`` set, the base and every merge are also scored on lm-eval benchmarks
(:func:`lm_eval_all`).

Only one base model is held in memory: each adapter or merge is added into its weights for the
duration of its evaluation and removed again (:func:`tclora.adapters.deltas_applied`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from tclora import adapters, evaluate
from tclora.config import EvalSection, MergeSection
from tclora.merge import Delta, LowRank, merge_adapters, registry
from tclora.report import BASE, ORACLE


def method_params(method: str, cfg: MergeSection) -> dict[str, Any]:
    """The parameters a method runs with: ``merge.cp_rank`` sets the output rank of cp and svd.

    KnOTS keeps its own default (the full concatenated rank, as in the paper) unless
    ``merge.params.knots.rank`` says otherwise.
    """
    declared = {p.name for p in registry.get(method).params}
    params: dict[str, Any] = {}
    if method in ("cp", "svd"):
        params["rank"] = cfg.cp_rank
    if "n_iter" in declared:
        params["n_iter"] = cfg.cp_iters
    params.update(cfg.params.get(method, {}))
    return params


def merge_one(factors: Sequence[Mapping[str, LowRank]], method: str, cfg: MergeSection) -> dict[str, Delta]:
    """Merge the adapters with one configured method; returns module -> merged delta."""
    return merge_adapters(factors, method, cfg.weights, method_params(method, cfg))


def save_merge(deltas: Mapping[str, Delta], out_dir: Path, base_name: str, model=None, tokenizer=None) -> str:
    """Low-rank results become a PEFT adapter; dense ones (TIES, DARE) a merged HF checkpoint."""
    if all(isinstance(d, LowRank) for d in deltas.values()):
        adapters.save_factors(deltas, out_dir, base_name)
        return "peft_adapter"
    if model is None:
        raise ValueError("a dense merge result needs the base model to be saved as a merged checkpoint")
    adapters.save_merged_model(model, tokenizer, deltas, out_dir)
    return "merged_model"


def _scores(hits: Sequence[bool], tasks: Sequence[str]) -> dict[str, Any]:
    """Per-task exact match and their unweighted mean (every task counts the same)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for hit, task in zip(hits, tasks):
        by_task[task].append(hit)
    per_task = {t: sum(h) / len(h) for t, h in sorted(by_task.items())}
    return {"mean": sum(per_task.values()) / len(per_task) if per_task else 0.0, "per_task": per_task, "n": len(hits)}


def _hits(model, tokenizer, records: Sequence[Mapping], cfg: EvalSection) -> list[bool]:
    if not records:
        return []
    result = evaluate.exact_match(model, tokenizer, records, batch_size=cfg.batch_size,
                                  max_new_tokens=cfg.max_new_tokens, return_predictions=True)
    return [p == r["target"].strip() for p, r in zip(result["predictions"], records)]


def evaluate_all(
    model, tokenizer, records: Sequence[Mapping], cluster_adapters: Mapping[int, Mapping[str, LowRank]],
    merges: Mapping[str, Mapping[str, Delta]], cfg: EvalSection,
) -> dict[str, dict[str, Any]]:
    """Exact match of base, oracle-routed adapters and every merge on ``records``.

    Each record carries ``cluster`` (its nearest centroid); a record whose cluster has no adapter
    (a skipped tiny cluster) is answered by the base model in the oracle row.
    """
    tasks = [r.get("task_name") or "all" for r in records]
    results = {BASE: _scores(_hits(model, tokenizer, records, cfg), tasks)}

    hits = [False] * len(records)
    by_cluster: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cluster[int(r.get("cluster", -1))].append(i)
    for cluster, idx in sorted(by_cluster.items()):
        subset = [records[i] for i in idx]
        if cluster in cluster_adapters:
            with adapters.deltas_applied(model, cluster_adapters[cluster]):
                sub_hits = _hits(model, tokenizer, subset, cfg)
        else:
            sub_hits = _hits(model, tokenizer, subset, cfg)
        for i, h in zip(idx, sub_hits):
            hits[i] = h
    results[ORACLE] = _scores(hits, tasks)

    for method, deltas in merges.items():
        with adapters.deltas_applied(model, deltas):
            results[method] = _scores(_hits(model, tokenizer, records, cfg), tasks)
    return results


def lm_eval_all(
    model, tokenizer, merges: Mapping[str, Mapping[str, Delta]], cfg: EvalSection
) -> dict[str, dict[str, dict[str, float]]]:
    """lm-eval benchmark scores of the base and of every merge: ``{model: {task: {metric: value}}}``.

    No oracle row: benchmark examples have no cluster to route them to.
    """
    from tclora import harness  # lm-eval is an optional extra: imported only when tasks are configured

    manager = harness.task_manager(cfg)  # indexed once for every model
    results = {BASE: harness.run_tasks(model, tokenizer, cfg, manager)}
    for method, deltas in merges.items():
        with adapters.deltas_applied(model, deltas):
            results[method] = harness.run_tasks(model, tokenizer, cfg, manager)
    return results


def cap_per_task(records: Sequence[Mapping], limit: int | None) -> list[Mapping]:
    if limit is None:
        return list(records)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in records:
        task = r.get("task_name") or "all"
        if seen[task] < limit:
            seen[task] += 1
            out.append(r)
    return out
