"""Session set-up shared by every entry point: config from ``--config/--set``, preflight, Ray, demo inputs.

Every way in (``tclora run``, ``tclora sweep``, ``python -m pipelines.<stage>``) goes through
:func:`start`, so each one checks the config the same way before Ray starts, connects to the same
cluster and runs on the same materialised demo corpus and base model:

    preflight        model-dependent checks (``lori.target_modules``), then the lm-eval task names
    store.fetch      finished stages pulled back from an object-store run.dir (a driver on a fresh node)
    prepare_inputs   ``data.path: demo`` / ``model.name_or_path: demo`` built and pointed at
    init_ray         ``run.ray_address`` / ``RAY_ADDRESS``, or a local instance

Every stage then runs through :func:`run_stage` (timing, the reused flag, the shared-storage mirror).
A stage run alone (:func:`stage_main`) takes the stages before it as finished for this config and
says which one to run first when they are not.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from tclora import artifacts, storage
from tclora.artifacts import StageResult
from tclora.config import Config, ConfigError, load_config

log = logging.getLogger("tclora")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
STAGES = ("embed", "cluster", "train", "merge_eval")  # the order a run goes through them


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``--config`` / ``--set`` pair every command and stage entry point takes."""
    parser.add_argument("--config", "-c", help="YAML config (default: built-in defaults, i.e. the demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set cluster.k=4 --set merge.methods=[cp,ties]")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """``tclora run``'s own arguments: ``--until <stage>``, ``--dry-run``."""
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1],
                        help="stop after this stage, e.g. cluster: inspect the clusters before paying for training")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (store, Ray, rows, k, adapters to train and reuse, merged ranks per "
                        "method, stages a rerun skips) and exit: no Ray, no training")


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by :func:`add_config_args`' arguments.

    Raises:
        ConfigError: the file is missing or a value is invalid (the message names the field).
    """
    return load_config(args.config, args.overrides)


def csv_arg(kind):
    """argparse type for comma-separated values: ``2,4,8``."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """``tclora sweep``'s own arguments (beside :func:`add_config_args`); read by ``pipelines.sweep``."""
    p.add_argument("--k", type=csv_arg(int), help="cluster counts, e.g. 2,4,8 (default: cluster.k)")
    p.add_argument("--cp-rank", type=csv_arg(int), help="CP ranks, e.g. 2,4,8 (default: merge.cp_rank)")
    p.add_argument("--sparsity", type=csv_arg(float), help="LoRI sparsities, e.g. 0.8,0.9 (default: lori.sparsity)")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid",
                   help="grid (default) or Optuna TPE with ASHA over eval size (needs: pip install optuna)")
    p.add_argument("--num-samples", type=int, help="Optuna trials (default: half the grid); grid ignores it")
    p.add_argument("--metric", default="cp", help="objective: eval.<metric>.mean, a merge method (default cp)")
    p.add_argument("--split", help="eval split (file stem) the objective reads (default: the first eval path)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: train.max_concurrent or resources)")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def preflight(cfg: Config) -> None:
    """Checks that need the model, run before Ray starts: a bad value fails in seconds, not after embedding.

    Raises:
        ConfigError: ``lori.target_modules`` names modules the model does not have (the message lists
            the missing names and the linear modules the model does have), ``eval.lm_eval_tasks``
            names a task lm-eval does not know, or ``run.mlflow_tracking_uri`` is set without MLflow.
    """
    from pipelines import tracking

    tracking.check(cfg)
    from tclora.lori import check_target_modules
    from tclora.models import module_skeleton

    try:
        skeleton = module_skeleton(cfg.model)
    except OSError as err:
        # The driver may not see the checkpoint the workers load (offline head node): the train stage
        # runs the same check on the real model, so warn rather than refuse to start.
        log.warning("preflight: cannot read the config of model.name_or_path=%r here (%s); "
                    "lori.target_modules will be checked when training starts", cfg.model.name_or_path, err)
    else:
        try:
            check_target_modules(skeleton, cfg.lori.target_modules)
        except ValueError as err:
            raise ConfigError(f"{err} (model.name_or_path={cfg.model.name_or_path!r})") from None
    if cfg.eval.lm_eval_tasks:
        from tclora.harness import check_tasks

        check_tasks(cfg.eval)  # a misspelt benchmark fails now, not after training


# Set for every Ray process unless the job's runtime env (or this environment) already says otherwise.
WORKER_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",  # tokenizer thread pools deadlock after fork()
    # Ray Train's controller takes a worker's ray.train.report() off its one-slot queue when it polls, every
    # 2 s by default, so each checkpoint report blocked training ~1.9 s (measured: 11 of a worker's 18 s
    # in the packed-run test). Polling a few workers 4x a second costs the controller next to nothing.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}
