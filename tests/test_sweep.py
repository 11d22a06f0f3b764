"""The sweep on a real local Ray: embed once, cluster per k, train per (k, s), Tune merge + eval per (k, s, R).

Smoke size: the demo corpus at 20 rows per task family, the tiny pre-trained base, 4 + 3 LoRI steps, two
merge methods. One sweep over k in {2, 3} x R in {1, 2} runs end to end; the rerun (through the CLI)
must train nothing and find the same best point; a rank-only sweep must train nothing new either.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipelines.cli import main as cli_main
from tclora import artifacts
from tclora.config import load_config, validate
from tests.helpers import demo_run_config

KS, RANKS, SPARSITY = [1, 2], [1, 2], 0.8  # k=1 keeps the suite short: 3 adapters in all


def ray_slow(test):
    """Marks an end-to-end sweep test (``pytest -m sweep`` runs only these). Each Ray stage start-up
    costs seconds on a quiet 2-core machine and minutes on a loaded one, so the timeout is a hang guard only."""
    for mark in (pytest.mark.sweep, pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)):
        test = mark(test)
    return test


def sweep_raw(run_dir: Path, base: Path) -> dict:
    # k=2's adapters in one fused Train run: one worker start-up instead of two (the suite's slowest fixture).
    # Tracked in a local MLflow store beside the run (the sweep's Tuner and the train stage's both log there).
    return demo_run_config(run_dir, base, lori={"sparsity": SPARSITY}, train={"clusters_per_run": 2},
                           run={"mlflow_tracking_uri": f"sqlite:///{run_dir.parent}/mlflow.db"})


def _mtimes(paths) -> dict[str, float]:
    return {str(p): (Path(p) / artifacts.MANIFEST).stat().st_mtime for p in paths}


@pytest.fixture(scope="module")
def first(ray_session, tiny_base, tmp_path_factory):
    from pipelines.sweep import sweep

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    raw = sweep_raw(run_dir, tiny_base)
    results = sweep(validate(raw), KS, RANKS, [SPARSITY])
    return run_dir, raw, results


@ray_slow
def test_sweep_embeds_once_and_trains_one_adapter_set_per_k(first):
    run_dir, _, results = first
    training = results["training"]
    assert sorted(training["sets"]) == ["k1-s0.8", "k2-s0.8"]  # one set per (k, s), shared by both R
    assert training["adapters_trained"] == 1 + 2 and training["adapters_reused"] == 0
    assert {s["trained"] for s in training["sets"].values()} == {1, 2}
    sweep_dir = run_dir / "sweep"
    assert sorted(p.name.split("-")[0] for p in (sweep_dir / "adapters").iterdir()) == ["k1", "k2"]
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("embed")] == ["embed"]
    assert not results["embed"]["reused"]
    assert sorted(p.name.split("-")[0] for p in (run_dir / "cluster").iterdir()) == ["k1", "k2"]
    assert len(list((sweep_dir / "baselines").iterdir())) == 2  # linear, base, oracle, arrow: once per (k, s)
    assert len(list((sweep_dir / "trials").iterdir())) == 4  # cp: once per (k, s, R)
    assert not results["failed"]


@ray_slow
def test_trials_run_in_reused_processes(first):
    """Tune's reuse_actors: a finished trial's process takes the next trial (4 trials, 2 at a time), so a
    sweep starts fewer processes than it has points; each reports its pid in Tune's result.json."""
    _, _, results = first
    assert results["tune"]["max_concurrent"] == 2
    reports = [json.loads(line) for path in Path(results["tune"]["path"]).glob("*/result.json")
               for line in path.read_text().splitlines() if line.strip()]
    assert len(reports) == 4  # one (final) report per grid point
    assert 1 <= len({r["pid"] for r in reports}) < 4


def test_in_process_merge_eval_reuses_the_base_it_loaded(tiny_base, tmp_path):
    """What a reused trial process saves besides the imports: its base is loaded once per model section."""
    from pipelines.merge_eval import MergeEval

    raw = demo_run_config(tmp_path / "run", tiny_base)
    first = MergeEval(raw, reuse_base=True)
    assert MergeEval(raw, reuse_base=True).model is first.model
    assert MergeEval(raw, reuse_base=False).model is not first.model  # tclora run's actor loads its own
    other = demo_run_config(tmp_path / "run", tiny_base, model={"dtype": "bfloat16"})
    changed = MergeEval(other, reuse_base=True).model
    assert changed is not first.model and changed.dtype == torch.bfloat16
    assert MergeEval(raw, reuse_base=True).model is not changed  # one base per process: the last one kept


