"""Benchmarks at smoke size: the scripts run and write the JSON the README table is generated from.

Nothing here is timed; the numbers checked are counts that follow from the shapes alone.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks import bench_gpu_train, bench_lori_params, bench_merge_quality, readme_table, run_all
from benchmarks.common import write_result
from tclora.demo_corpus import TASK_FAMILIES

HEADLINE_KEYS = {"metric", "value", "display", "target", "met"}


@pytest.fixture(scope="module")
def lori_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    bench_lori_params.main(["--smoke", "--shapes", "mistral-7b", "--out", str(out)])
    return out, json.loads((out / "bench_lori_params_smoke.json").read_text())


def test_gpu_train_script_runs_every_mode_on_cpu(tmp_path):
    """The script prepared for a GPU machine, at smoke size on CPU (float32): every mode trains the same
    adapters, so each fused adapter's B equals the one trained alone to float rounding (as tests/test_multi_lori.py
    finds), and both merges run."""
    bench_gpu_train.main(["--smoke", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_gpu_train_smoke.json").read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["adapters"] == 2
    assert set(result["modes"]) == set(bench_gpu_train.MODES)
    assert all(m["adapters_per_hour"] > 0 for m in result["modes"].values())
    assert all(d < 1e-5 for d in result["b_relative_distance"].values())
    assert set(result["merge_seconds"]) == {"cp", "linear"}
    assert (tmp_path / "bench_gpu_train_smoke.png").stat().st_size > 0


def test_lori_params_writes_counts_bytes_and_headline(lori_results):
    out, result = lori_results
    assert result["benchmark"] == "lori_params" and result["smoke"] is True
    assert {"date", "cpus", "torch", "load_avg_start", "load_avg_end"} <= set(result["machine"])
    assert (out / "bench_lori_params_smoke.png").stat().st_size > 0
    m = result["models"]["mistral-7b"]
    assert {"shape", "extrapolation", "params", "bytes", "bytes_fraction_of_lora"} <= set(m)
    assert set(m["bytes"]) == {"lora_peft", "lori_as_saved", "sparse_bitmask_a_seed", "sparse_bitmask_a_explicit",
                               "sparse_int32_a_seed", "sparse_int32_a_explicit"}
    p = m["params"]
    # Smoke divides every width by 32, so the fractions are Mistral-7B's: B is 43008 r of 81920 r per layer.
    assert p["lori_d_fraction_of_lora"] == pytest.approx(43008 / 81920)
    assert p["lori_s_fraction_of_lora"] == pytest.approx(0.1 * 43008 / 81920, rel=1e-3)
    assert m["bytes"]["sparse_bitmask_a_seed"] < m["bytes"]["sparse_bitmask_a_explicit"] < m["bytes"]["lora_peft"]
    assert len(result["headline"]) == 3
    assert all(set(h) == HEADLINE_KEYS for h in result["headline"])


def test_readme_table_rewrites_only_the_marked_block(lori_results, tmp_path):
    out, _ = lori_results
    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\n{readme_table.START}\nstale table\n{readme_table.END}\n\nafter\n")
    readme_table.main(["--results", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# project\n") and text.endswith("after\n")
    block = text[text.index(readme_table.START) : text.index(readme_table.END)]
    assert "| lori_params (smoke) | mistral-7b: LoRI-S trainable params / LoRA |" in block
    readme_table.main(["--results", str(out), "--readme", str(readme)])
    assert readme.read_text() == text  # regenerating from the same JSON changes nothing


def test_readme_table_without_markers_prints_and_leaves_readme(lori_results, tmp_path, capsys):
    out, _ = lori_results
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    readme_table.main(["--results", str(out), "--readme", str(readme)])
    captured = capsys.readouterr()
    assert readme.read_text() == "# no markers\n"
    assert "lori_params" in captured.out and readme_table.START in captured.err


def test_readme_table_prefers_full_results_and_reads_legacy_json(tmp_path):
    head = [{"metric": "m", "value": 1, "display": "1", "target": None, "met": None}]
    for stem, smoke in (("bench_x", False), ("bench_x_smoke", True)):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"benchmark": "x", "smoke": smoke, "headline": head,
                                                           "machine": {"date": "2026-01-01T00:00:00+00:00"}}))
    legacy = {"rows": 20000, "dim": 384, "k": 64, "cpus": 2, "load_before": [3.0, 2.0, 1.0],
              "methods": {"tclora": {"seconds": 1.5, "inertia_ratio": 1.001}, "sklearn_full": {"seconds": 9.0}}}
    (tmp_path / "bench_kmeans_20000.json").write_text(json.dumps(legacy))
    rows = readme_table.collect(tmp_path)
    assert [r["benchmark"] for r in rows] == ["kmeans", "x"]  # x's smoke result is superseded by the full one
    assert rows[0]["met"] is None and "1.5 s" in rows[0]["display"]  # judged only at the target's 1M rows
    assert rows[1]["date"] == "2026-01-01 00:00"
    # A combined result's row dated by the run it came from, not by the file's first part.
    later = {**head[0], "run_machine": {"date": "2026-02-03T04:05:00+00:00", "cpus": 2}}
    (tmp_path / "bench_x.json").write_text(json.dumps({"benchmark": "x", "smoke": False, "headline": [*head, later],
                                                       "machine": {"date": "2026-01-01T00:00:00+00:00"}}))
    dated = [(r["date"], r["machine"]) for r in readme_table.collect(tmp_path) if r["benchmark"] == "x"]
    assert dated == [("2026-01-01 00:00", "?"), ("2026-02-03 04:05", "2 CPUs")]


def test_readme_table_dates_an_undated_result_by_its_last_commit(tmp_path):
    """A clone gives every file the clone's mtime: an undated result is dated by the commit that last changed it,
    and by its mtime only while it differs from that commit."""
    result = tmp_path / "bench_x.json"
    result.write_text("{}")
    when = "2026-01-02T03:04:00+00:00"
    env = {**os.environ, "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when, "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "bench_x.json"], ["commit", "-qm", "result"]):
        subprocess.run(["git", "-C", str(tmp_path), *cmd], env=env, check=True)
    assert readme_table.date(result, {}) == "2026-01-02 03:04 (commit)"
    result.write_text('{"changed": 1}')
    assert readme_table.date(result, {}).endswith(" (file)")
    assert readme_table.date(result, {"machine": {"date": "2026-05-06T07:08:09"}}) == "2026-05-06 07:08"


def test_combined_merge_quality_keeps_each_variants_run_and_base(tmp_path):
    """bench_merge_quality --combine: each variant keeps the machine and date of the last part that ran it, and
    the demo base it was measured on; seeds of one variant from two different bases are refused."""
    def part(name: str, date: str, variants: list[str], base: str | None, seed: str = "0") -> Path:
        scores = {"scores": {m: {s: v for s in bench_merge_quality.SPLITS}
                             for m, v in (("base", 0.0), ("adapters", 0.8), ("linear", 0.5))}}
        config = {"kinds": ["lori_s"], **({"base": {"sha256": base}} if base else {})}  # None: before bases were
        path = tmp_path / f"{name}.json"                                                # recorded
        path.write_text(json.dumps({"machine": {"date": date}, "config": config, "seconds": {},
                                    "cpu_seconds": 1.0, "per_seed": {v: {seed: scores} for v in variants}}))
        return path

    old, new = part("old", "2026-01-01", ["lori_s", "lori_d"], None), part("new", "2026-02-02", ["lori_s"], "b1")
    args = bench_merge_quality.parse_args(["--combine", str(old), str(new)])
    result = bench_merge_quality.combine(args)
    write_result(tmp_path / "out", "merge_quality", result)  # stamps the combining run's load on its machine
    assert result["variant_machine"] == {"lori_s": {"date": "2026-02-02"}, "lori_d": {"date": "2026-01-01"}}
    assert result["variant_base"] == {"lori_s": "b1", "lori_d": None}
    runs = {h["metric"].split("(")[1].split(")")[0]: h["run_machine"] for h in result["headline"]}
    assert runs == {"lori_s": {"date": "2026-02-02"}, "lori_d": {"date": "2026-01-01"}}

    other = part("other", "2026-02-03", ["lori_s"], "b2", seed="1")  # another base, another seed: still refused
    with pytest.raises(SystemExit, match=r"lori_s's seeds were measured on different demo bases .*other\.json"):
        bench_merge_quality.combine(bench_merge_quality.parse_args(["--combine", str(new), str(other)]))
    again = part("again", "2026-02-03", ["lori_s"], "b1", seed="1")  # a combined result says per variant
    (tmp_path / "combined.json").write_text(json.dumps(result))
    merged = bench_merge_quality.combine(bench_merge_quality.parse_args(
        ["--combine", str(tmp_path / "combined.json"), str(again)]))
    assert merged["variant_base"]["lori_s"] == "b1" and sorted(merged["per_seed"]["lori_s"]) == ["0", "1"]


def test_combined_merge_quality_with_a_base_per_seed(tmp_path):
    """--base-per-seed runs record each seed's base: --combine pools their seeds (the point: a mean over
    pre-training draws) and keeps each seed's base, but refuses one seed measured on two builds of its base."""
    def part(name: str, seed: str, sha: str) -> Path:
        run = {"scores": {m: {s: v for s in bench_merge_quality.SPLITS}
                          for m, v in (("base", 0.0), ("adapters", 0.8), ("linear", 0.5))}, "base": {"sha256": sha}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"machine": {"date": "2026-02-02"}, "seconds": {}, "cpu_seconds": 1.0,
                                    "config": {"kinds": ["lori_s"], "base": {"per_seed": {seed: {"sha256": sha}}}},
                                    "per_seed": {"lori_s+base_per_seed": {seed: run}}}))
        return path

    combined = bench_merge_quality.combine(bench_merge_quality.parse_args(
        ["--combine", str(part("s0", "0", "b0")), str(part("s1", "1", "b1"))]))
    assert combined["variant_base"] == {"lori_s+base_per_seed": {"0": "b0", "1": "b1"}}
    assert sorted(combined["per_seed"]["lori_s+base_per_seed"]) == ["0", "1"]
    with pytest.raises(SystemExit, match=r"seed\(s\) 1 were measured on different builds"):
        bench_merge_quality.combine(bench_merge_quality.parse_args(
            ["--combine", str(part("s1", "1", "b1")), str(part("s1b", "1", "b1-rebuilt"))]))


