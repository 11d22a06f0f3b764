"""Merge the cluster adapters with every configured method, then evaluate everything side by side.

What gets compared on each held-out split:

- ``base``: the base model alone;
- ``adapters``: the oracle upper bound, each example answered by its own cluster's adapter;
- one entry per merge method: a single merged update applied to the base, at the setting chosen on
  the validation split (:func:`compare_merges` with ``validation``; :mod:`tclora.tune_merge`), or at
  the configured one (untuned, and labelled so).

With ``eval.lm_eval_tasks`` set, the base and every merge are also scored on lm-eval benchmarks
(:func:`lm_eval_all`).

Only one base model is held in memory: each adapter or merge is added into its weights for the
duration of its evaluation and removed again (:func:`tclora.adapters.deltas_applied`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from tclora import adapters, evaluate, tune_merge
from tclora.config import EvalSection, MergeSection
from tclora.merge import Delta, LowRank, merge_adapters, registry
from tclora.report import ARROW, BASE, ORACLE

log = logging.getLogger(__name__)

MERGE_META = "merge.json"  # beside each saved merge: method, settings, whether they were tuned


def method_params(method: str, cfg: MergeSection) -> dict[str, Any]:
    """The parameters a method runs with: ``merge.cp_rank`` sets ``rank`` of the ``rank_param`` methods
    (cp, svd), ``merge.cp_iters`` the ALS iterations, then ``merge.params.<method>`` overrides.

    KnOTS keeps its own default (the full concatenated rank, as in the paper) unless
    ``merge.params.knots.rank`` says otherwise.
    """
    spec = registry.get(method)
    params: dict[str, Any] = {}
    if spec.rank_param:
        params["rank"] = cfg.cp_rank
    if "n_iter" in {p.name for p in spec.params}:
        params["n_iter"] = cfg.cp_iters
    params.update(cfg.params.get(method, {}))
    return params


def merge_one(factors: Sequence[Mapping[str, LowRank]], method: str, cfg: MergeSection,
              params: Mapping[str, Any] | None = None) -> dict[str, Delta]:
    """Merge the adapters with one method at ``params`` (default: the configured ones); module -> delta."""
    return merge_adapters(factors, method, cfg.weights, method_params(method, cfg) if params is None else params)


def save_merge(deltas: Mapping[str, Delta], out_dir: Path, base_name: str, model=None, tokenizer=None,
               info: Mapping[str, Any] | None = None) -> str:
    """Low-rank results become a PEFT adapter; dense ones (TIES, DARE) a merged HF checkpoint.

    ``info`` (method, settings, tuned or not, validation score) is written beside it as ``merge.json``.
    """
    if all(isinstance(d, LowRank) for d in deltas.values()):
        adapters.save_factors(deltas, out_dir, base_name)
        fmt = "peft_adapter"
    elif model is None:
        raise ValueError("a dense merge result needs the base model to be saved as a merged checkpoint")
    else:
        adapters.save_merged_model(model, tokenizer, deltas, out_dir)
        fmt = "merged_model"
    if info is not None:
        (Path(out_dir) / MERGE_META).write_text(json.dumps(dict(info), indent=2, sort_keys=True, default=str))
    return fmt


def score_predictions(records: Sequence[Mapping], predictions: Sequence[str], cfg: EvalSection) -> dict[str, Any]:
    """One row of a score table: ``{"mean", "per_task": {task: score}, "n"}`` (exact match, every task
    counting the same in ``mean``), plus ``"rouge_l"`` (task-averaged) with ``eval.rouge``. For a
    multiple-choice record (``choices`` and ``answer``) the prediction is the chosen choice's text, so
    exact match is its accuracy.

    The one scoring path: :func:`tclora.evaluate.summarize` underneath, as for ``evaluate.exact_match``.
    """
    expected = [_expected(r) for r in records]
    metrics: dict[str, Sequence[float]] = {"exact_match": [p == e.strip() for p, e in zip(predictions, expected)]}
    if cfg.rouge:
        metrics["rouge_l"] = evaluate.rouge_l(predictions, expected)
    s = evaluate.summarize([r.get("task_name") or evaluate.DEFAULT_TASK for r in records], metrics)
    row = {"mean": s["macro"]["exact_match"], "per_task": {t: v["exact_match"] for t, v in s["per_task"].items()},
           "n": s["n"]}
    if cfg.rouge:
        row["rouge_l"] = s["macro"]["rouge_l"]
    return row


def _expected(record: Mapping) -> str:
    """The right answer: the correct choice's text for a multiple-choice record, else ``target``."""
    if "choices" in record:
        return record["choices"][evaluate.answer_index(record)]
    return record["target"]


