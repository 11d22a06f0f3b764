"""Driver set-up for clusters, without a cluster: which Ray a run uses, the runtime env it adds inside and
outside a submitted job, and ``tclora run --dry-run`` (the plan, no Ray)."""

from __future__ import annotations

import json

from pipelines import session
from pipelines.plan import merged_ranks
from tclora.config import validate


def test_a_local_run_starts_its_own_ray_unless_told_otherwise():
    cfg = validate({})
    assert session.ray_address(cfg, {}) == "local"  # never a stray head's address file
    assert session.ray_address(cfg, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
    told = validate({"run": {"ray_address": "ray://head:10001"}})
    assert session.ray_address(told, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "ray://head:10001"


def test_init_ray_says_which_ray_it_uses(monkeypatch, caplog):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with caplog.at_level("INFO", logger="tclora"):
        session.init_ray(validate({}))
        session.init_ray(validate({"run": {"ray_address": "10.0.0.1:6379"}}))
    assert [c["address"] for c in calls] == ["local", "10.0.0.1:6379"]
    local, cluster = (c["runtime_env"]["env_vars"] for c in calls)
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in cluster
    assert "starting a local instance" in caplog.text
    assert "connecting to the cluster at 10.0.0.1:6379 (run.ray_address)" in caplog.text


def test_outside_a_job_the_driver_sets_its_defaults_and_forwards_hf_settings():
    env = session.driver_runtime_env({"HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1", "UNRELATED": "x"})
    assert env == {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
                                "HF_HOME": "/cache/hf", "HF_HUB_OFFLINE": "1"}}
    told = session.driver_runtime_env({"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"})  # the user's value wins
    assert told["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1"
    # A local instance is one machine: Ray Train's preemption watcher (default on) is left out, unless asked for.
    assert session.driver_runtime_env({}, local=True)["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    asked = session.driver_runtime_env({"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}, local=True)
    assert asked["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_inside_a_job_the_driver_never_sets_what_the_jobs_runtime_env_sets():
    # What Ray's job manager hands a submitted driver (cluster_configs/runtime_env.yaml's env_vars).
    job = {"runtime_env": {"env_vars": {"HF_HOME": "/home/ray/.cache/huggingface", "TOKENIZERS_PARALLELISM": "false",
                                        "HF_HUB_OFFLINE": "0"}, "working_dir": "gcs://_ray_pkg_x.zip"}}
    environ = {session.JOB_CONFIG_ENV: json.dumps(job), "HF_HOME": "/home/ray/.cache/huggingface",
               "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}
    env = session.driver_runtime_env(environ)
    # only what the job left out
    assert env == {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "TRANSFORMERS_OFFLINE": "1"}}
    assert not set(env["env_vars"]) & set(job["runtime_env"]["env_vars"])
    everything = {session.JOB_CONFIG_ENV: json.dumps(job), "TRANSFORMERS_OFFLINE": "1", "HF_TOKEN_PATH": "/t",
                  **{k: "v" for k in job["runtime_env"]["env_vars"]}}
    job["runtime_env"]["env_vars"].update(TRANSFORMERS_OFFLINE="1", HF_TOKEN_PATH="/t",
                                          RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="2")
    assert session.driver_runtime_env({**everything, session.JOB_CONFIG_ENV: json.dumps(job)}) is None


def test_merged_ranks_are_what_each_method_produces():
    cfg = validate({"lori": {"rank": 8}, "merge": {"methods": ["cp", "cat", "ties"], "cp_rank": 4}})
    ranks = merged_ranks(cfg, k=3)
    assert ranks["cp"]["rank"] == 4 and ranks["cp"]["vllm_rank"] == 8  # R, padded to vLLM's next rank
    assert ranks["cat"]["rank"] == 24 and ranks["cat"]["vllm_rank"] == 32  # concatenation: k * r
    assert ranks["ties"]["format"] == "merged_model"
    big = merged_ranks(validate({"lori": {"rank": 8}, "merge": {"methods": ["cat"]}}), k=80)["cat"]
    assert big["rank"] == big["vllm_rank"] == 640 and "--max-lora-rank 640" in big["note"]


def test_dry_run_prints_the_plan_and_starts_no_ray(tmp_path, capsys, monkeypatch):
    import ray

    from pipelines.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("--dry-run called ray.init")

    # Patched rather than ray.is_initialized() checked: the suite's shared Ray may already be up.
    monkeypatch.setattr(ray, "init", no_ray)
    run_dir = tmp_path / "run"
    assert main(["run", "--dry-run", "--set", f"run.dir={run_dir}", "--set", "cluster.k=3",
                 "--set", "merge.methods=[cp,cat]"]) == 0
    out = capsys.readouterr().out
    assert "k=3" in out and "a local instance" in out and "no Ray" in out
    assert "cat" in out and "24" in out  # 3 adapters of rank 8 concatenated
    assert not (run_dir / "embed").exists()
