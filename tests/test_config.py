"""Config: YAML + dotted overrides, errors that name the key; the CLI; tclora stays Ray-free."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli
from tclora.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/demo.yaml", ["cluster.k=4", "merge.methods=[cp, ties]", "lori.sparsity=0.5"])
    assert cfg.cluster.k == 4 and cfg.merge.methods == ["cp", "ties"] and cfg.lori.sparsity == 0.5
    assert cfg.model.name_or_path == "demo" and cfg.data.path == "demo"


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.kk=3", r"cluster\.kk: Extra inputs are not permitted"),
        ("clustr.k=3", r"clustr: Extra inputs"),
        ("cluster.k=many", r"cluster\.k\.literal\['auto'\]: Input should be 'auto' \(got 'many'\)"),
        ("cluster.k=0", r"cluster\.k\.constrained-int: Input should be greater than or equal to 1"),
        ("merge.cp_rank=0", r"merge\.cp_rank: Input should be greater than or equal to 1"),
        ("lori.sparsity=1.0", r"lori\.sparsity: Input should be less than 1"),
        ("lori.sparsity=-0.1", r"lori\.sparsity: Input should be greater than or equal to 0"),
        ("lori.mode=lori_x", r"lori\.mode: Input should be 'lori_d', 'lori_s' or 'lora'"),
        ("merge.methods=[cp, nope]", r"merge\.methods: unknown method.*'nope'.*known: \['cat', 'cp'"),
        ("run.dir", r"must look like key\.sub=value"),
        ("cluster.max_fit_rows=10", r"cluster: .*max_fit_rows \(10\) must be >= min_fit_rows \(50000\)"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_section_hash_tracks_only_the_named_sections():
    a = load_config(None, ["merge.cp_rank=4"])
    b = load_config(None, ["merge.cp_rank=8"])
    assert a.section_hash("embed", "data") == b.section_hash("embed", "data")
    assert a.section_hash("merge") != b.section_hash("merge")


DEFAULT_HASH = load_config(None, []).section_hash(*Config.model_fields)  # every section


@pytest.mark.parametrize("override", ["train.resources={gpu_node: 1}", "train.max_concurrent=7",
                                      "train.cpus_per_worker=4", "train.checkpoint_every=3", "train.max_failures=0",
                                      "train.gradient_checkpointing=true", "eval.num_cpus=3",
                                      "eval.resources={eval_node: 1}", "embed.num_actors=5",
                                      "run.ray_address=10.0.0.1:6379"])
def test_placement_fields_leave_the_stage_hash_alone(override):
    assert load_config(None, [override]).section_hash(*Config.model_fields) == DEFAULT_HASH


@pytest.mark.parametrize("override", ["train.lr=0.01", "train.num_workers=2", "train.gpus_per_worker=1",
                                      "train.max_rows_in_memory=5", "eval.num_gpus=1", "embed.batch_size=7",
                                      "model.dtype=bfloat16", "model.cache_dir=/tmp/x", "run.seed=1"])
def test_fields_that_change_outputs_change_the_stage_hash(override):
    # model.cache_dir: hashed, since a run resolves model.name_or_path "demo" to the cached base's path
    assert load_config(None, [override]).section_hash(*Config.model_fields) != DEFAULT_HASH


def test_a_misspelt_placement_field_is_refused_when_the_section_is_defined():
    from tclora.config import _Section

    with pytest.raises(TypeError, match=r"PLACEMENT names no field: \['max_concurent'\]"):
        class Broken(_Section):  # noqa: F841
            max_concurrent: int = 1
            PLACEMENT = frozenset({"max_concurent"})


def test_cli_help_lists_subcommands_and_config_errors_exit_cleanly(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "config", "merge-methods", "demo-corpus"):
        assert command in out
    assert cli.main(["config", "--set", "cluster.k=0"]) == 2
    assert "cluster.k" in capsys.readouterr().err
    assert cli.main(["merge-methods"]) == 0
    assert "knots" in capsys.readouterr().out


def test_tclora_never_imports_ray():
    # A fresh interpreter: importing every tclora module must not pull in Ray.
    code = (
        "import importlib, pkgutil, sys, tclora\n"
        "for m in pkgutil.walk_packages(tclora.__path__, 'tclora.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'ray' not in sys.modules, sorted(k for k in sys.modules if k.startswith('ray'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("module", ["pipelines.io", "pipelines.cluster_tasks"])
def test_ray_data_tasks_never_import_torch(module):
    # A Ray worker imports the module that defines a task's function: every read / validation-scan worker
    # imported torch through tclora.data, every cluster-stage worker through tclora.cluster (2.3-2.7 s of a
    # core each).
    code = f"import sys, {module}\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_fused_training_needs_zero_stage_0():
    # A fused group trains on one worker and clips each adapter's gradient itself (tclora.train).
    with pytest.raises(ConfigError, match=r"fused=true with clusters_per_run=2 needs zero_stage=0 \(got 2\)"):
        load_config(None, ["train.clusters_per_run=2", "train.fused=true", "train.zero_stage=2"])
    assert load_config(None, ["train.clusters_per_run=2", "train.fused=true", "train.zero_stage=0"]).train.fused
    assert load_config(None, ["train.clusters_per_run=1", "train.fused=true", "train.zero_stage=2"])  # nothing to fuse


@pytest.mark.parametrize("field", ["disentangle", "merge_aware"])
def test_fused_group_losses_need_a_fused_group_of_lori_adapters(field):
    """train.disentangle and train.merge_aware use the other clusters of a fused group: refused where there are none."""
    fused = ["train.clusters_per_run=2", "train.fused=true", f"train.{field}=3"]
    assert getattr(load_config(None, fused).train, field) == 3.0
    with pytest.raises(ConfigError, match=rf"{field}=3.0 needs fused=true and clusters_per_run >= 2"):
        load_config(None, ["train.clusters_per_run=1", f"train.{field}=3"])
    with pytest.raises(ConfigError, match=rf"{field}=3.0 needs fused=true .*fused=False"):
        load_config(None, ["train.clusters_per_run=2", "train.fused=false", f"train.{field}=3"])
    with pytest.raises(ConfigError, match=rf"train.{field} needs fused training, which plain LoRA"):
        load_config(None, [*fused, "lori.mode=lora"])
    with pytest.raises(ConfigError, match=field):
        load_config(None, [f"train.{field}=-1"])


def test_disentangle_needs_a_row_of_each_other_cluster_per_row():
    with pytest.raises(ConfigError, match=r"needs batch_size >= clusters_per_run - 1 \(got 2 and 4\)"):
        load_config(None, ["train.clusters_per_run=4", "train.batch_size=2", "train.disentangle=3"])
    assert load_config(None, ["train.clusters_per_run=4", "train.batch_size=2", "train.merge_aware=3"])  # any batch


def test_mbc_short_adapters_are_plain_lora_without_the_disentanglement_penalty():
    """cluster.by=adapters trains short plain-LoRA adapters from the run's config: they must validate (the
    train stage re-validates its config) and never carry the fused-only penalty."""
    from tclora.config import validate
    from tclora.mbc import short_adapter_config

    cfg = load_config(None, ["train.clusters_per_run=2", "train.disentangle=3", "train.merge_aware=0.5",
                             "train.merge_aware_dropout=0.5", "train.merge_aware_updates=others"])
    short = validate(short_adapter_config(cfg).model_dump(mode="json"))
    assert short.lori.mode == "lora" and short.train.disentangle == 0.0 and cfg.train.disentangle == 3.0
    assert short.train.merge_aware == 0.0 and cfg.train.merge_aware == 0.5
    assert short.train.merge_aware_dropout == 0.0 and cfg.train.merge_aware_dropout == 0.5
    assert short.train.merge_aware_updates == "all" and cfg.train.merge_aware_updates == "others"


def test_merge_aware_updates_needs_merge_aware_and_is_recorded_in_the_adapters_metadata():
    with pytest.raises(ConfigError, match=r"merge_aware_updates='others' needs merge_aware > 0"):
        load_config(None, ["train.clusters_per_run=2", "train.merge_aware_updates=others"])
    with pytest.raises(ConfigError, match="merge_aware_updates"):
        load_config(None, ["train.clusters_per_run=2", "train.merge_aware=0.1", "train.merge_aware_updates=mine"])
    cfg = load_config(None, ["train.clusters_per_run=2", "train.merge_aware=0.1", "train.merge_aware_updates=others"])
    assert cfg.train.fused_losses(2) == {"disentangle": 0.0, "merge_aware": 0.1, "merge_aware_dropout": 0.0,
                                         "merge_aware_updates": "others"}
    assert "merge_aware_updates" not in cfg.train.fused_losses(1)  # a cluster alone in its run sums nothing


def test_merge_aware_dropout_needs_merge_aware_and_is_a_probability():
    with pytest.raises(ConfigError, match=r"merge_aware_dropout=0.5 needs merge_aware > 0"):
        load_config(None, ["train.clusters_per_run=2", "train.merge_aware_dropout=0.5"])
    with pytest.raises(ConfigError, match="merge_aware_dropout"):
        load_config(None, ["train.clusters_per_run=2", "train.merge_aware=0.1", "train.merge_aware_dropout=1"])
