"""Merge quality on the demo world over several seeds: every merge method, λ-tuned on validation.

    python -m benchmarks.bench_merge_quality                  # 3 seeds, the demo config's sizes
    python -m benchmarks.bench_merge_quality --smoke          # tiny base, 2 families, 5 steps: ~1 min
    python -m benchmarks.bench_merge_quality --kinds lori_s lori_d lora shared_a   # adapter kind x merge matrix
    python -m benchmarks.bench_merge_quality --disentangle 3    # adapters trained with train.disentangle = 3
    python -m benchmarks.bench_merge_quality --merge-aware 0 0.25   # and without/with train.merge_aware = 0.25
    python -m benchmarks.bench_merge_quality --merge-aware 0.03 --merge-aware-dropout 0.5   # sums of random subsets

Per seed, single process, no Ray:

1. build the demo corpus with that seed (``tclora.demo_corpus``: skills in the base, instructions in the
   adapters; payloads, and so rows, differ by seed);
2. train one adapter per trained family on the cached demo base (``tclora.demo_base``, built once into
   ~/.cache/tclora): LoRI kinds fused in one group (``train_lori_group``, as a run's train stage does, with
   ``--disentangle`` and ``--merge-aware`` as ``train.disentangle`` and ``train.merge_aware``), plain LoRA one at
   a time (``train_lori_adapter``);
3. for every merge method, pick λ (``scale``: the merged update computed with weights 1, times λ) and
   the method's knobs (TIES/KnOTS density, DARE keep rate, CP combine rule, TSV-M fraction) as a run
   does (``compare.tune_all``), by exact match on a capped ``validation`` subset, its only use;
4. score base, oracle adapters (routed by family; a composition goes to its *last* component's
   adapter, so there the oracle is a single-skill reference) and every merge at its chosen setting on
   ``test`` (in-domain), ``ood_test`` (zero-shot; no oracle: no adapter was trained for it),
   ``compose_test`` (exact match, mean over tasks) and ``mc_test`` (multiple-choice accuracy by
   length-normalised NLL; oracle only on the trained families' rows);
5. measure each adapter's and each merge's update size: ||ΔW||_F / ||W||_F per module, mean and max;
6. ``skills``: which skill the base, each adapter alone and the best merge on validation perform on each
   trained family's test prompts (the share of a family's prompts answered with each skill's output).
   An adapter that answers every family's prompts with its own skill has learnt "do my skill", not
   "read the instruction"; a sum of such adapters has nothing to select with.

Targets (issue 12), mean over seeds: base <= 0.2 and oracle >= 0.85 in-domain; the best merge keeps
>= 60% of the oracle's gain over the base in-domain and beats the base by >= 0.10 out of domain.
Writes ``bench_merge_quality[_smoke].json`` and ``.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result
from tclora import adapters, artifacts, compare, evaluate
from tclora.config import FUSED_LOSS_FIELDS, EvalSection, LoRISection, MergeAwareUpdates, MergeSection, TrainSection
from tclora.data import read_jsonl
from tclora.demo_base import DemoBaseSpec, build_demo_base
from tclora.demo_corpus import COMPOSITIONS, SKILLS, TASK_FAMILIES, build_demo_corpus, payload_of
from tclora.merge import dense, merge_adapters, registry
from tclora.models import load_base
from tclora.multi_lori import train_lori_group
from tclora.train import train_lori_adapter

log = logging.getLogger("benchmarks.merge_quality")

GEN_SPLITS = ("test", "ood_test", "compose_test")
SPLITS = (*GEN_SPLITS, "mc_test")
BASE, ORACLE = compare.BASE, compare.ORACLE
# --smoke: the tests' tiny base (tests/conftest.py TINY_DEMO_SPEC) and sizes that run in about a minute.
TINY_DEMO_SPEC = dict(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=60, batch=16, seq_len=64)
SMOKE = dict(families=["first_word", "count_words"], steps=5, rank=4, batch_size=8, train_per_task=40, eval_per_task=4,
             tune_per_task=2, methods=["linear", "ties", "cp"], lambdas=[0.5, 1.0], cp_iters=10)
CP_COMBINES = ("mean", "sum", "shared")  # each also reported alone ("cp:shared"), beside cp with the rule tuned
DEFAULT_CP_RANK = 4  # demo.yaml's merge.cp_rank
TARGETS = {"base_max": 0.2, "oracle_min": 0.85, "gain_kept_min": 0.6, "ood_gain_min": 0.10}


def route(records: list[dict], families: list[str]) -> list[dict]:
    """Oracle routing: a family's row to its adapter; a composition's to its last component's adapter."""
    out = []
    for r in records:
        task = COMPOSITIONS.get(r["task_name"])
        parts = list(task.components) if task else [r["task_name"]]
        if all(p in families for p in parts):
            out.append(dict(r, cluster=families.index(parts[-1])))
    return out