def test_scripts_explain_themselves():
    for parse in (bench_lori_params.parse_args, bench_merge_quality.parse_args):
        with pytest.raises(SystemExit) as exit_info:
            parse(["--help"])
        assert exit_info.value.code == 0
    assert {"lori_params", "merge_quality"} <= set(run_all.BENCHMARKS)


def test_merge_quality_variants_cover_every_kind_and_fused_loss_once():
    args = bench_merge_quality.parse_args(["--kinds", "lori_s", "lora", "--disentangle", "0", "3",
                                           "--merge-aware", "0", "0.25"])
    got = {name: (kind, train) for name, kind, train in bench_merge_quality.variants(args)}
    off = {"disentangle": 0.0, "merge_aware": 0.0, "merge_aware_dropout": 0.0, "merge_aware_updates": "all"}
    assert got == {  # plain LoRA is never fused: it has neither fused-group loss
        "lori_s": ("lori_s", off),
        "lori_s+merge_aware0.25": ("lori_s", {**off, "merge_aware": 0.25}),
        "lori_s+disentangle3": ("lori_s", {**off, "disentangle": 3.0}),
        "lori_s+disentangle3+merge_aware0.25": ("lori_s", {**off, "disentangle": 3.0, "merge_aware": 0.25}),
        "lora": ("lora", off)}
    dropout = bench_merge_quality.parse_args(["--merge-aware", "0", "0.03", "--merge-aware-dropout", "0", "0.5"])
    assert [name for name, _, _ in bench_merge_quality.variants(dropout)] == [  # adapter dropout only with γ > 0
        "lori_s", "lori_s+merge_aware0.03", "lori_s+merge_aware0.03+merge_aware_dropout0.5"]
    updates = bench_merge_quality.parse_args(["--merge-aware", "0", "0.1", "--merge-aware-updates", "all", "others"])
    assert [(name, train["merge_aware_updates"]) for name, _, train in bench_merge_quality.variants(updates)] == [
        ("lori_s", "all"), ("lori_s+merge_aware0.1", "all"),  # no summed loss to route at γ = 0
        ("lori_s+merge_aware0.1+merge_aware_updates_others", "others")]
    # Training sizes off the reference are named, so --combine cannot pool two budgets under one name.
    budget = bench_merge_quality.parse_args(["--merge-aware", "0.1", "--steps", "240", "--lr", "2e-3"])
    assert [name for name, _, _ in bench_merge_quality.variants(budget)] == ["lori_s+merge_aware0.1+steps240+lr0.002"]
    attention = bench_merge_quality.parse_args(["--target-modules", "q_proj", "k_proj", "v_proj", "o_proj"])
    assert [name for name, _, _ in bench_merge_quality.variants(attention)] == ["lori_s+modules_q_k_v_o"]
    assert [name for name, _, _ in bench_merge_quality.variants(bench_merge_quality.parse_args(["--smoke"]))] == [
        "lori_s"]  # --smoke's own sizes are its reference
    with pytest.raises(SystemExit, match="never fused"):
        bench_merge_quality.variants(bench_merge_quality.parse_args(["--kinds", "lora", "--merge-aware", "1"]))
    # Fused groups smaller than the family count are named; plain LoRA trains alone whatever the group size.
    split = bench_merge_quality.parse_args(["--kinds", "lori_s", "lora", "--merge-aware", "0.1",
                                            "--clusters-per-run", "2"])
    assert [name for name, _, _ in bench_merge_quality.variants(split)] == ["lori_s+merge_aware0.1+per_run2"]
    whole = bench_merge_quality.parse_args(["--clusters-per-run", str(len(TASK_FAMILIES))])  # every family
    assert [name for name, _, _ in bench_merge_quality.variants(whole)] == ["lori_s"]
    # A CP / SVD rank other than demo.yaml's is named, so such a run combines beside the default one.
    rank = bench_merge_quality.parse_args(["--kinds", "lori_s", "lora", "--cp-rank", "12"])
    assert [name for name, _, _ in bench_merge_quality.variants(rank)] == ["lori_s+cp_rank12", "lora+cp_rank12"]
    base = bench_merge_quality.parse_args(["--cp-rank", "12", "--base-seed", "2"])  # another pre-training draw
    assert [name for name, _, _ in bench_merge_quality.variants(base)] == ["lori_s+cp_rank12+base_seed2"]
    per_seed = bench_merge_quality.parse_args(["--base-per-seed"])  # seed s on base s
    assert [name for name, _, _ in bench_merge_quality.variants(per_seed)] == ["lori_s+base_per_seed"]
    with pytest.raises(SystemExit):  # one base, or one per seed: not both
        bench_merge_quality.parse_args(["--base-per-seed", "--base-seed", "1"])
    assert bench_merge_quality.DEFAULT_CP_RANK == yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())["merge"]["cp_rank"]


