"""MLflow tracking (``run.mlflow_tracking_uri``) against a real local MLflow store (sqlite).

The train stage's Tune callback is exercised in tests/test_pipeline_train.py (the fused run logs there);
here: the merge/eval scores, the store's layout, and a clear error without MLflow installed.
"""

from __future__ import annotations

import sys

import pytest

from pipelines import tracking
from tclora.config import ConfigError, load_config

METRICS = {  # the shape of a run's metrics.json, trimmed
    "eval": {"base": {"splits": {"test": 0.0, "ood_test": 0.05}},
             "adapters": {"splits": {"test": 0.54}},
             "tsvm": {"splits": {"test": 0.138, "ood_test": 0.017}},
             "routed-arrow": {"splits": {"test": 0.113}}},
    "merge": {"tsvm": {"validation_score": 0.15, "params": {"scale": 1.0}},
              "cp": {"validation_score": 0.05, "params": {"rank": 4, "scale": 2.0}}},
    "recommended": {"method": "tsvm", "params": {"fraction": None, "scale": 1.0}, "validation_score": 0.15},
}


def tracked_config(tmp_path, **run):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"run.mlflow_tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                              *(f"run.{k}={v}" for k, v in run.items())])


def test_merge_eval_scores_are_logged_to_a_local_store(tmp_path):
    import mlflow  # the dev extra installs it: CI runs this test, never skips it
    cfg = tracked_config(tmp_path, mlflow_experiment="demo-runs")
    run_id = tracking.log_merge_eval(cfg, METRICS)

    client = mlflow.MlflowClient(tracking_uri=cfg.run.mlflow_tracking_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "merge_eval" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "demo-runs"
    assert run.data.metrics == {"base/test": 0.0, "base/ood_test": 0.05, "adapters/test": 0.54, "tsvm/test": 0.138,
                                "tsvm/ood_test": 0.017, "routed-arrow/test": 0.113, "tsvm/validation": 0.15,
                                "cp/validation": 0.05}
    assert run.data.params["recommended"] == "tsvm"
    assert run.data.tags["tclora.run_dir"] == cfg.run.dir
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]
    assert (tmp_path / "mlflow-artifacts").is_dir()  # beside the database, not in the working directory
    # A second run of the same experiment adds a run; it never fails on the existing experiment.
    assert tracking.log_merge_eval(cfg, METRICS) != run_id


def test_tracking_off_logs_nothing_and_needs_no_mlflow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    assert tracking.log_merge_eval(cfg, METRICS) is None and tracking.tune_callbacks(cfg, "train") == []
    tracking.check(cfg)


def test_tracking_without_mlflow_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"MLflow is not installed: pip install 'tclora\[mlflow\]'"):
        tracking.check(tracked_config(tmp_path))
