"""Merge quality on the demo over several seeds: every registered merge method against oracle adapters.

    python -m benchmarks.bench_merge_quality                  # 3 seeds x 5 families: ~15 min on a quiet 2-core machine
    python -m benchmarks.bench_merge_quality --smoke          # tiny base, 2 families, 5 steps: ~1 min
    python -m benchmarks.bench_merge_quality --families all --seeds 0 1 2 3 4 --steps 150

Per seed, single process, no Ray (the recipe of tests/test_end_to_end_local.py, scaled up):

1. build the demo corpus with that seed (``build_demo_corpus``; payloads, and so splits, differ by seed);
2. train one LoRI adapter per task family with ``train_lori_adapter`` on the cached demo base
   (``build_demo_base``: the default spec, built once into ~/.cache/tclora, a few minutes the first time);
3. merge the adapters with every method in ``tclora.merge.registry`` (CP at ``--cp-ranks[0]``, which is
   also the rank of svd and knots) plus CP at the other ``--cp-ranks`` (``cp_r<R>``);
4. score base, oracle adapters and every merge with ``compare.evaluate_all`` (greedy exact match, mean
   over tasks) on ``test`` and ``compose_test``. Oracle routing is by family; a composition task goes to
   the adapter of its *last* component (the skill that shapes the answer), so on ``compose_test`` the
   oracle row is a single-skill reference, not an upper bound. Compositions whose components are not
   all among ``--families`` are dropped.

Reported per method: mean +- std over seeds (sample std) of exact match, retention = merge / oracle
(per seed, then mean +- std), and whether CP (configured rank) >= the best baseline on mean.
Default families: the five that the three composition tasks are built from (four of them read the same
word-list inputs, so interference is real). Writes ``bench_merge_quality[_smoke].json`` and ``.png``.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result
from tclora import adapters, compare
from tclora.config import EvalSection, LoRISection, MergeSection, TrainSection
from tclora.data import read_jsonl
from tclora.demo_corpus import COMPOSITIONS, TASK_FAMILIES, build_demo_corpus
from tclora.merge import registry
from tclora.models import DemoBaseSpec, build_demo_base, load_base
from tclora.train import train_lori_adapter

log = logging.getLogger("benchmarks.merge_quality")

DEFAULT_FAMILIES = ["first_word", "upper_words", "sort_words", "reverse_words", "reverse_chars"]
SPLITS = ("test", "compose_test")
# --smoke: the tests' tiny base (tests/conftest.py TINY_DEMO_SPEC) and sizes that run in about a minute.
TINY_DEMO_SPEC = dict(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=60, batch=16, seq_len=64)
SMOKE = dict(families=["first_word", "upper_words"], steps=5, rank=4, batch_size=8, lr=3e-3, sparse_lr_multiplier=3.0,
             train_per_task=40, eval_per_task=4, max_length=64, cp_ranks=[2, 4], cp_iters=10, max_new_tokens=20)
# Below this oracle exact match on test the adapters have not learned their tasks, and "CP >= best
# baseline" (often 0 >= 0) says nothing: it is reported as undetermined instead of met.
MIN_ORACLE_EM = 0.5


def route(records: list[dict], families: list[str]) -> list[dict]:
    """Oracle routing: a family's row to its adapter; a composition's to its last component's adapter."""
    out = []
    for r in records:
        task = COMPOSITIONS.get(r["task_name"])
        parts = list(task.components) if task else [r["task_name"]]
        if all(p in families for p in parts):
            out.append(dict(r, cluster=families.index(parts[-1])))
    return out