def test_merge_quality_summary_gain_kept_and_targets():
    splits = bench_merge_quality.SPLITS

    def seed_run(cp: float | None, linear: float) -> dict:
        at = lambda v: {split: v for split in splits}  # noqa: E731
        scores = {"base": at(0.1), "adapters": at(0.8), "linear": at(linear)}
        if cp is not None:
            scores["cp"] = at(cp)
        return {"scores": scores}

    summary = bench_merge_quality.summarise({0: seed_run(0.6, 0.4), 1: seed_run(0.5, 0.4)})
    # gain kept = (merge - base) / (oracle - base), per seed, then averaged
    assert summary["gain_kept"]["cp"]["mean"] == pytest.approx(((0.6 - 0.1) / 0.7 + (0.5 - 0.1) / 0.7) / 2)
    assert summary["gain_kept"]["linear"]["mean"] == pytest.approx(0.3 / 0.7)
    assert summary["best_merge"] == "cp" and summary["best_ood_merge"] == "cp"
    targets = summary["targets"]
    assert targets["base_in_domain"]["met"] and not targets["oracle_in_domain"]["met"]  # 0.8 < 0.85
    assert targets["best_merge_gain_kept"]["met"]  # 0.64 >= 0.6
    assert targets["best_ood_gain_over_base"]["value"] == pytest.approx(0.45)
    # a seed whose cp merge failed has no cp score: cp is averaged over the seeds that have one
    failed = bench_merge_quality.summarise({0: seed_run(0.6, 0.4), 1: seed_run(None, 0.4)})
    assert failed["splits"]["test"]["cp"]["mean"] == pytest.approx(0.6)
    assert failed["gain_kept"]["cp"]["mean"] == pytest.approx(0.5 / 0.7)


