"""Sweep: Ray Tune over cluster count k, CP rank R and LoRI sparsity s, reusing every stage output it can.

    tclora sweep --config configs/demo.yaml --k 2,4,8 --cp-rank 2,4,8              # grid; objective eval.cp.mean
    tclora sweep --config configs/demo.yaml --k 4,8 --cp-rank 2,4,8 --sparsity 0.8,0.9 --metric cp --split test
    tclora sweep --config configs/demo.yaml --k 4,8,11 --cp-rank 2,4,8 --search optuna --num-samples 6

What is computed how often (``<run.dir>`` is shared with ``tclora run``: each reuses the other's stages):

    <run.dir>/embed/                                    once, for every k
    <run.dir>/cluster/k<k>-<hash>/                      once per k
    <run.dir>/sweep/adapters/k<k>-s<s>-<hash>/train/    once per (k, s): every R merges these adapters
    <run.dir>/sweep/baselines/k<k>-s<s>-<hash>/merge_eval/     once per (k, s): base, oracle and the
                                                        merges that ignore R (linear, ties, ...)
    <run.dir>/sweep/trials/k<k>-s<s>-r<R>-<hash>/merge_eval/   one Tune trial: the merges that use R (cp, svd)
    <run.dir>/sweep/tune/sweep-<hash>/                  Tune's experiment state: a rerun restores it
    <run.dir>/sweep/sweep_results.json, score_vs_k.png, score_vs_rank.png, best_config.yaml

Who trains: the driver, before Tune, one (k, s) after another (each through ``run_train``, whose own Tune
run trains that set's clusters concurrently). Trials only merge and evaluate, so trials sharing a (k, s)
can never train the same adapters twice, whatever runs concurrently, and a rank-only sweep trains one
adapter set. The ``<hash>`` in every directory name covers the config it depends on, so a changed config
gets a new directory instead of overwriting one; the stage manifests decide what is reused. With
``--search optuna`` every (k, s) of the space is still trained up front: the search saves evaluations.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import ray
import ray.tune
from filelock import FileLock

from pipelines import session, tracking
from pipelines.cluster import run_cluster
from pipelines.embed import run_embed
from pipelines.merge_eval import run_merge_eval
from pipelines.session import TRIAL_CPUS
from pipelines.train import run_train
from tclora import artifacts, report, storage
from tclora.artifacts import short_hash
from tclora.config import Config, ConfigError, validate
from tclora.merge import registry
from tclora.report import BASE, ORACLE

log = logging.getLogger(__name__)

LOW_FIDELITY_PER_TASK = 8  # ASHA's first rung evaluates this many examples per task (a quarter of a set cap)


def _tag(*parts) -> str:
    return short_hash(parts, 8)


def point_config(cfg: Config, k: int | None = None, sparsity: float | None = None, cp_rank: int | None = None,
                 methods: list[str] | None = None, max_per_task: int | None | str = "keep",
                 arrow_top_k: int | None = None) -> Config:
    """``cfg`` at one sweep point (validated again, so a bad value names its field)."""
    raw = cfg.model_dump(mode="json")
    for section, field, value in (("cluster", "k", k), ("lori", "sparsity", sparsity),
                                  ("merge", "cp_rank", cp_rank), ("merge", "methods", methods),
                                  ("eval", "arrow_top_k", arrow_top_k)):
        if value is not None:
            raw[section][field] = value
    if max_per_task != "keep":
        raw["eval"]["max_per_task"] = max_per_task
    return validate(raw)


def uses_rank(method: str, cfg: Config) -> bool:
    """Whether ``merge.cp_rank`` sets ``method``'s rank (cp, svd): the registry's ``rank_param`` flag."""
    return registry.get(method).rank_param


def split_methods(cfg: Config, metric: str) -> tuple[list[str], list[str]]:
    """(methods each trial merges: those using R, plus the objective; methods merged once per (k, s))."""
    per_trial = [m for m in cfg.merge.methods if uses_rank(m, cfg) or m == metric]
    return per_trial, [m for m in cfg.merge.methods if m not in per_trial]


def set_dir(sweep_dir: Path, cfg: Config, cluster_dir: Path) -> Path:
    """Content-addressed home of one (k, s) adapter set: its clustering plus everything training reads."""
    tag = _tag(cluster_dir.name, cfg.section_hash("model", "lori", "train"), cfg.run.seed)
    return sweep_dir / "adapters" / f"k{cfg.cluster.k}-s{cfg.lori.sparsity:g}-{tag}"


def eval_dir(sweep_dir: Path, kind: str, cfg: Config, adapters: Path) -> Path:
    """``baselines/k-s-<hash>`` or ``trials/k-s-r-<hash>``: the hash covers the adapters and merge/eval config."""
    rank = f"-r{cfg.merge.cp_rank}" if kind == "trials" else ""
    tag = _tag(adapters.name, cfg.section_hash("merge", "eval"))
    return sweep_dir / kind / f"k{cfg.cluster.k}-s{cfg.lori.sparsity:g}{rank}-{tag}"


def score(evals: dict, method: str, split: str | None) -> float:
    """``eval.<method>.mean`` (the headline split) or the mean on one named split: what is reported."""
    return evals[method]["splits"][split] if split else evals[method]["mean"]


def objective(manifest: dict, method: str) -> float:
    """``validation.<method>.mean``: the selection score, on the validation split only (never a test split)."""
    return manifest["validation"][method]["mean"]


# ------------------------------------------------------------------------------------------------
# [1] One Tune trial: merge + evaluate one (k, s, R) on adapters the driver already trained.


def _trial(config: dict, *, cfg_json: dict, sweep_dir: str, sets: dict, metric: str, split: str | None,
           rungs: list) -> None:
    """Function trainable; reports once per fidelity rung (eval examples per task), the last one in full."""
    k, s, r = int(config["k"]), float(config["sparsity"]), int(config["cp_rank"])
    entry = sets[f"k{k}-s{s:g}"]
    for rung, cap in enumerate(rungs):
        # Arrow routing does not depend on R: it is scored once per (k, s), with the baselines.
        cfg = point_config(validate(cfg_json), k, s, r, methods=entry["trial_methods"], max_per_task=cap,
                           arrow_top_k=0)
        out = eval_dir(Path(sweep_dir), "trials", cfg, Path(entry["adapters"]))
        out.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out / ".lock")):  # Optuna can run one point twice at once: one evaluates, one reuses
            run_merge_eval(cfg, out, Path(entry["cluster"]), Path(entry["adapters"]) / "train", in_process=True)
        manifest = artifacts.read_manifest(out / "merge_eval")
        ray.tune.report({"objective": objective(manifest, metric), "test": score(manifest["eval"], metric, split),
                         "rung": rung, "final": rung == len(rungs) - 1, "dir": str(out / "merge_eval")})


def trial_resources(cfg: Config) -> ray.tune.PlacementGroupFactory:
    """What a trial's process holds: its own sliver plus the eval resources, since it merges and
    evaluates itself (``run_merge_eval(in_process=True)``): one process per trial, not two."""
    gpus = {"GPU": cfg.eval.num_gpus} if cfg.eval.num_gpus > 0 else {}
    return ray.tune.PlacementGroupFactory([{"CPU": TRIAL_CPUS + cfg.eval.num_cpus, **gpus, **cfg.eval.resources}])


def max_concurrent_trials(cfg: Config, n_trials: int, cap: int | None = None, resources: dict | None = None) -> int:
    """Trials at once: what their eval CPUs (GPUs) fit, capped by ``cap`` or else
    ``train.max_concurrent`` (the config's word on how many heavy processes this machine runs at once)."""
    fits = session.trials_that_fit({"CPU": cfg.eval.num_cpus + TRIAL_CPUS, "GPU": cfg.eval.num_gpus}, resources)
    return max(1, min(fits, cap or cfg.train.max_concurrent or fits, n_trials))


def _search(search: str, space: dict, num_samples: int | None, n_rungs: int, seed: int) -> tuple[dict, dict]:
    """Tune's param_space and TuneConfig kwargs: a grid, or Optuna (TPE) with ASHA over eval fidelity."""
    if search == "grid":
        return {name: ray.tune.grid_search(values) for name, values in space.items()}, {"num_samples": 1}
    if search != "optuna":
        raise ConfigError(f"--search: unknown {search!r}; use grid or optuna")
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna needs the optuna package: pip install 'tclora[sweep]' "
                          "(or pip install optuna), or use the default --search grid")
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    n_points = math.prod(len(v) for v in space.values())
    return {name: ray.tune.choice(values) for name, values in space.items()}, {
        "search_alg": OptunaSearch(seed=seed), "metric": "objective", "mode": "max",
        "scheduler": ASHAScheduler(time_attr="training_iteration", max_t=n_rungs, grace_period=1, reduction_factor=2),
        "num_samples": num_samples or max(1, n_points // 2)}


def _tune(trainable, param_space: dict, tune_kwargs: dict, name: str, root: str, concurrent: int, callbacks: list):
    """Fit, or restore and finish, the experiment ``root/name`` (errored trials are retried).

    ``callbacks``: Tune callbacks (MLflow's, when ``run.mlflow_tracking_uri`` is set: one MLflow run per
    trial, its config as params and its objective as a metric); a restored experiment keeps its own.
    """
    path = f"{root}/{name}"
    if ray.tune.Tuner.can_restore(path):
        log.info("sweep: restoring the Tune experiment in %s", path)
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit(), True
    trial_name = lambda t: "k{k}-s{sparsity:g}-r{cp_rank}".format(**t.config)  # noqa: E731
    tuner = ray.tune.Tuner(
        trainable, param_space=param_space,
        # reuse_actors: a finished trial's process takes the next one, with torch, transformers and PEFT
        # imported and the base loaded (run_merge_eval(in_process=True) keeps it): per trial, a merge and an
        # evaluation instead of a process start, the imports and a base load too.
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_name, reuse_actors=True, **tune_kwargs),
        run_config=ray.tune.RunConfig(name=name, storage_path=root, verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=1), callbacks=callbacks))
    return tuner.fit(), False


