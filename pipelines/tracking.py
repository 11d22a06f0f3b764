"""Experiment tracking in MLflow: on when ``run.mlflow_tracking_uri`` is set (``pip install 'tclora[mlflow]'``).

- **Training** goes through Ray Tune's own integration, ``MLflowLoggerCallback`` on the train stage's
  Tuner (:func:`tune_callbacks`): one MLflow run per Train run (one cluster, or a packed group), each
  Train report logged as it arrives: ``loss`` (the group's mean), ``loss/cluster-<id>`` per adapter,
  ``step``, ``clusters_done``, ``resumes``. The callback runs on the driver, so a local store is fine on
  one machine; on a cluster use a tracking server (Ray's advice for its MLflow callback).
- **Merging and evaluation**: when the run's metrics exist, :func:`log_merge_eval` adds one MLflow run,
  ``merge_eval``: every row of the comparison (base, oracle adapters, routed-arrow, each merge) scored on
  each split as ``<row>/<split>``, each method's validation score as ``<method>/validation``, the
  recommended method and its settings as parameters, and ``metrics.json`` as an artifact.

Stores: ``sqlite:////abs/path/mlflow.db`` (MLflow's local store since its file store went into maintenance
in 3.10; artifacts then go to ``mlflow-artifacts/`` beside the database, not the working directory) or
``http(s)://`` a tracking server, which places artifacts itself.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from tclora.config import Config, ConfigError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'tclora[mlflow]'"


def _mlflow():
    try:
        import mlflow
    except ImportError as err:
        raise ConfigError(f"run.mlflow_tracking_uri is set but MLflow is not installed: {INSTALL_HINT}") from err
    return mlflow


def check(cfg: Config) -> None:
    """Fail before any Ray work when tracking is asked for and MLflow is missing (ConfigError)."""
    if cfg.run.mlflow_tracking_uri:
        _mlflow()


def experiment_id(client, cfg: Config) -> str:
    """The id of ``run.mlflow_experiment`` in ``client``'s store, created if missing (artifacts beside a
    sqlite database)."""
    experiment = client.get_experiment_by_name(cfg.run.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    uri, artifacts = cfg.run.mlflow_tracking_uri, None  # a tracking server places artifacts itself
    if uri.startswith("sqlite:///"):  # sqlite:///rel/path.db or sqlite:////abs/path.db
        artifacts = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlflow-artifacts").as_uri()
    return client.create_experiment(cfg.run.mlflow_experiment, artifact_location=artifacts)


def tune_callbacks(cfg: Config, stage: str) -> list:
    """``[MLflowLoggerCallback]`` for a Tuner's ``RunConfig(callbacks=...)``, or ``[]`` when tracking is off."""
    if not cfg.run.mlflow_tracking_uri:
        return []
    # Created here, so its artifact location is ours and not the callback's default.
    experiment_id(_mlflow().MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri), cfg)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=cfg.run.mlflow_tracking_uri, experiment_name=cfg.run.mlflow_experiment,
                                 tags={"tclora.stage": stage, "tclora.run_dir": cfg.run.dir})]


def merge_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``{"<row>/<split>": score, "<method>/validation": score}`` from a run's ``metrics.json`` dict."""
    out: dict[str, float] = {}
    for row, result in metrics.get("eval", {}).items():
        for split, score in (result.get("splits") or {}).items():
            out[f"{row}/{split}"] = float(score)
    for method, merge in metrics.get("merge", {}).items():
        if merge.get("validation_score") is not None:
            out[f"{method}/validation"] = float(merge["validation_score"])
    return out


def log_merge_eval(cfg: Config, metrics: Mapping[str, Any]) -> str | None:
    """Log the run's merge comparison as MLflow run ``merge_eval`` (see the module doc); returns its run id,
    or None when tracking is off."""
    if not cfg.run.mlflow_tracking_uri:
        return None
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri)
    run = client.create_run(experiment_id(client, cfg), run_name="merge_eval",
                            tags={"tclora.stage": "merge_eval", "tclora.run_dir": cfg.run.dir})
    now = int(time.time() * 1000)
    best = metrics.get("recommended") or {}
    params = {"recommended": best.get("method", ""), "recommended_params": json.dumps(best.get("params", {}))}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in merge_eval_metrics(metrics).items()],
                     params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_dict(run.info.run_id, dict(metrics), "metrics.json")
    client.set_terminated(run.info.run_id)
    log.info("MLflow: merge/eval scores logged to %s (experiment %r, run %s)", cfg.run.mlflow_tracking_uri,
             cfg.run.mlflow_experiment, run.info.run_id)
    return run.info.run_id