# And on a local instance only (one machine: no node can be preempted under a live driver), without Ray
# Train's preemption watcher, an actor per Train run that polls the nodes' drain state (3.3 s of a core each
# to start, measured with a tiny run); a cluster keeps it, for train.max_preemption_failures.
LOCAL_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
WORKER_ENV_FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN_PATH",
                        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a submitted job's driver


def job_env_vars(environ: dict | None = None) -> dict | None:
    """The ``env_vars`` of the runtime env of the Ray job this driver runs in (``ray job submit``), or None
    when it is not a submitted job. Ray passes the job's config to its driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR``."""
    environ = os.environ if environ is None else environ
    if JOB_CONFIG_ENV not in environ:
        return None
    runtime_env = (json.loads(environ[JOB_CONFIG_ENV]) or {}).get("runtime_env") or {}
    return dict(runtime_env.get("env_vars") or {})


def driver_runtime_env(environ: dict | None = None, local: bool = False) -> dict | None:
    """The runtime env this driver adds: only the variables the job's runtime env does not set.

    Ray refuses a driver runtime env that sets a variable the submitted job's runtime env also sets
    ("Failed to merge the Job's runtime env"), so inside a job the job's values win and ours are only
    defaults for what it left out. Values come from :data:`WORKER_ENV_DEFAULTS` (and
    :data:`LOCAL_ENV_DEFAULTS` when ``local``: the driver starts its own instance), overridden by this
    process's environment for the :data:`WORKER_ENV_FORWARDED` names.
    """
    environ = os.environ if environ is None else environ
    env = {**WORKER_ENV_DEFAULTS, **(LOCAL_ENV_DEFAULTS if local else {})}
    env.update({name: environ[name] for name in WORKER_ENV_FORWARDED if name in environ})
    job = job_env_vars(environ)
    if job is not None:
        env = {k: v for k, v in env.items() if k not in job}
    return {"env_vars": env} if env else None


def ray_address(cfg: Config, environ: dict | None = None) -> str:
    """``run.ray_address``, else ``RAY_ADDRESS``, else ``"local"``: a fresh local instance, never a head some
    earlier ``ray start`` left behind (Ray's default ``ray.init()`` would attach to that one)."""
    environ = os.environ if environ is None else environ
    return cfg.run.ray_address or environ.get("RAY_ADDRESS") or "local"


