"""Shared fixtures: one local Ray instance per test session (per pytest-xdist worker), tiny models built once."""

from __future__ import annotations

import os
import secrets

import pytest

# The real S3 server (per session), the two-node and the autoscaling Ray clusters (per module); started only
# by the tests that ask for them.
pytest_plugins = ["tests.cluster_fixtures"]
# What that S3 server accepts, set before any Ray starts: the suite's own Ray workers then read them from
# their environment, as a cluster's processes do.
os.environ.update(AWS_ACCESS_KEY_ID="tclora-test", AWS_SECRET_ACCESS_KEY=secrets.token_hex(16),
                  AWS_EC2_METADATA_DISABLED="true")

# Tests never reach a model hub; everything they load is built locally or ships in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval task data (tests/test_harness.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist, each worker gets its share of the cores for torch's OpenMP pool (set before torch is
# imported; inherited by the `tclora run` subprocesses some tests start). Measured on the tests without Ray,
# one process on 2 cores (2026-12-03): one thread took the wall time of two and 10% less CPU (120 vs 133 s):
# the tiny models leave OpenMP threads little to share, and under xdist that CPU is the other worker's.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


# ---- pytest-xdist (`make test`: -n 2 --dist loadfile) ---------------------------------------------------------
# Files whose tests start Ray clusters of their own in subprocesses share one worker, one after the other: side
# by side on 2 cores (2026-12-02) the driver-kill test took 445 s, after one another 237-243 s (128-187 s with
# no second worker). (`xdist_group` marks would say this, but pytest 9.2 drops the node id suffix they rely on:
# pytest-dev/pytest-xdist#1386.)
SHARED_UNITS = {"tests/test_faults.py": "own-ray-clusters", "tests/test_multinode.py": "own-ray-clusters"}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: plain pytest (-p no:xdist) must not know it
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with :data:`SHARED_UNITS`: one unit of work per test file (a module's fixtures are
    built in one worker), those files in one unit, and a worker takes its next unit only when it reaches
    the last test of the current one (xdist prefetches at two left: here that can be 5 minutes of work
    queued behind a worker while the other one idles)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # Overrides xdist's private scheduler methods (_split_scope, _reschedule, _pending_of): pinned <4 in pyproject.
    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_UNITS.get(path, path)

        def _reschedule(self, node) -> None:
            if self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, Ray files first, so the long units start early and short ones fill in at the end
    (units are taken in collection order with ``--no-loadscope-reorder``)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("ray") is None)  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance shared by every Ray test (start-up costs seconds, so once)."""
    import ray

    if not ray.is_initialized():
        # More logical CPUs than cores: Tune trials and their Train workers must not deadlock on 2 cores.
        from pipelines.session import driver_runtime_env

        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env=driver_runtime_env(local=True))  # what a run's driver starting its own passes
    yield ray
    ray.shutdown()


# A demo base small enough to build in seconds: same code path as the real one (build, cache, load).
TINY_DEMO_SPEC = dict(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=60, batch=16, seq_len=64)


@pytest.fixture(scope="session")
def tiny_base_spec():
    from tclora.demo_base import DemoBaseSpec

    return DemoBaseSpec(**TINY_DEMO_SPEC)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_base_spec):
    """Path of a tiny pre-trained demo base checkpoint (built once per session into a temp cache)."""
    from tclora.demo_base import build_demo_base

    return build_demo_base(tmp_path_factory.mktemp("tclora-cache"), tiny_base_spec)


@pytest.fixture
def tiny_model_and_tokenizer(tiny_base):
    """A fresh ``(model, tokenizer)`` loaded from ``tiny_base`` per test, so tests may train it."""
    from tclora.models import load_base

    return load_base(str(tiny_base))