@ray_slow
def test_sweep_results_cover_the_grid_with_baselines(first):
    _, _, results = first
    rows = results["rows"]
    assert [(r["k"], r["cp_rank"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r in rows:
        assert set(r["scores"]) == {"base", "adapters", "routed-arrow", "cp", "linear"}
        manifest = artifacts.read_manifest(Path(r["dir"]))
        assert r["objective"] == pytest.approx(manifest["validation"]["cp"]["mean"], abs=1e-4)  # selected on validation
        assert r["test"] == pytest.approx(r["scores"]["cp"], abs=1e-4)  # reported on the headline test split
        assert 0 <= r["objective"] <= 1
    # The rank-independent baselines come from one evaluation per (k, s): equal across R.
    by_k = {}
    for r in rows:
        by_k.setdefault(r["k"], set()).add(r["scores"]["linear"])
    assert all(len(v) == 1 for v in by_k.values())
    assert results["best"]["objective"] == max(r["objective"] for r in rows)


@ray_slow
def test_sweep_trials_are_logged_to_mlflow(first):
    """Ray Tune's MLflowLoggerCallback on the sweep's Tuner: one finished MLflow run per grid point, its
    (k, s, R) as params and the objective it reported (validation) as a metric."""
    import mlflow

    _, raw, results = first
    client = mlflow.MlflowClient(tracking_uri=raw["run"]["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(validate(raw).run.mlflow_experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`tclora.stage` = 'sweep'")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    logged = {(int(r.data.params["k"]), int(r.data.params["cp_rank"])): r.data.metrics["objective"] for r in runs}
    assert logged == pytest.approx({(r["k"], r["cp_rank"]): r["objective"] for r in results["rows"]})


@ray_slow
def test_sweep_writes_json_plots_and_a_loadable_best_config(first):
    run_dir, _, results = first
    sweep_dir = run_dir / "sweep"
    on_disk = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert on_disk["best"] == json.loads(json.dumps(results["best"]))
    for plot in ("score_vs_k.png", "score_vs_rank.png"):
        assert (sweep_dir / plot).read_bytes()[:4] == b"\x89PNG"
    best = load_config(sweep_dir / "best_config.yaml")
    assert (best.cluster.k, best.merge.cp_rank, best.lori.sparsity) == (
        results["best"]["k"], results["best"]["cp_rank"], results["best"]["sparsity"])
    assert best.data.path == "demo"  # the user's config at the best point, not the materialised paths


@ray_slow
def test_rerun_trains_nothing_and_finds_the_same_best(first, tmp_path):
    run_dir, raw, results = first
    sweep_dir = run_dir / "sweep"
    stage_dirs = [run_dir / "embed", *(sweep_dir / "adapters").glob("*/train"),
                  *(sweep_dir / "trials").glob("*/merge_eval")]
    before = _mtimes(stage_dirs)
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    # Resubmitted with other training placement (CPUs per worker, checkpoint cadence, failure budget): the same
    # Tune experiment, restored, and nothing recomputed. (Not train.max_concurrent: it caps the trials at once.)
    assert cli_main(["sweep", "--config", str(config), "--k", "1,2", "--cp-rank", "1,2", "--sparsity", "0.8",
                     "--set", "train.cpus_per_worker=2", "--set", "train.checkpoint_every=9",
                     "--set", "train.max_failures=0"]) == 0
    again = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert again["training"]["adapters_trained"] == 0 and again["training"]["adapters_reused"] == 3
    assert again["embed"]["reused"] and again["tune"]["restored"]
    assert again["tune"]["name"] == results["tune"]["name"]
    assert again["best"] == json.loads(json.dumps(results["best"]))
    assert _mtimes(stage_dirs) == before


@ray_slow
def test_rank_only_sweep_trains_nothing_and_reuses_finished_trials(first):
    from pipelines.sweep import sweep

    run_dir, raw, _ = first
    results = sweep(validate(raw), [2], [2, 3], [SPARSITY])
    training = results["training"]
    assert (training["adapter_sets"], training["adapters_trained"], training["adapters_reused"]) == (1, 0, 2)
    assert not results["tune"]["restored"]  # another space is another experiment; its stages are reused
    assert [r["cp_rank"] for r in results["rows"]] == [2, 3]
    assert len(list((run_dir / "sweep" / "trials").iterdir())) == 5  # only R=3 is new


def test_max_concurrent_trials_fits_the_eval_actors():
    from pipelines.sweep import max_concurrent_trials

    cfg = validate({"train": {"max_concurrent": 2}})
    assert max_concurrent_trials(cfg, 9, resources={"CPU": 4}) == 2
    assert max_concurrent_trials(cfg, 9, cap=3, resources={"CPU": 4}) == 3
    assert max_concurrent_trials(cfg, 9, resources={"CPU": 1}) == 1
    assert max_concurrent_trials(validate({}), 9, resources={"CPU": 16}) == 9
    gpu = validate({"eval": {"num_gpus": 1}})
    assert max_concurrent_trials(gpu, 9, resources={"CPU": 16, "GPU": 2}) == 2


def test_a_trial_holds_the_eval_resources_it_merges_with():
    """A trial merges and evaluates in its own process (no merge/eval actor of its own), so its one bundle
    must hold what eval asks for: CPUs, GPUs and custom resources, plus the trial's sliver."""
    from pipelines.session import TRIAL_CPUS
    from pipelines.sweep import trial_resources

    cfg = validate({"eval": {"num_cpus": 2, "num_gpus": 1, "resources": {"eval_node": 1}}})
    assert trial_resources(cfg).bundles == [{"CPU": TRIAL_CPUS + 2, "GPU": 1, "eval_node": 1}]
    assert trial_resources(validate({})).bundles == [{"CPU": TRIAL_CPUS + 1}]


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_without_the_package_is_a_clear_error(capsys, tmp_path):
    assert cli_main(["sweep", "--search", "optuna", "--set", f"run.dir={tmp_path}"]) == 2
    assert "pip install" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work