# ------------------------------------------------------------------------------------------------
# [2] The driver: embed once, cluster per k, train + baselines per (k, s), then Tune over (k, s, R).


def _train_set(cfg: Config, home: Path, cluster_dir: Path) -> dict:
    """Train (or reuse) one (k, s) adapter set in ``home/train``; counts what was trained now."""
    result = run_train(cfg, home, cluster_dir)
    train_dir, reused = result.dir, result.reused
    trained_report = json.loads((train_dir / "train_report.json").read_text())
    n, trained = len(trained_report["clusters"]), 0 if reused else len(trained_report["trained"])
    return {"dir": str(train_dir), "adapters": n, "trained": trained, "reused": n - trained}


def _sweep_configs(cfg: Config, space: dict, metric: str) -> tuple[Config, Config]:
    """(the user's config, with the objective's method added; the one trials run: no lm-eval benchmarks),
    after every point of ``space`` validated.

    Raises:
        ConfigError: an unknown metric, or a swept value the config refuses (naming its field).
    """
    if metric not in (*registry.names(), BASE, ORACLE):
        raise ConfigError(f"--metric: unknown {metric!r}; use {ORACLE}, {BASE} or a merge method {registry.names()}")
    if metric not in (*cfg.merge.methods, BASE, ORACLE):
        cfg = point_config(cfg, methods=[*cfg.merge.methods, metric])
    user_cfg = cfg
    if cfg.eval.lm_eval_tasks:  # benchmarks are for the chosen model: `tclora run` on best_config.yaml runs them
        log.info("sweep: eval.lm_eval_tasks are skipped in trials; best_config.yaml keeps them")
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"lm_eval_tasks": []})})
    for point in itertools.product(*space.values()):
        point_config(cfg, *point)  # every point validates before anything runs
    return user_cfg, cfg