def test_merge_quality_out_of_domain_per_family_is_averaged_over_the_seeds_that_recorded_it():
    def run(last: float, upper: float, per_family: bool = True) -> dict:
        at = {"test": 0.5, "ood_test": (last + upper) / 2, "compose_test": 0.0, "mc_test": 0.0}
        out = {"scores": {"base": {**at, "ood_test": 0.0}, "adapters": at, "cp": at}}
        if per_family:
            families = {"last_word": last, "upper_words": upper}
            out["per_task"] = {"base": {"ood_test": {f: 0.0 for f in families}}, "cp": {"ood_test": families}}
        return out

    summary = bench_merge_quality.summarise({0: run(0.3, 0.0), 1: run(0.1, 0.0), 2: run(0.9, 0.9, False)})
    assert summary["ood_per_family"] == {"base": {"last_word": 0.0, "upper_words": 0.0},
                                         "cp": {"last_word": pytest.approx(0.2), "upper_words": 0.0}}
    assert bench_merge_quality.summarise({0: run(0.3, 0.0, False)})["ood_per_family"] is None  # older results


def test_merge_quality_one_merge_for_both_targets():
    """The best merge in domain and the best out of domain are different methods here; only one merge meets
    both targets (kept >= 60% and OOD >= +0.10), and it is neither of them."""
    def scores(test: float, ood: float) -> dict:
        return {"test": test, "ood_test": ood, "compose_test": 0.0, "mc_test": 0.0}

    run = {"scores": {"base": scores(0.0, 0.0), "adapters": scores(1.0, 0.0),
                      "cat": scores(0.9, 0.05),     # kept 90%, +0.05: misses OOD
                      "isoc": scores(0.2, 0.30),    # kept 20%, +0.30: misses in domain
                      "ties": scores(0.65, 0.12)}}  # kept 65%, +0.12: meets both
    summary = bench_merge_quality.summarise({0: run, 1: run})
    assert summary["best_merge"] == "cat" and summary["best_ood_merge"] == "isoc"
    assert summary["both_merge"] == "ties"
    assert summary["targets"]["one_merge_both"]["value"] == pytest.approx(min(0.65 / 0.6, 0.12 / 0.10))
    assert summary["targets"]["one_merge_both"]["met"]
    run["scores"]["ties"] = scores(0.65, 0.08)  # now none meets both: the closest is named, target missed
    summary = bench_merge_quality.summarise({0: run, 1: run})
    assert summary["both_merge"] == "ties" and not summary["targets"]["one_merge_both"]["met"]