def merge_all(factors: list[dict], args) -> tuple[dict, dict, dict]:
    """Every registered method at the configured rank, plus CP at the extra ranks.

    Returns ``(merged, seconds, errors)``: a method that raises is recorded in ``errors`` (and scored
    as missing for this seed) instead of ending the benchmark.
    """
    runs = [(m, m, args.cp_ranks[0]) for m in registry.names()] + [(f"cp_r{R}", "cp", R) for R in args.cp_ranks[1:]]
    merged, seconds, errors = {}, {}, {}
    for label, method, rank in runs:
        started = time.perf_counter()
        try:
            merged[label] = compare.merge_one(factors, method, MergeSection(cp_rank=rank, cp_iters=args.cp_iters))
        except Exception as err:  # noqa: BLE001 - a failing method is a result, not a crash
            errors[label] = f"{type(err).__name__}: {err}"
            log.warning("merge %s failed: %s", label, errors[label])
        seconds[label] = round(time.perf_counter() - started, 3)
    return merged, seconds, errors


def run_seed(seed: int, model, tok, base_path: Path, args, work: Path) -> dict:
    """Corpus -> one adapter per family -> merges -> scores on both splits, for one seed."""
    t0, c0 = time.perf_counter(), time.process_time()
    splits = build_demo_corpus(work / "corpus", train_per_task=args.train_per_task,
                               eval_per_task=args.eval_per_task, seed=seed)
    train = read_jsonl(splits["train"])
    lori_cfg = LoRISection(rank=args.rank, alpha=2 * args.rank, sparsity=args.sparsity)
    train_cfg = TrainSection(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             sparse_lr_multiplier=args.sparse_lr_multiplier)
    metas = {}
    for cid, family in enumerate(args.families):
        rows = [r for r in train if r["task_name"] == family]
        a_seed = seed * 1000 if args.shared_a else seed * 1000 + cid  # independent across bench seeds
        metas[family] = train_lori_adapter(model, tok, rows, lori_cfg, train_cfg, seed=a_seed, out_dir=work / f"cluster-{cid}",
                                           max_length=args.max_length, base_model_name_or_path=str(base_path))
    t_train, c_train = time.perf_counter(), time.process_time()
    factors = {cid: adapters.load_factors(work / f"cluster-{cid}") for cid in range(len(args.families))}
    merged, merge_seconds, merge_errors = merge_all(list(factors.values()), args)
    t_merge, c_merge = time.perf_counter(), time.process_time()
    eval_cfg = EvalSection(batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    scores = {}
    for split in SPLITS:
        records = route(read_jsonl(splits[split]), args.families)
        if records:
            scores[split] = compare.evaluate_all(model, tok, records, factors, merged, eval_cfg)
    t_eval, c_eval = time.perf_counter(), time.process_time()
    log.info("seed %d: train %.0fs, merge %.1fs, eval %.0fs (wall); test EM oracle %.3f", seed, t_train - t0,
             t_merge - t_train, t_eval - t_merge, scores["test"]["adapters"]["mean"])
    return {"scores": scores, "merge_seconds": merge_seconds, "merge_errors": merge_errors,
            "train": {f: {k: m[k] for k in ("dense_loss_last", "sparse_loss_last", "seconds") if k in m} for f, m in metas.items()},
            # Wall seconds on a shared machine mislead; process CPU seconds say what the work costs.
            "seconds": {"train": round(t_train - t0, 1), "merge": round(t_merge - t_train, 1), "eval": round(t_eval - t_merge, 1)},
            "cpu_seconds": {"train": round(c_train - c0, 1), "merge": round(c_merge - c_train, 1), "eval": round(c_eval - c_merge, 1)}}


def _mean_std(by_seed: dict[int, float]) -> dict | None:
    xs = list(by_seed.values())
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "per_seed": {str(k): v for k, v in by_seed.items()}}


