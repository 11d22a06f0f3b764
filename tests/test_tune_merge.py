"""Choosing merge settings on validation: the argmax is picked, and no test record is read to pick it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tclora import compare, tune_merge
from tclora.config import EvalSection, MergeSection
from tclora.merge import LowRank, dense


def _adapters(T=2, value=0.5):
    # One 1x1 module "q": the merged weight is λ·Σ_t w_t·value, a number the spies below can read.
    return {c: {"q": LowRank(torch.tensor([[value]]), torch.tensor([[1.0]]))} for c in range(T)}


def test_tune_method_picks_the_validation_argmax_over_the_lambda_grid():
    factors = list(_adapters(T=3).values())  # Σ_t ΔW_t = 1.5
    seen = []

    def score(deltas):  # separable: λ·1.5 best at 0.75 (λ = 0.5), density best at 0.5
        w = float(dense(deltas["q"]))
        seen.append(w)
        return -abs(w - 0.75)

    result = tune_merge.tune_method(factors, "linear", {}, score)
    assert result.params == {"scale": 0.5}
    assert result.score == max(t["score"] for t in result.trials) == 0.0
    assert result.trials[0]["params"] == {"scale": pytest.approx(1 / 3)}  # the default (the mean) is tried first
    # The λ grid is the documented one plus 1/T; each setting is scored once.
    assert sorted({t["params"]["scale"] for t in result.trials}) == sorted({1 / 3, *tune_merge.SCALES})
    assert len(seen) == len(result.trials) == len({tuple(sorted(t["params"].items())) for t in result.trials})


def test_tune_method_varies_each_knob_and_keeps_the_default_on_ties():
    factors = list(_adapters(T=2).values())
    chosen = tune_merge.tune_method(factors, "ties", {}, lambda d: 0.0)  # a flat score
    assert chosen.params == {"density": 0.2, "scale": 1.0}  # the signature's defaults stay
    densities = {t["params"]["density"] for t in chosen.trials}
    assert densities == {0.2, *tune_merge.KNOBS["ties"]["density"]}
    grid = {"scale": [0.3, 3.0], "density": [1.0]}
    peaked = tune_merge.tune_method(factors, "ties", {}, lambda d: -abs(float(dense(d["q"])) - 3.0), grid=grid)
    assert peaked.params == {"density": 1.0, "scale": 3.0}  # ties of 2 x 0.5 at density 1: disjoint mean 0.5
    with pytest.raises(ValueError, match="densty"):
        tune_merge.grid_for("ties", 2, {"densty": [0.1]})


def test_tune_method_finds_the_argmax_a_coordinate_search_misses(monkeypatch):
    """A knob that changes what λ means (as CP's combine rule does: mean = sum / T): the best λ at the
    default knob (λ = 2, score 0.6) is a local optimum no single-coordinate move leaves (every other
    density at λ = 2 scores 0), while density 1.0 at λ = 0.1 scores 1. The search tries every pair."""
    update = {0.2: 1.0, 0.1: 0.1, 0.5: 10.0, 1.0: 4.0}  # density -> merged update at λ = 1 (stands in for TIES)
    merged_at = []

    def fake_merge(factors, method, weights, params):
        merged_at.append(params["density"])
        return {"q": LowRank(torch.tensor([[update[params["density"]]]]), torch.tensor([[1.0]]))}

    monkeypatch.setattr(tune_merge, "merge_adapters", fake_merge)
    peaks = {2.0: 0.6, 0.4: 1.0}  # merged weight -> score

    def score(deltas):
        w = float(dense(deltas["q"]))
        return next((v for k, v in peaks.items() if abs(w - k) < 1e-6), 0.0)  # float32 weights

    result = tune_merge.tune_method(list(_adapters(T=2).values()), "ties", {}, score)
    assert result.params == {"density": 1.0, "scale": 0.1} and result.score == 1.0
    assert result.score == max(t["score"] for t in result.trials)
    scales = {1 / 2, *tune_merge.SCALES}
    tried = {(t["params"]["density"], t["params"]["scale"]) for t in result.trials}
    assert tried == {(d, s) for d in update for s in scales}  # the whole grid, each pair scored once
    assert len(result.trials) == len(tried)
    assert sorted(merged_at) == sorted(update)  # one merge per density: λ only rescales it


class _Spy:
    """Stands in for generation: logs which records it answered and with which merged weight, and
    answers correctly only when the weight is what that record's split rewards (validation 0.5, test 1.0)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, model, tokenizer, records, cfg):
        w = round(float(self.model.q.weight.detach()), 6)
        self.calls.append(([r["split"] for r in records], w))
        return [r["target"] if abs(w - r["wants"]) < 1e-6 else "" for r in records]


def test_compare_merges_tunes_on_validation_and_never_reads_a_test_split(monkeypatch):
    model = nn.Module()
    model.q = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.q.weight.zero_()
    spy = _Spy(model)
    monkeypatch.setattr(compare, "predict", spy)
    rows = lambda split, wants, n: [{"source": f"{split}{i}", "target": "x", "task_name": f"t{i % 2}",  # noqa: E731
                                     "split": split, "wants": wants, "cluster": 0} for i in range(n)]
    validation, test = rows("validation", 0.5, 30), rows("test", 1.0, 8)
    merge_cfg = MergeSection(methods=["linear", "cat"], tune_max_per_task=4)
    out = compare.compare_merges(model, None, _adapters(), {"test": test}, merge_cfg, EvalSection(), validation)

    # Selection: the validation argmax (Σ ΔW_t = 1, so λ = 0.5 gives the weight validation rewards).
    for m in ("linear", "cat"):
        assert out["settings"][m]["params"]["scale"] == 0.5 and out["settings"][m]["tuned"]
        assert out["settings"][m]["validation_score"] == 1.0
    assert out["recommended"]["method"] == "linear" and out["recommended"]["validation_score"] == 1.0
    # Every validation call comes before the first test call; test is read only at the chosen weights.
    splits = [set(s) for s, _ in spy.calls]
    first_test = next(i for i, s in enumerate(splits) if "test" in s)
    assert all(s == {"validation"} for s in splits[:first_test])
    assert all(s == {"test"} for s in splits[first_test:])
    assert {w for s, w in spy.calls[first_test:]} == {0.0, 0.5}  # base and oracle (0.5) and the merges at 0.5
    assert max(len(s) for s, _ in spy.calls[:first_test]) == 8  # capped: 4 per task, 2 tasks
    assert out["eval"]["test"]["linear"]["mean"] == 0.0  # the test split would have wanted λ = 1: not chosen
    assert float(model.q.weight.detach()) == 0.0  # every merge removed again


def test_untuned_runs_use_configured_settings_and_say_so(monkeypatch):
    model = nn.Module()
    model.q = nn.Linear(1, 1, bias=False)
    monkeypatch.setattr(compare, "predict", lambda m, t, records, cfg: [""] * len(records))
    test = [{"source": "a", "target": "x", "task_name": "t", "cluster": 0}]
    cfg = MergeSection(methods=["linear", "ties"], params={"ties": {"scale": 0.7}})
    out = compare.compare_merges(model, None, _adapters(), {"test": test}, cfg, EvalSection(rouge=False))
    assert out["recommended"] is None
    assert out["settings"]["linear"] == {"params": {"scale": 0.5}, "knobs": [], "tuned": False,
                                         "validation_score": None, "trials": [],
                                         "seconds": out["settings"]["linear"]["seconds"]}
    assert out["settings"]["ties"]["params"] == {"density": 0.2, "scale": 0.7}
    with pytest.raises(ValueError, match="validation"):
        compare.compare_merges(model, None, _adapters(), {"test": test}, cfg.model_copy(update={"tune": True}),
                               EvalSection())


def test_report_shows_settings_and_the_recommended_merge():
    from tclora import report

    merge = {"ties": {"method": "ties", "params": {"density": 0.5, "scale": 1.5}, "knobs": ["density"], "tuned": True},
             "cat": {"method": "cat", "params": {"scale": 1.0}, "knobs": [], "tuned": False}}
    evals = {m: {"mean": 0.5, "splits": {"test": 0.5}, "per_task": {}} for m in ("base", "ties", "cat")}
    metrics = {"eval": evals, "eval_split": "test", "merge": merge,
               "recommended": {"method": "ties", "params": merge["ties"]["params"], "knobs": ["density"],
                               "validation_score": 0.75}}
    table = report.summary_table(metrics)
    assert "λ=1.5 density=0.5 (tuned)" in table and "λ=1 (untuned)" in table
    assert report.recommended_line(metrics).startswith("recommended merge: ties λ=1.5 density=0.5 (tuned), "
                                                       "validation 0.750")
    assert "none" in report.recommended_line({"eval": evals})
    assert "gain" not in report.recommended_line(metrics)  # no routed adapters scored: nothing to compare with
    # base 0.1, routed adapters 0.9, ties 0.5: (0.5 - 0.1) / (0.9 - 0.1) = 50% of the adapters' gain kept.
    evals.update(base={"splits": {"test": 0.1}}, adapters={"splits": {"test": 0.9}})
    assert report.gain_kept(metrics, "ties") == pytest.approx(0.5)
    assert "keeps 50% of the routed adapters' gain over the base on test\n" not in report.recommended_line(metrics)
    assert report.recommended_line(metrics).endswith("keeps 50% of the routed adapters' gain over the base on test")
    evals["ties"]["splits"]["test"] = 0.3  # 25%: the line says what to do instead
    assert "keeps 25% of the routed adapters' gain" in report.recommended_line(metrics)
    assert "serve the farm's routed adapters (tclora route)" in report.recommended_line(metrics)
    assert "train the adapters for their sum as well (train.merge_aware" in report.recommended_line(metrics)
    evals["adapters"]["splits"]["test"] = 0.1  # adapters no better than the base: no share to give
    assert report.gain_kept(metrics, "ties") is None


def test_best_merge_yaml_is_a_config_fragment():
    import yaml

    text = compare.best_merge_yaml({"method": "cp", "params": {"rank": 4, "combine": "shared", "scale": 0.25},
                                    "validation_score": 0.61234}, {"test": 0.5}, "/r/merge_eval/merges/cp")
    doc = yaml.safe_load(text)
    assert doc["method"] == "cp" and doc["validation_score"] == 0.6123 and doc["test"] == {"test": 0.5}
    assert doc["config"]["merge"] == {"methods": ["cp"], "tune": False,
                                      "params": {"cp": {"rank": 4, "combine": "shared", "scale": 0.25}}}