def base_fingerprint(base_path: Path) -> dict:
    """Which demo base a result was measured on: its weights' sha256 (from the checkpoint's manifest) and its
    pre-training loss. The base is rebuilt from its spec where none is cached, and pre-training 3,000 steps on
    another CPU rounds differently: the same spec and seed then give another base (issue 12: rebuilt on
    2026-12-03, TSV-M's out-of-domain gain on one variant moved from +0.04 to +0.11)."""
    manifest = artifacts.read_manifest(base_path) or {}
    return {"sha256": manifest.get("outputs", {}).get("model.safetensors"),
            "final_loss": manifest.get("final_loss"), "built": manifest.get("finished_at")}


def norm_ratio(model, deltas: dict) -> dict:
    """||ΔW||_F / ||W||_F over the adapted modules: mean and max (how big a nudge the update is)."""
    params = dict(model.named_parameters())
    ratios = [(dense(d).norm() / params[f"{name}.weight"].norm()).item() for name, d in deltas.items()]
    return {"mean": statistics.fmean(ratios), "max": max(ratios)}


def split_scores(model, tok, records: list[dict], split: str, args) -> dict[str, float]:
    """``{task: score}`` of the model as it is on one split: exact match, or on mc_test the accuracy of the
    choice with the lowest length-normalised NLL."""
    if split == "mc_test":
        res = evaluate.choice_accuracy(model, tok, records, batch_size=args.eval_batch_size,
                                       max_length=args.max_length, length_normalize=True)
        return {t: v["accuracy"] for t, v in res["per_task"].items()}
    return compare.evaluate_all(model, tok, records, {}, {}, EvalSection(
        batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens))[BASE]["per_task"]


def skills_performed(model, tok, deltas: dict | None, rows: list[dict], families: list[str], args) -> dict:
    """{prompt family: {skill: share of its prompts answered with that skill's output}} for base + ``deltas``.

    The skills are the trained families' (an answer may match several on a payload where they agree).
    """
    with adapters.deltas_applied(model, deltas) if deltas else contextlib.nullcontext():
        answers = evaluate.generate_answers(model, tok, [r["source"] for r in rows], batch_size=args.eval_batch_size,
                                            max_new_tokens=args.max_new_tokens)
    out = {}
    for family in families:
        pairs = [(payload_of(r["source"], family), a) for r, a in zip(rows, answers) if r["task_name"] == family]
        out[family] = {skill: sum(SKILLS[skill](p) == a for p, a in pairs) / len(pairs) for skill in families}
    return out


def scores_with(model, tok, deltas: dict | None, data: dict, args) -> tuple[dict, dict]:
    """One model (base + ``deltas``) on every split: ``({split: score}, {split: {task: score}})``, the score
    the mean over tasks (every task counts the same, as in a run's report)."""
    with adapters.deltas_applied(model, deltas) if deltas else contextlib.nullcontext():
        per_task = {s: split_scores(model, tok, data[s], s, args) for s in SPLITS if data[s]}
    return {s: sum(v.values()) / len(v) for s, v in per_task.items()}, per_task


def oracle_scores(model, tok, factors: dict, data: dict, args) -> dict:
    """Each routed row answered by its own family's adapter (OOD: none exists, so no entry)."""
    out = {}
    for split in ("test", "compose_test", "mc_test"):
        rows, hits = data[f"{split}_routed"], {}
        for cid, f in factors.items():
            sub = [r for r in rows if r["cluster"] == cid]
            if not sub:
                continue
            with adapters.deltas_applied(model, f):
                if split == "mc_test":
                    res = evaluate.choice_accuracy(model, tok, sub, batch_size=args.eval_batch_size,
                                                   max_length=args.max_length, length_normalize=True)
                    hits.update({t: v["accuracy"] for t, v in res["per_task"].items()})
                else:
                    hits.update(compare.evaluate_all(model, tok, sub, {}, {}, EvalSection(
                        batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens))[BASE]["per_task"])
        if hits:
            out[split] = sum(hits.values()) / len(hits)
    return out


def tune(model, tok, factors: list[dict], method: str, val: list[dict], args) -> tuple[dict, dict, list]:
    """The run's own protocol (``compare.tune_all``: every (knobs, λ) of the grid scored on the validation
    subset, the argmax kept): returns (chosen params, merged deltas at them, every trial)."""
    name, _, combine = method.partition(":")  # "cp:shared": CP with that combine rule, λ still tuned
    grid = {**({"scale": args.lambdas} if args.lambdas else {}), **({"combine": [combine]} if combine else {})}
    # The rule is the start point as well as the only value tried: in the grid alone, the search would
    # start from the default rule and keep it unless the named one scored strictly better.
    merge_cfg = MergeSection(methods=[name], cp_rank=args.cp_rank, cp_iters=args.cp_iters, tune_grid={name: grid},
                             params={name: {"combine": combine}} if combine else {})
    eval_cfg = EvalSection(batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens, rouge=False)
    result = compare.tune_all(model, tok, factors, val, merge_cfg, eval_cfg)[name]
    return result.params, merge_adapters(factors, name, None, result.params), result.trials