def _rungs(search: str, cap: int | None) -> list[int | None]:
    """Examples per task each trial report evaluates (``cap``: ``eval.max_per_task``); ASHA gets a cheap first rung."""
    if search == "optuna" and (cap or math.inf) > LOW_FIDELITY_PER_TASK:
        return [LOW_FIDELITY_PER_TASK if cap is None else max(1, cap // 4), cap]
    return [cap]


def experiment_name(cfg: Config, concurrent: int, *search_settings) -> str:
    """The Tune experiment's name: a hash of the config but the swept values and the PLACEMENT fields (so a
    sweep resubmitted with other training resources restores its experiment), of what shapes the trials
    themselves (Tune restores each trial with the resources and concurrency it was created with: eval
    resources, then the cluster's size, train.max_concurrent or --max-concurrent), and of the search."""
    point = point_config(cfg, 1, 0.0, 1)
    trials = (point.eval.num_cpus, point.eval.resources, concurrent)
    return "sweep-" + _tag(point.section_hash(*Config.model_fields), trials, *search_settings)


def sweep(cfg: Config, ks: list[int] | None = None, ranks: list[int] | None = None,
          sparsities: list[float] | None = None, *, search: str = "grid", num_samples: int | None = None,
          metric: str = "cp", split: str | None = None, max_concurrent: int | None = None) -> dict:
    """Run (or resume) the sweep; returns what ``<run.dir>/sweep/sweep_results.json`` holds.

    Missing value lists default to the config's single value. ``metric`` is a merge method (or ``adapters``,
    ``base``). The best point is the one with the best ``metric`` on the validation split
    (``data.validation_path``, capped to ``merge.tune_max_per_task`` per task); ``split`` is the eval (test)
    split whose scores the table reports (default: the headline, the first of ``data.eval_paths``).

    Raises:
        ConfigError: an unknown metric, split or search, no validation split, a bad swept value, or optuna
            requested but not installed.
    """
    started = time.time()
    space = {"k": sorted(set(ks or [cfg.cluster.k])), "sparsity": sorted(set(sparsities or [cfg.lori.sparsity])),
             "cp_rank": sorted(set(ranks or [cfg.merge.cp_rank]))}
    user_cfg, cfg = _sweep_configs(cfg, space, metric)
    rungs = _rungs(search, cfg.eval.max_per_task)
    param_space, tune_kwargs = _search(search, space, num_samples, len(rungs), cfg.run.seed)

    if storage.is_uri(cfg.run.dir) and not cfg.run.dir.startswith("file://"):
        # Sweep trials merge and evaluate into directories below run.dir themselves: not yet through the store.
        raise ConfigError(f"tclora sweep: run.dir {cfg.run.dir!r} is an object store, which the sweep does not "
                          "support yet; use a local or shared-mount run.dir (tclora run supports both)")
    run_dir = Path(cfg.run.dir).resolve()
    sweep_dir = run_dir / "sweep"
    cfg = session.prepare_inputs(cfg, run_dir)  # before Ray starts, as tclora run (session.start)
    session.init_ray(cfg)
    splits = [Path(p).stem for p in cfg.data.eval_paths]
    if split is not None and split not in splits:
        raise ConfigError(f"--split: {split!r} is not an eval split; data.eval_paths has {splits}")
    if not cfg.data.validation_path:
        raise ConfigError("tclora sweep selects its best point on a validation split: set data.validation_path "
                          "(the demo generates one); test splits are only reported")
    prepared = prepare_sets(cfg, run_dir, space, metric)
    sets = prepared.pop("sets")

    concurrent = max_concurrent_trials(cfg, math.prod(len(v) for v in space.values()), max_concurrent)
    samples = num_samples if search != "grid" else None
    name = experiment_name(cfg, concurrent, space, search, samples, metric, split, rungs)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(
        _trial, cfg_json=cfg.model_dump(mode="json"), sweep_dir=str(sweep_dir), sets=sets,
        metric=metric, split=split, rungs=rungs), trial_resources(cfg))
    store = storage.store_for(cfg, run_dir)  # run.storage_path: Tune's experiment state goes there
    tune_root = store.uri_of(sweep_dir / "tune") if store.remote else str(sweep_dir / "tune")
    grid, restored = _tune(trainable, param_space, tune_kwargs, name, tune_root, concurrent,
                           tracking.tune_callbacks(cfg, "sweep"))

    key = f"validation.{metric}.mean"  # selection; the rows' scores (and best["test"]) are the reported split
    results = {"objective": {"metric": metric, "split": "validation", "key": key, "report_split": split or splits[0]},
               "search": search,
               "space": space, **collect(grid, sets, metric, split), **prepared,
               "tune": {"name": name, "path": f"{tune_root}/{name}", "restored": restored,
                        "max_concurrent": concurrent},
               "seconds": round(time.time() - started, 2)}
    write_outputs(results, user_cfg, sweep_dir)
    return results


def prepare_sets(cfg: Config, run_dir: Path, space: dict, metric: str) -> dict:
    """Embed once, cluster per k, train and evaluate the rank-independent baselines per (k, s).

    Returns ``{"sets": {"k<k>-s<s>": dirs and methods for the trials}, "training": counts, "embed", "clusters"}``.
    """
    sweep_dir = run_dir / "sweep"
    trial_methods, once_methods = split_methods(cfg, metric)
    embed = run_embed(cfg, run_dir)
    embed_dir = embed.dir
    clusters = {k: run_cluster(point_config(cfg, k=k), run_dir, embed_dir).dir for k in space["k"]}
    sets, training = {}, {}
    for k, s in itertools.product(space["k"], space["sparsity"]):
        point, name = point_config(cfg, k, s), f"k{k}-s{s:g}"
        home = set_dir(sweep_dir, point, clusters[k])
        training[name] = _train_set(point, home, clusters[k])
        baselines = None
        if once_methods:
            once = point_config(point, methods=once_methods)
            baselines = eval_dir(sweep_dir, "baselines", once, home) / "merge_eval"
            run_merge_eval(once, baselines.parent, clusters[k], home / "train")
        sets[name] = {"cluster": str(clusters[k]), "adapters": str(home), "trial_methods": trial_methods,
                      "baselines": str(baselines) if baselines else None}
    done = training.values()
    counts = {"adapter_sets": len(training), "adapter_sets_trained": sum(t["trained"] > 0 for t in done),
              "adapters_trained": sum(t["trained"] for t in done), "adapters_reused": sum(t["reused"] for t in done)}
    return {"sets": sets, "training": {**counts, "sets": training},
            "embed": {"dir": str(embed_dir), "reused": embed.reused},
            "clusters": {str(k): str(d) for k, d in clusters.items()}}


def collect(grid, sets: dict, metric: str, split: str | None) -> dict:
    """Rows (one per finished point, sorted), the best row, failed trials and ASHA's early stops."""
    found, failed, stopped = {}, [], 0
    for result in grid:
        if result.error or not result.metrics:
            failed.append({"config": result.config, "error": str(result.error)})
        elif not result.metrics.get("final"):
            stopped += 1  # ASHA stopped it on a low-fidelity rung
        else:  # Optuna may sample a point twice: one row each
            row = _row(result.config, result.metrics, sets, metric, split)
            found[(row["k"], row["sparsity"], row["cp_rank"])] = row
    if not found:
        raise RuntimeError(f"sweep: no trial finished; first failure: {failed[0] if failed else 'none'}")
    rows = [found[p] for p in sorted(found)]
    best = max(rows, key=lambda r: r["objective"])  # max keeps the first of equal scores: stable across reruns
    return {"rows": rows, "best": best, "failed": failed, "stopped_early": stopped}


def _row(point: dict, metrics: dict, sets: dict, metric: str, split: str | None) -> dict:
    """One table row: the point, its objective and every other score (baselines from the (k, s) run)."""
    k, s, r = int(point["k"]), float(point["sparsity"]), int(point["cp_rank"])
    entry = sets[f"k{k}-s{s:g}"]
    evals = dict(artifacts.read_manifest(Path(entry["baselines"]))["eval"]) if entry["baselines"] else {}
    evals.update(artifacts.read_manifest(Path(metrics["dir"]))["eval"])
    return {"k": k, "sparsity": s, "cp_rank": r, "objective": metrics["objective"],
            "test": round(score(evals, metric, split), 4),
            "scores": {m: round(score(evals, m, split), 4) for m in evals}, "dir": metrics["dir"]}


def write_outputs(results: dict, cfg: Config, sweep_dir: Path) -> None:
    """The sweep's files (:func:`tclora.report.write_sweep_outputs`) with the user's config at the best point."""
    best = results["best"]
    report.write_sweep_outputs(results, point_config(cfg, best["k"], best["sparsity"], best["cp_rank"]), sweep_dir)


def sweep_from_args(args: argparse.Namespace) -> dict:
    """:func:`sweep` with the arguments of :func:`pipelines.session.add_sweep_args`."""
    return sweep(session.config_from_args(args), args.k, args.cp_rank, args.sparsity, search=args.search,
                 num_samples=args.num_samples, metric=args.metric, split=args.split,
                 max_concurrent=args.max_concurrent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ray Tune over cluster count k, CP rank R and LoRI sparsity s")
    session.add_config_args(parser)
    session.add_sweep_args(parser)
    args = parser.parse_args(argv)
    session.setup_logging()
    try:
        sweep_from_args(args)
    except ConfigError as err:
        print(f"tclora: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