def init_ray(cfg: Config) -> None:
    """Connect to ``run.ray_address`` (or ``RAY_ADDRESS``), else start a local instance; a no-op when connected.

    Logs which it did. Inside a submitted job the job's runtime env is kept and only completed
    (:func:`driver_runtime_env`).
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_address(cfg)
    runtime_env = driver_runtime_env(local=address == "local")
    if address != "local":
        log.info("Ray: connecting to the cluster at %s (%s)", address,
                 "run.ray_address" if cfg.run.ray_address else "RAY_ADDRESS")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # A local instance: the dashboard (when installed) listens on localhost only. Logical CPUs are
        # oversubscribed 2x so a Tune trial, its Train workers and the Ray Data tasks feeding them can
        # all be scheduled on a small machine instead of waiting on each other forever.
        log.info("Ray: starting a local instance (set run.ray_address or RAY_ADDRESS to use a cluster)")
        ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=False)


def prepare_inputs(cfg: Config, run_dir: Path) -> Config:
    """Materialise the embedded demo (corpus and base model) and point the config at it.

    With an object-store ``run.dir`` the demo corpus is published there and the config points at its URIs,
    so the readers on other nodes never get a driver-local path.
    """
    updates: dict = {}
    if cfg.data.path == "demo":
        from tclora.demo_corpus import EVAL_SPLITS, build_demo_corpus

        store = storage.store_for(cfg, run_dir)
        splits = build_demo_corpus(run_dir / "corpus", train_per_task=cfg.data.demo_train_per_task,
                                   eval_per_task=cfg.data.demo_eval_per_task, seed=cfg.run.seed)
        # Published whole, manifest last: a rerun (same working copy, or a fresh one that store.fetch() filled)
        # uploads nothing, so the files keep their modification times and the embed stage's digest matches.
        store.publish(run_dir / "corpus")
        where = {name: store.uri_of(path) if store.remote else str(path) for name, path in splits.items()}
        data = cfg.data.model_copy(update={"path": where["train"]})
        if not cfg.data.eval_paths:
            data = data.model_copy(update={"eval_paths": [where[s] for s in EVAL_SPLITS]})
        if not cfg.data.validation_path and "validation" in where:  # selection only (merge.tune, sweep)
            data = data.model_copy(update={"validation_path": where["validation"]})
        updates["data"] = data
    if cfg.model.name_or_path == "demo":
        from tclora.demo_base import build_demo_base, demo_spec

        # Built here, once, before any worker starts: workers must not race to build the same cache.
        path = build_demo_base(cfg.model.cache_dir, demo_spec(cfg.model))
        updates["model"] = cfg.model.model_copy(update={"name_or_path": str(path)})
    return cfg.model_copy(update=updates) if updates else cfg


def start(cfg: Config) -> tuple[Config, Path]:
    """Preflight, finished stages restored, demo inputs built, Ray: ``(config to run, resolved run.dir)``.

    The demo inputs are built before Ray starts: the demo base's pre-training (minutes, two threads) ran
    25% slower per step beside a Ray instance starting up (125 vs 98 ms, measured on 2 cores). So a wrong
    ``run.ray_address`` is reported after a first-time base build, not before it.

    Raises:
        ConfigError: from :func:`preflight`, before Ray starts.
    """
    preflight(cfg)
    store = storage.open_run(cfg.run)
    store.check(cfg.run.storage_options)  # an unreachable bucket fails here, before Ray starts
    run_dir = store.local
    log.info("run.dir %s%s", store.uri, f" (working copy {run_dir})" if store.remote else "")
    store.fetch()  # a driver restarted on a fresh node: pull back finished stages
    cfg = prepare_inputs(cfg, run_dir)
    init_ray(cfg)
    return cfg, run_dir


TRIAL_CPUS = 0.1  # a Tune trial only drives its TorchTrainer or actor, which reserve the real CPUs


def trials_that_fit(per_trial: dict[str, float], resources: dict | None = None) -> int:
    """How many trials each needing ``per_trial`` (``{"CPU": 2.1, "GPU": 1}``; zeros ignored) fit at
    once in ``resources`` (default: the Ray cluster's), at least 1: the one concurrency calculation
    of the train stage and the sweep."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    fits = [math.floor(resources.get(name, 0) / need + 1e-9) for name, need in per_trial.items() if need > 0]
    return max(1, min(fits, default=1))


# ---- stages: the wrapper every driver uses, and a stage run on its own -------------------------------
class MissingStageError(FileNotFoundError):
    """A stage run alone needs an earlier stage that has not finished for this config."""


def require_finished(final: Path, key: dict | None, stage: str) -> Path:
    """``final`` if it is a finished ``stage`` (with this ``key``; None: any finished one).

    Raises:
        MissingStageError: naming the directory and the command that produces it.
    """
    done = artifacts.read_manifest(final) is not None if key is None else artifacts.is_complete(final, key)
    if not done:
        raise MissingStageError(f"{final}: no finished {stage} stage for this config; run "
                                f"`tclora run --until {stage}` (same --config/--set) first")
    return final


def run_stage(name: str, fn: Callable[[], StageResult], cfg: Config, run_dir: Path) -> tuple[Path, dict]:
    """Run one stage function; mirror its directory to shared storage. Returns the directory and its
    ``metrics.json`` entry: ``seconds`` (the stage's own, from its manifest), ``skipped`` (reused), ``wall_seconds``."""
    log.info("stage %s ...", name)
    t0 = time.time()
    result = fn()
    storage.store_for(cfg, run_dir).publish(result.dir)  # files, then the manifest (a no-op for a local run.dir)
    manifest = artifacts.read_manifest(result.dir) or {}
    wall = time.time() - t0
    log.info("stage %s %s (%.1fs)", name, "reused" if result.reused else "done", wall)
    return result.dir, {"seconds": manifest.get("seconds", wall), "skipped": result.reused,
                        "wall_seconds": round(wall, 2)}


def stage_main(stage: str, body: Callable[[Config, Path], StageResult], argv: list[str] | None = None) -> int:
    """``python -m pipelines.<stage> --config ... --set ...``: the session set-up, then ``body(cfg, run_dir)``.

    Prints the stage directory; exit status 2 (and the reason on stderr) for a bad config or a missing
    earlier stage.
    """
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{stage}",
                                     description=f"Run the {stage} stage alone (earlier stages must be finished).")
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg, run_dir = start(config_from_args(args))
        out, _ = run_stage(stage, lambda: body(cfg, run_dir), cfg, run_dir)
    except (ConfigError, MissingStageError) as err:
        print(f"tclora: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