# Train fields that shape a fused group's adapters: one variant each (the weights, then which adapters
# merge_aware's summed loss trains).
FUSED_LOSSES = (*FUSED_LOSS_FIELDS, "merge_aware_updates")
# Training sizes a variant's name carries where they differ from the run's reference sizes (the demo's, or
# --smoke's), so that --combine never pools seeds trained on different budgets under one name.
BUDGET = ("steps", "lr", "sparse_lr_multiplier", "rank", "sparsity", "batch_size", "train_per_task")


def budget_suffix(args) -> str:
    """``+steps240+lr0.002``: each :data:`BUDGET` argument that differs from its default (``--smoke``'s under
    ``--smoke``), in that order; empty at the reference sizes."""
    reference = parse_args(["--smoke"] if args.smoke else [])
    suffix = "".join(f"+{k}{getattr(args, k):g}" for k in BUDGET if getattr(args, k) != getattr(reference, k))
    if args.target_modules != reference.target_modules:  # +modules_q_k_v_o: the adapted modules, "_proj" dropped
        suffix += "+modules_" + "_".join(m.removesuffix("_proj") for m in args.target_modules)
    return suffix


def variants(args) -> list[tuple[str, str, dict]]:
    """(name, adapter kind, train overrides) for every kind x β (train.disentangle) x γ (train.merge_aware) x
    adapter dropout (train.merge_aware_dropout) x summed-loss updates (train.merge_aware_updates), the last two
    with γ > 0 only, named ``<kind>[+disentangle<β>][+merge_aware<γ>][+merge_aware_dropout<p>]
    [+merge_aware_updates_others][+steps<n>…][+per_run<G>][+cp_rank<R>][+base_seed<S>|+base_per_seed]``
    (:func:`budget_suffix` for the training sizes); plain LoRA is never fused, so only β = γ = 0."""
    out, budget = [], budget_suffix(args)
    for kind in args.kinds:
        for values in itertools.product(*(getattr(args, field) for field in FUSED_LOSSES)):
            train = dict(zip(FUSED_LOSSES, values))
            if (train["merge_aware_dropout"] or train["merge_aware_updates"] != "all") and not train["merge_aware"]:
                continue  # no summed pass to drop adapters from or to route updates of
            weights = {k: v for k, v in train.items() if k in FUSED_LOSS_FIELDS}
            if kind != "lora" or not any(weights.values()):
                split = kind != "lora" and args.clusters_per_run and args.clusters_per_run < len(args.families)
                name = "".join([kind, *(f"+{k}{v:g}" for k, v in weights.items() if v),
                                "" if train["merge_aware_updates"] == "all"
                                else f"+merge_aware_updates_{train['merge_aware_updates']}", budget,
                                f"+per_run{args.clusters_per_run}" if split else "",
                                f"+cp_rank{args.cp_rank}" if args.cp_rank != DEFAULT_CP_RANK else "",
                                f"+base_seed{args.base_seed}" if args.base_seed else "",
                                "+base_per_seed" if args.base_per_seed else ""])
                out.append((name, kind, train))
    if not out:
        raise SystemExit("nothing to run: plain LoRA (--kinds lora) is never fused, so it has only "
                         "--disentangle 0 and --merge-aware 0")
    return out