def predict(model, tokenizer, records: Sequence[Mapping], cfg: EvalSection) -> list[str]:
    """The model's answers to ``records`` as it is now: greedy generation (``eval`` batch size, length, chat
    template), or for a multiple-choice record the text of its likeliest choice (length-normalised NLL, as
    mttl scores ARC, BoolQ and PIQA; :func:`tclora.evaluate.choose`)."""
    answers = [""] * len(records)
    mc = [i for i, r in enumerate(records) if "choices" in r]
    gen = [i for i, r in enumerate(records) if "choices" not in r]
    if gen:
        out = evaluate.generate_answers(model, tokenizer, [records[i]["source"] for i in gen],
                                        batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                                        chat_template=cfg.chat_template)
        for i, a in zip(gen, out):
            answers[i] = a
    if mc:
        chosen = evaluate.choose(model, tokenizer, [records[i] for i in mc], batch_size=cfg.batch_size,
                                 length_normalize=True)
        for i, c in zip(mc, chosen):
            answers[i] = records[i]["choices"][c]
    return answers


def score_records(model, tokenizer, records: Sequence[Mapping], cfg: EvalSection) -> dict[str, Any]:
    """:func:`score_predictions` of the model's own answers to ``records``."""
    return score_predictions(records, predict(model, tokenizer, records, cfg), cfg)


def evaluate_all(
    model, tokenizer, records: Sequence[Mapping], cluster_adapters: Mapping[int, Mapping[str, LowRank]],
    merges: Mapping[str, Mapping[str, Delta]], cfg: EvalSection,
) -> dict[str, dict[str, Any]]:
    """Scores (:func:`score_predictions`) of base, oracle-routed adapters and every merge on ``records``.

    Each record carries ``cluster`` (its nearest centroid); a record whose cluster has no adapter
    (a skipped tiny cluster) is answered by the base model in the oracle row.
    """
    results = {BASE: score_records(model, tokenizer, records, cfg)}
    by_cluster: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cluster[int(r.get("cluster", -1))].append(i)
    answers = [""] * len(records)
    for cluster, idx in sorted(by_cluster.items()):
        with adapters.deltas_applied(model, cluster_adapters.get(cluster, {})):
            for i, a in zip(idx, predict(model, tokenizer, [records[i] for i in idx], cfg)):
                answers[i] = a
    results[ORACLE] = score_predictions(records, answers, cfg)
    for method, deltas in merges.items():
        with adapters.deltas_applied(model, deltas):
            results[method] = score_records(model, tokenizer, records, cfg)
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
    """The first ``limit`` records of each task, in order (all with ``limit=None``)."""
    if limit is None:
        return list(records)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in records:
        task = r.get("task_name") or evaluate.DEFAULT_TASK
        if seen[task] < limit:
            seen[task] += 1
            out.append(r)
    return out


# ---- the tuned comparison: settings chosen on validation, test splits scored at them -----------------------
def tune_all(model, tokenizer, factors: Sequence[Mapping[str, LowRank]], validation: Sequence[Mapping],
             merge_cfg: MergeSection, eval_cfg: EvalSection) -> dict[str, tune_merge.TuneResult]:
    """:func:`tclora.tune_merge.tune_method` for every ``merge.methods``, scored on ``validation`` only.

    The score is ``merge.tune_metric`` (task-averaged exact match, or Rouge-L) of the merged model's
    answers to the (already capped) validation records.
    """
    metric = "mean" if merge_cfg.tune_metric == "exact_match" else merge_cfg.tune_metric
    cfg = eval_cfg.model_copy(update={"rouge": merge_cfg.tune_metric == "rouge_l"})

    def score(deltas: Mapping[str, Delta]) -> float:
        with adapters.deltas_applied(model, deltas):
            return score_records(model, tokenizer, validation, cfg)[metric]

    return {m: tune_merge.tune_method(factors, m, method_params(m, merge_cfg), score, merge_cfg.weights,
                                      merge_cfg.tune_grid.get(m)) for m in merge_cfg.methods}


