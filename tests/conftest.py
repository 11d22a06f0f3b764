"""Shared fixtures: one local Ray instance per test session, tiny models built once."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub; everything they load is built locally or ships in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance shared by every Ray test (start-up costs seconds, so once)."""
    import ray

    if not ray.is_initialized():
        # More logical CPUs than cores: Tune trials and their Train workers must not deadlock on 2 cores.
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