def run_seed(seed: int, kind: str, model, tok, base_path: Path, args, work: Path, train: dict | None = None) -> dict:
    """Corpus -> one adapter per family -> λ-tuned merges -> scores on every split, for one seed."""
    t0 = time.perf_counter()
    paths = build_demo_corpus(work / "corpus", train_per_task=args.train_per_task,
                              eval_per_task=args.eval_per_task, seed=seed)
    rows = {s: read_jsonl(p) for s, p in paths.items()}
    fams = args.families
    data = {s: [r for r in rows[s] if s in ("ood_test", "mc_test") or r["task_name"] in fams
                or r["task_name"] in COMPOSITIONS] for s in SPLITS}
    data["compose_test"] = [r for r in route(rows["compose_test"], fams)]
    for s in ("test", "compose_test", "mc_test"):
        data[f"{s}_routed"] = route(data[s], fams)
    val = compare.cap_per_task([r for r in rows["validation"] if r["task_name"] in fams], args.tune_per_task)
    lori_cfg = LoRISection(rank=args.rank, alpha=2 * args.rank, sparsity=args.sparsity,
                           target_modules=args.target_modules, mode="lori_s" if kind == "shared_a" else kind,
                           shared_a=kind == "shared_a")
    per_run = min(args.clusters_per_run or len(fams), len(fams))
    train_cfg = TrainSection(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             sparse_lr_multiplier=args.sparse_lr_multiplier,
                             clusters_per_run=per_run, **(train or {}))
    record_sets = [[r for r in rows["train"] if r["task_name"] == family] for family in fams]
    seeds = [seed * 1000 if lori_cfg.shared_a else seed * 1000 + cid for cid in range(len(fams))]  # independent
    out_dirs = [work / f"cluster-{cid}" for cid in range(len(fams))]                                # across seeds
    if kind == "lora":  # trainable A: one adapter at a time (never fused, so no fused-group losses)
        metas = [train_lori_adapter(model, tok, records, lori_cfg, train_cfg, seed=a_seed, out_dir=out,
                                    max_length=args.max_length, base_model_name_or_path=str(base_path))
                 for records, a_seed, out in zip(record_sets, seeds, out_dirs)]
    else:  # fused: at β = γ = 0 each adapter equals the one trained alone on the same batches (test_multi_lori.py)
        metas = [meta for i in range(0, len(fams), per_run)  # groups of per_run families, as the train stage packs them
                 for meta in train_lori_group(model, tok, record_sets[i:i + per_run], lori_cfg, train_cfg,
                                              seeds=seeds[i:i + per_run], out_dirs=out_dirs[i:i + per_run],
                                              max_length=args.max_length, base_model_name_or_path=str(base_path))]
    factors, train_meta = {}, {}
    for cid, (family, meta) in enumerate(zip(fams, metas)):
        factors[cid] = adapters.load_factors(out_dirs[cid])
        # "seconds": a fused group's is the whole group's, recorded under each of its families
        train_meta[family] = {k: meta[k] for k in ("dense_loss_last", "sparse_loss_last", "seconds") if k in meta}
        train_meta[family]["norm_ratio"] = norm_ratio(model, factors[cid])
    t_train = time.perf_counter()
    scores, per_task = {}, {}  # per_task: model -> split -> family, what a mean hides (which family gains)
    scores[BASE], per_task[BASE] = scores_with(model, tok, None, data, args)
    scores[ORACLE] = oracle_scores(model, tok, factors, data, args)
    log.info("seed %d %s: base %s, oracle %s, adapter norm ratios %s", seed, kind,
             *({k: round(v, 3) for k, v in scores[m].items()} for m in (BASE, ORACLE)),
             {f: round(m["norm_ratio"]["mean"], 4) for f, m in train_meta.items()})
    chosen, curves, ratios, errors, merged = {}, {}, {}, {}, {}
    methods = list(args.methods) + ([f"cp:{rule}" for rule in CP_COMBINES] if "cp" in args.methods else [])
    for method in methods:
        try:
            chosen[method], merged[method], curves[method] = tune(model, tok, list(factors.values()), method,
                                                                 val, args)
        except Exception as err:  # noqa: BLE001 - a failing method is a result, not a crash
            errors[method] = f"{type(err).__name__}: {err}"
            log.warning("merge %s failed: %s", method, errors[method])
            continue
        ratios[method] = norm_ratio(model, merged[method])
        scores[method], per_task[method] = scores_with(model, tok, merged[method], data, args)
        log.info("seed %d %s: %s %s %s (norm ratio %.4f)", seed, kind, method, chosen[method],
                 {k: round(v, 3) for k, v in scores[method].items()}, ratios[method]["mean"])
    best = max(chosen, key=lambda m: max(t["score"] for t in curves[m]), default=None)  # on validation
    skills = {BASE: skills_performed(model, tok, None, data["test"], fams, args),
              **{f"adapter {f}": skills_performed(model, tok, factors[cid], data["test"], fams, args)
                 for cid, f in enumerate(fams)}}
    if best:  # the merge tuning already built, not merged again
        skills[f"merge {best}"] = skills_performed(model, tok, merged[best], data["test"], fams, args)
    t_eval = time.perf_counter()
    log.info("seed %d %s: train %.0fs, tune+eval %.0fs; test EM base %.3f oracle %.3f best merge %.3f", seed, kind,
             t_train - t0, t_eval - t_train, scores[BASE]["test"], scores[ORACLE]["test"],
             max((scores[m]["test"] for m in chosen), default=float("nan")))
    return {"scores": scores, "per_task": per_task, "params": chosen, "validation_trials": curves, "skills": skills,
            "norm_ratio": {"adapters": {f: m["norm_ratio"] for f, m in train_meta.items()}, "merges": ratios},
            "merge_errors": errors, "train": train_meta,
            "seconds": {"train": round(t_train - t0, 1), "tune_and_eval": round(t_eval - t_train, 1)}}


