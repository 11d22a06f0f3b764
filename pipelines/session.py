"""Session set-up shared by every entry point: config from ``--config/--set``, preflight, Ray, demo inputs.

Every way in (``tclora run``, ``tclora sweep``, ``python -m pipelines.<stage>``) goes through
:func:`start`, so each one checks the config the same way before Ray starts, connects to the same
cluster and runs on the same materialised demo corpus and base model:

    preflight        model-dependent checks (``lori.target_modules``), then the lm-eval task names
    init_ray         ``run.ray_address`` / ``RAY_ADDRESS``, or a local instance
    restore_run      finished stages pulled back from ``run.storage_path`` (a driver on a fresh node)
    prepare_inputs   ``data.path: demo`` / ``model.name_or_path: demo`` built and pointed at
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pipelines import storage
from tclora.config import Config, ConfigError, load_config

log = logging.getLogger("tclora")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``--config`` / ``--set`` pair every command and stage entry point takes."""
    parser.add_argument("--config", "-c", help="YAML config (default: built-in defaults, i.e. the demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set cluster.k=4 --set merge.methods=[cp,ties]")


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config named by :func:`add_config_args`' arguments.

    Raises:
        ConfigError: the file is missing or a value is invalid (the message names the field).
    """
    return load_config(args.config, args.overrides)


def _csv(kind):
    """argparse type for comma-separated values: ``2,4,8``."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """``tclora sweep``'s own arguments (beside :func:`add_config_args`); read by ``pipelines.sweep``."""
    p.add_argument("--k", type=_csv(int), help="cluster counts, e.g. 2,4,8 (default: cluster.k)")
    p.add_argument("--cp-rank", type=_csv(int), help="CP ranks, e.g. 2,4,8 (default: merge.cp_rank)")
    p.add_argument("--sparsity", type=_csv(float), help="LoRI sparsities, e.g. 0.8,0.9 (default: lori.sparsity)")
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
            the missing names and the linear modules the model does have), or ``eval.lm_eval_tasks``
            names a task lm-eval does not know.
    """
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


def init_ray(cfg: Config) -> None:
    """Connect to ``run.ray_address`` (or ``RAY_ADDRESS``), else start a local instance; a no-op when connected."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"TOKENIZERS_PARALLELISM": "false"}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    runtime_env = {"env_vars": env}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        # A local instance: the dashboard (when installed) listens on localhost only. Logical CPUs are
        # oversubscribed 2x so a Tune trial, its Train workers and the Ray Data tasks feeding them can
        # all be scheduled on a small machine instead of waiting on each other forever.
        ray.init(num_cpus=2 * (os.cpu_count() or 1), dashboard_host="127.0.0.1", runtime_env=runtime_env,
                 log_to_driver=False)


def prepare_inputs(cfg: Config, run_dir: Path) -> Config:
    """Materialise the embedded demo (corpus and base model) and point the config at it."""
    updates: dict = {}
    if cfg.data.path == "demo":
        from tclora.demo_corpus import build_demo_corpus

        splits = build_demo_corpus(run_dir / "corpus", train_per_task=cfg.data.demo_train_per_task,
                                   eval_per_task=cfg.data.demo_eval_per_task, seed=cfg.run.seed)
        data = cfg.data.model_copy(update={"path": str(splits["train"])})
        if not cfg.data.eval_paths:
            data = data.model_copy(update={"eval_paths": [str(splits["test"]), str(splits["compose_test"])]})
        updates["data"] = data
    if cfg.model.name_or_path == "demo":
        from tclora.demo_base import build_demo_base, demo_spec

        # Built here, once, before any worker starts: workers must not race to build the same cache.
        path = build_demo_base(cfg.model.cache_dir, demo_spec(cfg.model))
        updates["model"] = cfg.model.model_copy(update={"name_or_path": str(path)})
    return cfg.model_copy(update=updates) if updates else cfg


def start(cfg: Config) -> tuple[Config, Path]:
    """Preflight, Ray, finished stages restored, demo inputs built: ``(config to run, resolved run.dir)``.

    Raises:
        ConfigError: from :func:`preflight`, before Ray starts.
    """
    preflight(cfg)
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg)
    storage.restore_run(cfg, run_dir)  # a driver restarted on a fresh node: pull back finished stages
    return prepare_inputs(cfg, run_dir), run_dir
