"""lm-eval benchmarks (tclora.harness, compare.lm_eval_all): the real harness, offline, on a local task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tclora import compare, harness, report
from tclora.config import ConfigError, EvalSection, load_config
from tclora.merge.base import LowRank
from tclora.report import BASE

DATA = Path(__file__).parent / "data" / "lm_eval"
TASK = "tclora_tiny_choice"
N_QUESTIONS = sum(1 for line in (DATA / "tiny_choice.jsonl").read_text().splitlines() if line.strip())


@pytest.fixture
def task_file(tmp_path) -> Path:
    """tests/data/lm_eval/tiny_choice.yaml with its data file made absolute (datasets resolves against cwd)."""
    cfg = yaml.safe_load((DATA / "tiny_choice.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"]["test"] = str(DATA / cfg["dataset_kwargs"]["data_files"]["test"])
    path = tmp_path / "tiny_choice.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_base_and_merge_are_scored_on_a_local_task_offline(tiny_model_and_tokenizer, task_file):
    model, tok = tiny_model_and_tokenizer
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # conftest: `datasets` never tries the hub here
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    before = q_proj.detach().clone()
    g = torch.Generator().manual_seed(0)
    d_out, d_in = q_proj.shape
    merge = {"model.layers.0.self_attn.q_proj": LowRank(torch.randn(d_out, 4, generator=g),
                                                        torch.randn(4, d_in, generator=g))}
    cfg = EvalSection(lm_eval_tasks=[str(task_file)], batch_size=8)

    scores = compare.lm_eval_all(model, tok, {"cp": merge}, cfg)

    assert set(scores) == {BASE, "cp"}
    for name in scores:
        assert set(scores[name]) == {TASK}
        assert 0.0 <= scores[name][TASK]["acc"] <= 1.0
        assert scores[name][TASK]["n"] == N_QUESTIONS
    # The merge really ran with its delta in the weights, and the weights are back afterwards.
    assert scores["cp"][TASK]["brier_score"] != pytest.approx(scores[BASE][TASK]["brier_score"], abs=1e-6)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)

    table = report.lm_eval_table({"lm_eval": scores})
    assert TASK in table and "acc" in table and "brier_score" in table and "stderr" not in table


def test_limit_caps_the_examples(tiny_model_and_tokenizer, task_file):
    model, tok = tiny_model_and_tokenizer
    scores = harness.run_tasks(model, tok, EvalSection(lm_eval_tasks=[str(task_file)], lm_eval_limit=2))
    assert scores[TASK]["n"] == 2


def test_flatten_reports_groups_with_an_aggregate_instead_of_their_subtasks():
    results = {
        "results": {
            "bbh_zeroshot": {"alias": "bbh_zeroshot", "exact_match,flexible-extract": 0.3,
                             "exact_match_stderr,flexible-extract": 0.01},
            "bbh_zeroshot_a": {"alias": " - a", "exact_match,flexible-extract": 0.2},
            "bbh_zeroshot_b": {"alias": " - b", "exact_match,flexible-extract": 0.4},
            "no_aggregate": {"alias": "no_aggregate", " ": " "},
            "leaf": {"alias": "leaf", "acc,none": 1.0, "acc_stderr,none": "N/A", "sample_len": 3},
        },
        "group_subtasks": {"bbh_zeroshot": ["bbh_zeroshot_a", "bbh_zeroshot_b"], "no_aggregate": ["leaf"]},
        "n-samples": {"bbh_zeroshot_a": {"original": 9, "effective": 5},
                      "bbh_zeroshot_b": {"original": 9, "effective": 5},
                      "leaf": {"original": 3, "effective": 3}},
    }
    assert harness.flatten(results) == {
        "bbh_zeroshot": {"exact_match,flexible-extract": 0.3, "exact_match_stderr,flexible-extract": 0.01, "n": 10},
        "leaf": {"acc": 1.0, "n": 3},
    }


def test_check_tasks_names_the_key(tmp_path, task_file):
    from lm_eval.tasks import TaskManager

    unsafe = yaml.safe_load(task_file.read_text()) | {"task": "tiny_unsafe", "unsafe_code": True}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "unsafe.yaml").write_text(yaml.safe_dump(unsafe))
    cfg = EvalSection(lm_eval_include_path=[str(tmp_path / "tasks")])
    # Only the local directory is indexed: lm-eval's own ~16K task files would take seconds to index.
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)

    harness.check_tasks(cfg.model_copy(update={"lm_eval_tasks": [str(task_file)]}), manager)
    harness.check_tasks(cfg.model_copy(update={"lm_eval_tasks": ["tiny_unsafe"],
                                               "lm_eval_confirm_unsafe_code": True}), manager)
    bad = {
        "no such task file": {"lm_eval_tasks": [str(tmp_path / "nope.yaml")]},
        r"unknown lm-eval task\(s\) \['helaswag'\]": {"lm_eval_tasks": ["helaswag"]},
        "execute model-generated code": {"lm_eval_tasks": ["tiny_unsafe"]},
        r"eval\.lm_eval_include_path: no such directory": {"lm_eval_tasks": ["x"], "lm_eval_include_path": ["/no/dir"]},
    }
    for message, update in bad.items():
        with pytest.raises(ConfigError, match=message):
            harness.check_tasks(cfg.model_copy(update=update), manager)


def test_config_without_lm_eval_installed_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval\.lm_eval_tasks: .*pip install 'tclora\[eval\]'"):
        load_config(None, ["eval.lm_eval_tasks=[arc_easy]"])
    assert load_config(None).eval.lm_eval_tasks == []  # no tasks, no lm-eval needed