def compare_merges(
    model, tokenizer, cluster_adapters: Mapping[int, Mapping[str, LowRank]], splits: Mapping[str, Sequence[Mapping]],
    merge_cfg: MergeSection, eval_cfg: EvalSection, validation: Sequence[Mapping] | None = None,
    on_merged: Callable[[str, Mapping[str, Delta], Mapping[str, Any]], Any] | None = None,
    arrow_dirs: Sequence[Path] = (),
) -> dict[str, Any]:
    """The whole comparison: tune each method on ``validation`` (when given and ``merge.tune`` allows),
    merge at the chosen (or configured) setting, then score base, oracle and every merge on ``splits``.

    Validation records are used for selection only and test records only after it: the setting of a
    method is fixed before any split in ``splits`` is read. Validation is scored, capped to
    ``merge.tune_max_per_task`` per task, even when tuning is off, so a sweep can select on it.

    Args:
        cluster_adapters: cluster id -> module -> factors (the oracle row routes by ``record["cluster"]``).
        splits: split name -> records (routed, capped) to report; the first is the headline.
        validation: selection records; capped here to ``merge.tune_max_per_task`` per task.
        on_merged: called as ``on_merged(method, deltas, setting)`` as soon as a method's final merge
            exists, before any evaluation (the pipeline saves it there, so a crash mid-eval leaves it saved).
        arrow_dirs: the cluster adapters' directories, in cluster-id order, for the ``routed-arrow`` row
            (:func:`score_arrow`).

    Returns:
        ``{"eval": {split: {method: scores}}, "validation": {method: scores} (on the capped validation
        subset; None without one), "merged": {method: module -> delta}, "settings": {method:
        {"params", "knobs", "tuned", "validation_score", "trials", "seconds"}}, "recommended": {"method",
        "params", "knobs", "validation_score"} or None (untuned), "arrow_choices": {split: [adapter index
        per record]} or None}``.
    """
    factors = list(cluster_adapters.values())
    tune = merge_cfg.tune if merge_cfg.tune is not None else bool(validation)
    if validation is not None and not validation:
        raise ValueError("compare_merges: the validation split is empty")
    if tune and not validation:
        raise ValueError("merge.tune is on but there is no validation split (set data.validation_path)")
    settings: dict[str, dict[str, Any]] = {}
    tuned: dict[str, tune_merge.TuneResult] = {}
    if tune:
        val = cap_per_task(validation, merge_cfg.tune_max_per_task)
        log.info("tuning %d merge methods on %d validation examples", len(merge_cfg.methods), len(val))
        started = time.time()
        tuned = tune_all(model, tokenizer, factors, val, merge_cfg, eval_cfg)
        log.info("tuning took %.1f s", time.time() - started)
    merged = {}
    for method in merge_cfg.methods:
        chosen = tuned[method].params if method in tuned else tune_merge.resolved(
            method, method_params(method, merge_cfg), len(factors))
        started = time.time()
        merged[method] = merge_one(factors, method, merge_cfg, chosen)
        knobs = list(tune_merge.grid_for(method, len(factors), merge_cfg.tune_grid.get(method))[1])
        settings[method] = {"params": chosen, "knobs": knobs, "tuned": method in tuned,
                            "seconds": round(time.time() - started, 3),
                            "validation_score": tuned[method].score if method in tuned else None,
                            "trials": tuned[method].trials if method in tuned else []}
        if on_merged is not None:
            on_merged(method, merged[method], settings[method])
    # Validation scores at the final settings (base and oracle included): what a sweep selects on. Scored
    # before any test split, on the same capped subset the tuning saw.
    val_scores = None
    if validation:
        val = cap_per_task(validation, merge_cfg.tune_max_per_task)
        val_scores = evaluate_all(model, tokenizer, val, cluster_adapters, merged, eval_cfg)
    evals = {name: evaluate_all(model, tokenizer, records, cluster_adapters, merged, eval_cfg)
             for name, records in splits.items()}
    arrow = score_arrow(model, tokenizer, splits, arrow_dirs, eval_cfg, evals) if arrow_dirs else None
    best = tune_merge.recommend(tuned) if tuned else None
    recommended = None if best is None else {"method": best.method, "params": best.params,
                                             "knobs": settings[best.method]["knobs"], "validation_score": best.score}
    return {"eval": evals, "validation": val_scores, "merged": merged, "settings": settings, "recommended": recommended,
            "arrow_choices": arrow}


def score_arrow(model, tokenizer, splits: Mapping[str, Sequence[Mapping]], adapter_dirs: Sequence[Path],
                cfg: EvalSection, evals: dict[str, dict[str, Any]]) -> dict[str, list[int]] | None:
    """The ``routed-arrow`` row of every split, added to ``evals[split]``, with ``eval.arrow_top_k`` > 0.

    One Arrow model (:func:`tclora.farm.arrow_applied`) serves every split: PEFT loads the adapters and
    builds the prototypes once. Returns ``{split: each record's most-weighted adapter index}``
    (:func:`tclora.farm.arrow_choices`, for routing accuracy), or None when the row is off.
    """
    if cfg.arrow_top_k <= 0:
        return None
    from tclora.farm import arrow_applied, arrow_choices

    choices = {}
    with arrow_applied(model, adapter_dirs, cfg.arrow_top_k) as routed:
        for name, records in splits.items():
            evals[name][ARROW] = score_records(routed, tokenizer, records, cfg)
            choices[name] = arrow_choices(routed, tokenizer, [r["source"] for r in records], cfg.chat_template,
                                          cfg.batch_size)
    return choices


def best_merge_yaml(recommended: Mapping[str, Any], test_scores: Mapping[str, float], merge_dir: str) -> str:
    """``best_merge.yaml``: the method and settings that won on validation, their test scores, where it is."""
    header = ("# tclora recommended merge: the best method and settings on the validation split.\n"
              f"# Test scores at this setting are reported, not used for the choice. Merged weights: {merge_dir}\n")
    body = {"method": recommended["method"], "params": dict(recommended["params"]),
            "validation_score": round(float(recommended["validation_score"]), 4),
            "test": {k: round(float(v), 4) for k, v in test_scores.items()}, "merge_dir": merge_dir,
            "config": {"merge": {"methods": [recommended["method"]], "tune": False,
                                 "params": {recommended["method"]: dict(recommended["params"])}}}}
    return header + yaml.safe_dump(body, sort_keys=False)