def _mean_std(xs: list[float]) -> dict | None:
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarise(per_seed: dict) -> dict:
    """Per split and model: score mean ± std over seeds; per merge: share of the oracle's gain kept."""
    models = list(dict.fromkeys(m for r in per_seed.values() for m in r["scores"]))
    out = {}
    for split in SPLITS:
        out[split] = {m: _mean_std([r["scores"][m][split] for r in per_seed.values()
                                    if split in r["scores"].get(m, {})]) for m in models}
    merges = [m for m in models if m not in (BASE, ORACLE)]
    gain = {}
    for m in merges:
        kept = [(r["scores"][m]["test"] - r["scores"][BASE]["test"])
                / (r["scores"][ORACLE]["test"] - r["scores"][BASE]["test"])
                for r in per_seed.values()
                if m in r["scores"] and r["scores"][ORACLE]["test"] > r["scores"][BASE]["test"]]
        gain[m] = _mean_std(kept)
    scored = [m for m in merges if out["test"][m]]
    ood_gain = {m: out["ood_test"][m]["mean"] - out["ood_test"][BASE]["mean"] for m in scored}
    best = max(scored, key=lambda m: out["test"][m]["mean"]) if scored else None
    best_ood = max(ood_gain, key=ood_gain.get) if ood_gain else None
    base, oracle = out["test"][BASE]["mean"], out["test"][ORACLE]["mean"]
    baselines = [m for m in scored if m.split(":")[0] != "cp"]
    best_baseline = max(baselines, key=lambda m: out["test"][m]["mean"]) if baselines else None
    paired = {cp: _paired(per_seed, cp, best_baseline) for cp in scored if cp.split(":")[0] == "cp" and best_baseline}
    # One merge for both targets: the best merge in domain and the best out of domain may be different methods.
    # The one closest to meeting both: the largest min(kept / 60%, OOD gain / 0.10); >= 1 means both are met.
    reach = {m: min(gain[m]["mean"] / TARGETS["gain_kept_min"], ood_gain[m] / TARGETS["ood_gain_min"])
             for m in scored if gain[m]}
    both = max(reach, key=reach.get) if reach else None
    return {"splits": out, "gain_kept": gain, "ood_gain": ood_gain, "best_merge": best, "best_ood_merge": best_ood,
            "both_merge": both,
            "best_baseline": best_baseline, "cp_vs_best_baseline": paired, "adapter_skills": _imposed(per_seed),
            "ood_per_family": _per_family(per_seed, "ood_test"),
            "targets": {
        "base_in_domain": {"value": base, "met": base <= TARGETS["base_max"]},
        "oracle_in_domain": {"value": oracle, "met": oracle >= TARGETS["oracle_min"]},
        "best_merge_gain_kept": {"value": gain[best]["mean"] if best and gain[best] else None,
                                 "met": bool(best and gain[best] and gain[best]["mean"] >= TARGETS["gain_kept_min"])},
        "best_ood_gain_over_base": {"value": ood_gain.get(best_ood),
                                    "met": bool(best_ood and ood_gain[best_ood] >= TARGETS["ood_gain_min"])},
        "one_merge_both": {"value": reach.get(both), "met": bool(both and reach[both] >= 1)}}}


def _per_family(per_seed: dict, split: str) -> dict | None:
    """``{model: {family: score}}`` on ``split``, each the mean over the seeds that recorded per-family scores;
    None when none did (results from before 2026-12-03 keep only each split's mean)."""
    runs = [r["per_task"] for r in per_seed.values() if "per_task" in r]
    out = {}
    for m in dict.fromkeys(m for run in runs for m in run):
        rows = [run[m][split] for run in runs if split in run.get(m, {})]
        out[m] = {f: statistics.mean(row[f] for row in rows) for f in rows[0]} if rows else {}
    return out or None


def _imposed(per_seed: dict) -> dict | None:
    """Each adapter alone, over seeds: the share of its own family's prompts it answers with its skill
    (``own``), and of the other families' prompts (``imposed``: 0 for an adapter that reads the instruction)."""
    own, imposed = [], []
    for r in per_seed.values():
        for name, table in r.get("skills", {}).items():
            if name.startswith("adapter "):
                skill = name.removeprefix("adapter ")
                own.append(table[skill][skill])
                imposed += [row[skill] for family, row in table.items() if family != skill]
    return {"own": _mean_std(own), "imposed": _mean_std(imposed)} if own else None


def _paired(per_seed: dict, a: str, b: str) -> dict:
    """Test EM of ``a`` minus ``b``, seed by seed (same corpus, same adapters): mean ± std, and wins."""
    diffs = [r["scores"][a]["test"] - r["scores"][b]["test"]
             for r in per_seed.values() if a in r["scores"] and b in r["scores"]]
    return {"vs": b, "difference": _mean_std(diffs), "seeds_a_at_least_b": sum(d >= 0 for d in diffs),
            "seeds": len(diffs)}


def _fmt(v: dict | None) -> str:
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "-"