def summarise(per_seed: dict, baselines: list[str]) -> dict:
    """Per split and method: exact match and retention vs oracle, mean +- std over seeds; CP vs best baseline.

    A merge that raised on a seed has no score there (``failed_seeds``); CP failing on any seed counts
    as not reaching the best baseline. ``cp_ge_best_baseline`` is None (undetermined) while the oracle
    adapters score below ``MIN_ORACLE_EM`` on test.
    """
    labels = ["base", "adapters", *next(iter(per_seed.values()))["merge_seconds"]]
    out = {}
    for split in SPLITS:
        runs = {seed: r["scores"][split] for seed, r in per_seed.items() if split in r["scores"]}
        if not runs:
            continue
        methods = {}
        for m in labels:
            em = {seed: run[m]["mean"] for seed, run in runs.items() if m in run}
            ret = {seed: run[m]["mean"] / run["adapters"]["mean"] for seed, run in runs.items()
                   if m in run and run["adapters"]["mean"] > 0}
            methods[m] = {"exact_match": _mean_std(em), "retention": _mean_std(ret), "failed_seeds": len(runs) - len(em)}
        scored = [m for m in baselines if methods[m]["exact_match"]]
        best = max(scored, key=lambda m: methods[m]["exact_match"]["mean"])
        cp, ref = methods["cp"]["exact_match"], methods[best]["exact_match"]
        both = [k for k in ref["per_seed"] if cp and k in cp["per_seed"]]
        learned = statistics.fmean(r["scores"]["test"]["adapters"]["mean"] for r in per_seed.values()) >= MIN_ORACLE_EM
        out[split] = {
            "methods": methods,
            "best_baseline": best,
            "cp_minus_best_baseline": cp["mean"] - ref["mean"] if cp else None,
            "cp_ge_best_baseline": (bool(cp) and methods["cp"]["failed_seeds"] == 0 and cp["mean"] >= ref["mean"])
                                   if learned else None,
            "cp_ge_best_baseline_seeds": sum(cp["per_seed"][k] >= ref["per_seed"][k] for k in both),
            "seeds": len(runs),
        }
    return out


def _fmt(v: dict | None) -> str:
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "failed"


