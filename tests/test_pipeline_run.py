"""The session preflight (pipelines/session.py) and the `tclora run` CLI: bad configs fail before Ray starts.

``init_ray`` is replaced by a function that fails the test, so each case proves the error came first.
"""

from __future__ import annotations

import logging
import re

import pytest

from pipelines import cli, session
from pipelines.run import run
from tclora.config import ConfigError, validate

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(session, "init_ray", lambda cfg: pytest.fail("Ray was started"))


@pytest.fixture(scope="module")
def phi3_config_dir(tmp_path_factory):
    """A local checkpoint of a Phi-3-architecture model: config.json only, all that preflight reads."""
    from transformers import Phi3Config

    path = tmp_path_factory.mktemp("phi3")
    Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               ).save_pretrained(path)
    return path


@pytest.mark.parametrize("override, key", [
    ("cluster.k=0", r"cluster\.k\S*: Input should be greater than or equal to 1"),
    ("cluster.k=-3", r"cluster\.k\S*: Input should be greater than or equal to 1"),
    ("merge.cp_rank=0", r"merge\.cp_rank: Input should be greater than or equal to 1"),
    ("lori.sparsity=1", r"lori\.sparsity: Input should be less than 1"),
    ("lori.sparsity=-0.1", r"lori\.sparsity: Input should be greater than or equal to 0"),
])
def test_cli_run_rejects_out_of_range_values_before_ray(override, key, no_ray, capsys):
    assert cli.main(["run", "--set", override]) == 2
    assert re.search(key, capsys.readouterr().err)


def test_cli_run_rejects_unknown_target_modules_of_the_demo_model(no_ray, capsys):
    # The demo base is never built for this: preflight reads its architecture from the config.
    assert cli.main(["run", "--set", "lori.target_modules=[q_proj, qkv_proj]"]) == 2
    err = capsys.readouterr().err
    assert "lori.target_modules" in err and "['qkv_proj']" in err
    assert f"available: {LLAMA_LINEARS}" in err and "model.name_or_path='demo'" in err


def test_preflight_reads_a_local_checkpoint_config(phi3_config_dir, no_ray):
    # Mistral-style names on a Phi-3 model (fused qkv_proj / gate_up_proj): a classic copy-paste slip.
    cfg = validate({"model": {"name_or_path": str(phi3_config_dir)}})
    with pytest.raises(ConfigError, match=r"lori\.target_modules: .*\['gate_proj', 'k_proj', 'q_proj', "
                                          r"'up_proj', 'v_proj'\]; available: .*'gate_up_proj'.*'qkv_proj'"):
        run(cfg)
    session.preflight(validate({"model": {"name_or_path": str(phi3_config_dir)},
                                "lori": {"target_modules": ["qkv_proj", "o_proj"]}}))


def test_preflight_accepts_the_defaults_and_warns_when_the_model_is_unreadable(caplog):
    session.preflight(validate({}))  # the demo model has every default target
    with caplog.at_level(logging.WARNING, logger="tclora"):
        session.preflight(validate({"model": {"name_or_path": "/no/such/checkpoint"}}))
    assert "will be checked when training starts" in caplog.text