def headlines(summary: dict, kind: str) -> list[dict]:
    t, s = summary["targets"], summary["splits"]
    best, best_ood = summary["best_merge"], summary["best_ood_merge"]
    return [
        headline(f"merge quality ({kind}), in-domain: base / oracle EM", t["oracle_in_domain"]["value"],
                 f"base {_fmt(s['test'][BASE])}, oracle {_fmt(s['test'][ORACLE])}",
                 target="base <= 0.2, oracle >= 0.85", met=t["base_in_domain"]["met"] and t["oracle_in_domain"]["met"]),
        headline(f"merge quality ({kind}), in-domain: best merge's share of the oracle's gain",
                 t["best_merge_gain_kept"]["value"],
                 f"{best} {_fmt(s['test'].get(best))}, keeps {_fmt(summary['gain_kept'].get(best))}",
                 target=">= 60%", met=t["best_merge_gain_kept"]["met"]),
        *[headline(f"merge quality ({kind}), in-domain: {cp} - best baseline (paired over seeds)",
                   p["difference"]["mean"],
                   f"{_fmt(p['difference'])} vs {p['vs']}; {cp} >= it in {p['seeds_a_at_least_b']}/{p['seeds']} seeds")
          for cp, p in summary.get("cp_vs_best_baseline", {}).items() if p["difference"]],
        *([headline(f"merge quality ({kind}): adapters alone answer other families' prompts with their own skill",
                    summary["adapter_skills"]["imposed"]["mean"],
                    f"{_fmt(summary['adapter_skills']['imposed'])} of prompts "
                    f"(their own family's: {_fmt(summary['adapter_skills']['own'])})")]
          if summary.get("adapter_skills") else []),
        headline(f"merge quality ({kind}), out of domain: best merge - base", t["best_ood_gain_over_base"]["value"],
                 f"{best_ood} {_fmt(s['ood_test'].get(best_ood))} vs base {_fmt(s['ood_test'][BASE])}",
                 target=">= +0.10", met=t["best_ood_gain_over_base"]["met"]),
        *([headline(f"merge quality ({kind}): one merge for both (share kept in domain, gain out of domain)",
                    t["one_merge_both"]["value"],
                    f"{summary['both_merge']}: keeps {summary['gain_kept'][summary['both_merge']]['mean']:.0%}, "
                    f"{summary['ood_gain'][summary['both_merge']]:+.3f} out of domain",
                    target=">= 60% and >= +0.10", met=t["one_merge_both"]["met"])]
          if summary.get("both_merge") else []),
    ]


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    kinds = list(result["summary"])
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        splits = result["summary"][kind]["splits"]
        models = list(splits["test"])
        width = 0.8 / len(SPLITS)
        for j, split in enumerate(SPLITS):
            vals = [splits[split].get(m) or {"mean": 0.0, "std": 0.0} for m in models]
            ax.bar([i + j * width for i in range(len(models))], [v["mean"] for v in vals], width,
                   yerr=[v["std"] for v in vals], capsize=2, label=split)
        ax.set_xticks([i + width * (len(SPLITS) - 1) / 2 for i in range(len(models))], models, rotation=30)
        ax.set_ylim(0, 1)
        ax.set_ylabel("EM / MC accuracy")
        ax.set_title(f"{kind}: {len(result['config']['families'])} adapters, λ tuned on validation, mean ± std over "
                     f"{len(result['config']['seeds'])} seeds" + (" [smoke]" if result["smoke"] else ""), fontsize=10)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def parse_args(argv: list[str] | None = None):
    p = arg_parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="corpus + adapter seeds (>= 2 for a std)")
    p.add_argument("--families", nargs="+", default=list(TASK_FAMILIES), help="trained families (one adapter each)")
    p.add_argument("--kinds", nargs="+", default=["lori_s"], choices=["lori_s", "lori_d", "lora", "shared_a"],
                   help="adapter kinds (lora: plain LoRA, trainable A; "
                        "shared_a: LoRI-S with one A per module for every family)")
    p.add_argument("--methods", nargs="+", default=registry.names(), help="merge methods (default: all registered)")
    p.add_argument("--lambdas", type=float, nargs="+", default=None,
                   help="λ grid tuned on validation (default: the run's, tclora.tune_merge.SCALES plus 1/T)")
    p.add_argument("--cp-rank", type=int, default=DEFAULT_CP_RANK,
                   help="CP rank R, also the SVD merge's rank (merge.cp_rank; default demo.yaml's; another R is "
                        "reported as '<variant>+cp_rank<R>')")
    p.add_argument("--tune-per-task", type=int, default=10, help="validation rows per family used for tuning")
    p.add_argument("--steps", type=int, default=120, help="LoRI-D steps per adapter; LoRI-S runs as many (demo.yaml's)")
    p.add_argument("--rank", type=int, default=8, help="LoRI rank r (alpha = 2r)")
    p.add_argument("--sparsity", type=float, default=0.9, help="LoRI-S: fraction of B masked out")
    p.add_argument("--target-modules", nargs="+", default=LoRISection().target_modules,
                   help="lori.target_modules: the linear modules that get adapters (default: every one, demo.yaml's; "
                        "others are reported as '<variant>+modules_q_k_v_o')")
    p.add_argument("--cp-iters", type=int, default=100, help="CP-ALS iterations")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRI-D learning rate (demo.yaml's)")
    p.add_argument("--sparse-lr-multiplier", type=float, default=10.0, help="LoRI-S lr = lr x this")
    p.add_argument("--disentangle", type=float, nargs="+", default=[0.0],
                   help="train.disentangle β values, each a variant of every LoRI kind (reported as "
                        "'<kind>+disentangle<β>'; 0: off, the plain kind)")
    p.add_argument("--merge-aware", type=float, nargs="+", default=[0.0],
                   help="train.merge_aware γ values, each a variant of every LoRI kind (and β): adapters also "
                        "trained for their sum ('<kind>+merge_aware<γ>'; 0: off)")
    p.add_argument("--merge-aware-dropout", type=float, nargs="+", default=[0.0],
                   help="train.merge_aware_dropout values, each a variant of every γ > 0: the summed pass of a "
                        "cluster's rows leaves out each other adapter with this probability "
                        "('<variant>+merge_aware_dropout<p>'; 0: the full sum)")
    p.add_argument("--merge-aware-updates", nargs="+", default=["all"], choices=get_args(MergeAwareUpdates),
                   help="train.merge_aware_updates values, each a variant of every γ > 0: which adapters a "
                        "cluster's summed loss trains ('<variant>+merge_aware_updates_others'; all: every one)")
    p.add_argument("--clusters-per-run", type=int, default=None,
                   help="LoRI kinds: fused groups of this many families (train.clusters_per_run), trained apart "
                        "and merged together, as a run with more clusters than clusters_per_run does "
                        "('<variant>+per_run<G>'; default: every family in one group)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-per-task", type=int, default=300, help="training rows per family")
    p.add_argument("--eval-per-task", type=int, default=40, help="rows per task in every evaluation split")
    p.add_argument("--max-length", type=int, default=64, help="tokens per training example")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's matrices are tiny)")
    p.add_argument("--cache-dir", type=Path, default=None, help="demo base cache (default ~/.cache/tclora)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="the demo base's pre-training steps (model.demo_pretrain_steps; default: the demo's)")
    p.add_argument("--base-seed", type=int, default=0,
                   help="the demo base's pre-training seed (another base, built and cached once; reported as "
                        "'<variant>+base_seed<S>'): how much a result owes to one pre-training draw")
    p.add_argument("--base-per-seed", action="store_true",
                   help="seed s trains and scores on the demo base pre-trained with seed s (each built and cached "
                        "once; '<variant>+base_per_seed'): the mean over seeds then spans pre-training draws, "
                        "where one base's seeds measure one draw")
    p.add_argument("--work", type=Path, default=None, help="keep corpora and adapters here (default: a temp dir)")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="re-summarise the per-seed results of earlier runs' JSON files (e.g. one process per seed)")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.base_per_seed and args.base_seed:
        p.error("--base-per-seed picks each seed's base itself: leave --base-seed at 0")
    unknown = sorted(set(args.families) - set(TASK_FAMILIES))
    if unknown or len(args.families) < 2:
        p.error(f"--families: need >= 2 of {list(TASK_FAMILIES)}; unknown: {unknown}")
    return args