def headlines(summary: dict, cp_rank: int) -> list[dict]:
    rows = []
    for split, s in summary.items():
        m = s["methods"]
        em = lambda name: _fmt(m[name]["exact_match"])
        ret, failed = m["cp"]["retention"], m["cp"]["failed_seeds"]
        rows.append(headline(f"merge quality, {split}: oracle adapters EM", m["adapters"]["exact_match"]["mean"],
                             f"{em('adapters')} (base {em('base')})"))
        rows.append(headline(f"merge quality, {split}: CP (R={cp_rank}) vs best baseline", s["cp_minus_best_baseline"],
                             f"cp {em('cp')}" + (f" (retention {ret['mean']:.0%})" if ret else "")
                             + (f", failed on {failed} seed(s)" if failed else "")
                             + f" vs {s['best_baseline']} {em(s['best_baseline'])}; "
                             f"cp >= it in {s['cp_ge_best_baseline_seeds']}/{s['seeds']} seeds"
                             + ("" if s["cp_ge_best_baseline"] is not None else
                                f"; undetermined: oracle test EM < {MIN_ORACLE_EM}"),
                             target="CP >= best baseline", met=s["cp_ge_best_baseline"]))
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    summary = result["summary"]
    methods = list(next(iter(summary.values()))["methods"])
    width = 0.8 / len(summary)
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(methods)), 3.8))
    for j, (split, s) in enumerate(summary.items()):
        em = [s["methods"][m]["exact_match"] or {"mean": 0.0, "std": 0.0} for m in methods]  # failed: 0
        ax.bar([i + j * width for i in range(len(methods))], [e["mean"] for e in em], width,
               yerr=[e["std"] for e in em], capsize=3, label=split)
    ax.set_xticks([i + width * (len(summary) - 1) / 2 for i in range(len(methods))], methods, rotation=30)
    ax.set_ylabel("exact match (mean over tasks)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    c = result["config"]
    ax.set_title(f"{len(c['families'])} LoRI adapters (r={c['rank']}, s={c['sparsity']}), mean ± std over "
                 f"{len(c['seeds'])} seeds" + (" [smoke]" if result["smoke"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def parse_args(argv: list[str] | None = None):
    p = arg_parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="corpus + adapter seeds (>= 2 for a std)")
    p.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES,
                   help=f"task families to train one adapter each ('all' = {len(TASK_FAMILIES)})")
    p.add_argument("--steps", type=int, default=80, help="LoRI-D steps per adapter; LoRI-S runs as many")
    p.add_argument("--rank", type=int, default=8, help="LoRI rank r (alpha = 2r)")
    p.add_argument("--sparsity", type=float, default=0.9, help="LoRI-S: fraction of B masked out")
    p.add_argument("--shared-a", action="store_true", help="one A per module for all families (exact linear merges)")
    p.add_argument("--cp-ranks", type=int, nargs="+", default=[4, 2, 8],
                   help="CP ranks: the first is the configured one ('cp', also svd/knots' rank), the rest 'cp_r<R>'")
    p.add_argument("--cp-iters", type=int, default=100, help="CP-ALS iterations")
    p.add_argument("--lr", type=float, default=2e-3, help="LoRI-D learning rate (demo.yaml's)")
    p.add_argument("--sparse-lr-multiplier", type=float, default=10.0, help="LoRI-S lr = lr x this")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-per-task", type=int, default=300, help="demo corpus training rows per family")
    p.add_argument("--eval-per-task", type=int, default=40, help="demo corpus test / compose_test rows per task")
    p.add_argument("--max-length", type=int, default=96, help="tokens per training example")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the demo's matrices are tiny; on a loaded 2-core machine 2 threads "
                        "ran LoRI training steps ~20x and generation ~10x slower in wall time than 1, side by side)")
    p.add_argument("--cache-dir", type=Path, default=None, help="demo base cache (default ~/.cache/tclora)")
    p.add_argument("--work", type=Path, default=None, help="keep corpora and adapters here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.families == ["all"]:
        args.families = list(TASK_FAMILIES)
    unknown = sorted(set(args.families) - set(TASK_FAMILIES))
    if unknown or len(args.families) < 2:
        p.error(f"--families: need >= 2 of {list(TASK_FAMILIES)}; unknown: {unknown}")
    return args


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = DemoBaseSpec(**TINY_DEMO_SPEC) if args.smoke else DemoBaseSpec()
    started, cpu_started = time.perf_counter(), time.process_time()
    base_path = build_demo_base(args.cache_dir, spec)  # cached after the first build
    model, tok = load_base(str(base_path))
    base_seconds = round(time.perf_counter() - started, 1)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "work", "cache_dir")}
    result = {"benchmark": "merge_quality", "smoke": args.smoke, "machine": machine_info(),
              "config": {**config, "alpha": 2 * args.rank, "base_spec": spec.key(), "methods": registry.names(),
                         "oracle_routing": "by family; compositions to their last component's adapter"}}
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            work = (args.work or Path(tmp)) / f"seed-{seed}"
            per_seed[seed] = run_seed(seed, model, tok, base_path, args, work)
    baselines = [m for m in registry.names() if m != "cp"]
    result["summary"] = summarise(per_seed, baselines)
    result["headline"] = headlines(result["summary"], args.cp_ranks[0])
    result["per_seed"] = {str(s): r for s, r in per_seed.items()}
    result["seconds"] = {"total": round(time.perf_counter() - started, 1), "base_build_and_load": base_seconds}
    result["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    write_result(args.out, result_stem("merge_quality", args.smoke), result, plot)
    for split, s in result["summary"].items():
        print(f"\n{split} (mean ± std over {s['seeds']} seeds)")
        for method, v in s["methods"].items():
            ret = v["retention"]
            print(f"  {method:10s} EM {_fmt(v['exact_match'])}" + (f"   retention {ret['mean']:.0%} ± {ret['std']:.0%}" if ret else "")
                  + (f"   failed on {v['failed_seeds']} seed(s)" if v["failed_seeds"] else ""))
        print(f"  CP >= best baseline ({s['best_baseline']}): {s['cp_ge_best_baseline']}")
    return result


if __name__ == "__main__":
    main()