def combine(args) -> dict:
    """One result from several runs' JSON (same sizes; different seeds, kinds or β): per-seed results of
    every variant, summarised again."""
    import json

    parts = [json.loads(p.read_text()) for p in args.combine]
    # A machine dict of its own: write_result stamps load_avg_end on it, which must not reach the first part's
    # machine, also the run machine of that part's variants.
    result = {**parts[0], "machine": dict(parts[0]["machine"]), "summary": {}, "per_seed": {}, "headline": [],
              "variant_machine": {}, "variant_base": {}, "combined_from": [str(p) for p in args.combine]}
    for kind in dict.fromkeys(k for part in parts for k in part["per_seed"]):
        holding = [(path, part) for path, part in zip(args.combine, parts) if kind in part["per_seed"]]
        per_seed = {int(s): r for _, part in holding for s, r in part["per_seed"][kind].items()}
        if kind.endswith("+base_per_seed"):  # each seed on its own base (seed s: base seed s), recorded per seed
            shas: dict[str, set] = {}
            for _, part in holding:
                for s, r in part["per_seed"][kind].items():
                    shas.setdefault(s, set()).add(r["base"]["sha256"])
            if clash := sorted(s for s, found in shas.items() if len(found) > 1):
                raise SystemExit(f"--combine: {kind}'s seed(s) {', '.join(clash)} were measured on different builds "
                                 "of their base (another machine's pre-training): rerun them on one")
            result["variant_base"][kind] = {s: shas[s].pop() for s in sorted(shas, key=int)}
            bases = set()
        else:
            bases = {part.get("variant_base", {}).get(kind, part["config"].get("base", {}).get("sha256"))
                     for _, part in holding} - {None}  # None: a part from before bases were recorded
            result["variant_base"][kind] = next(iter(bases), None)
        if len(bases) > 1:
            raise SystemExit(f"--combine: {kind}'s seeds were measured on different demo bases "
                             f"({', '.join(str(path) for path, _ in holding)}): rerun them on one base")
        result["per_seed"][kind] = {str(s): r for s, r in sorted(per_seed.items())}
        result["summary"][kind] = summarise(per_seed)
        # The machine (and date) a variant ran on: that of the last part holding it, as its seeds are (a part
        # that is itself combined says per variant); the README table shows it on the variant's rows.
        last = holding[-1][1]
        result["variant_machine"][kind] = last.get("variant_machine", {}).get(kind, last["machine"])
        result["headline"] += [{**h, "run_machine": result["variant_machine"][kind]}
                               for h in headlines(result["summary"][kind], kind)]
    result["config"]["seeds"] = sorted({int(s) for runs in result["per_seed"].values() for s in runs})
    result["config"]["variants"] = list(result["per_seed"])
    defaults = vars(parse_args([]))  # what a part from before an option existed ran with
    for key in ("kinds", *FUSED_LOSSES):  # the union over the parts (each list-valued in its own config)
        result["config"][key] = list(dict.fromkeys(v for part in parts for v in part["config"].get(key, defaults[key])))
    result["seconds"] = {"per_run": [p["seconds"] for p in parts]}
    result["cpu_seconds"] = sum(p["cpu_seconds"] for p in parts)
    return result


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    if args.combine:
        result = combine(args)
        write_result(args.out, result_stem("merge_quality", args.smoke), result, plot)
        _print(result)
        return result
    torch.set_num_threads(args.threads)
    spec = DemoBaseSpec(**TINY_DEMO_SPEC) if args.smoke else DemoBaseSpec()
    if args.pretrain_steps is not None:
        spec = dataclasses.replace(spec, pretrain_steps=args.pretrain_steps)
    base_of = {seed: seed if args.base_per_seed else args.base_seed for seed in args.seeds}  # seed -> base seed
    started, cpu_started = time.perf_counter(), time.process_time()
    base_paths = {b: build_demo_base(args.cache_dir, dataclasses.replace(spec, seed=b))  # cached after a first build
                  for b in sorted(set(base_of.values()))}
    loaded = {b: load_base(str(path)) for b, path in base_paths.items()}  # (model, tokenizer); the demo's are tiny
    fingerprints = {b: base_fingerprint(path) for b, path in base_paths.items()}
    spec = dataclasses.replace(spec, seed=base_of[args.seeds[0]])
    base_seconds = round(time.perf_counter() - started, 1)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out", "work", "cache_dir")}
    result = {"benchmark": "merge_quality", "smoke": args.smoke, "machine": machine_info(),
              "config": {**config, "alpha": 2 * args.rank, "base_spec": spec.key(),
                         # one base, or with --base-per-seed each seed's (also in its per-seed record)
                         "base": (fingerprints[args.base_seed] if not args.base_per_seed else
                                  {"per_seed": {str(s): fingerprints[s] for s in args.seeds}}),
                         "targets": TARGETS,
                         "oracle_routing": "by family; compositions to their last component's adapter"},
              "summary": {}, "per_seed": {}, "headline": []}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, adapter_kind, train in variants(args):
            per_seed = {seed: {**run_seed(seed, adapter_kind, *loaded[base_of[seed]], base_paths[base_of[seed]], args,
                                          (args.work or Path(tmp)) / f"{kind}-{seed}", train),
                               "base": fingerprints[base_of[seed]]}
                        for seed in args.seeds}
            result["summary"][kind] = summarise(per_seed)
            result["per_seed"][kind] = {str(s): r for s, r in per_seed.items()}
            result["headline"] += headlines(result["summary"][kind], kind)
    result["seconds"] = {"total": round(time.perf_counter() - started, 1), "base_build_and_load": base_seconds}
    result["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    write_result(args.out, result_stem("merge_quality", args.smoke), result, plot)
    _print(result)
    return result


def _print(result: dict) -> None:
    for kind, summary in result["summary"].items():  # combined results hold variants over different seeds
        print(f"\n{kind} (mean ± std over {len(result['per_seed'][kind])} seeds; λ per method tuned on validation)")
        print(f"  {'model':10s} " + " ".join(f"{s:>15s}" for s in SPLITS) + "   gain kept")
        for m in summary["splits"]["test"]:
            print(f"  {m:10s} " + " ".join(f"{_fmt(summary['splits'][s].get(m)):>15s}" for s in SPLITS)
                  + (f"   {_fmt(summary['gain_kept'][m])}" if m in summary["gain_kept"] else ""))
        print("  targets:", {k: v["met"] for k, v in summary["targets"].items()})


if __name__ == "__main__":
    main()
