"""The storage layer against a real S3 server (SeaweedFS) and the local filesystem: publish is manifest-last,
fetch takes back only finished stages, bad stores fail before any Ray work, and a URI run.dir never
becomes a local directory named ``s3:``."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tclora import artifacts, storage
from tclora.config import validate


def finished_stage(run_dir: Path, name: str, key: dict) -> Path:
    with artifacts.stage_dir(run_dir / name, key) as tmp:
        (tmp / "data.bin").write_bytes(b"\x00\x01" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "adapter.json").write_text('{"r": 4}')
    return run_dir / name


def store_config(seaweedfs, tmp_path: Path, name: str, local: str = "local") -> dict:
    return {"run": {"dir": f"s3://{seaweedfs['bucket']}/unit/{name}", "local_dir": str(tmp_path / local),
                    "storage_options": {"endpoint": seaweedfs["endpoint"]}}}


def s3_run(seaweedfs, tmp_path: Path, name: str, local: str = "local") -> storage.RunStore:
    cfg = validate(store_config(seaweedfs, tmp_path, name, local))
    store = storage.open_run(cfg.run)
    store.check()
    return store


def test_publish_then_fetch_into_a_fresh_working_copy(seaweedfs, tmp_path):
    store = s3_run(seaweedfs, tmp_path, "roundtrip")
    key = {"config": "abc"}
    store.publish(finished_stage(store.local, "embed", key))
    store.publish(finished_stage(store.local / "cluster", "k4-123", key))
    fs = seaweedfs["filesystem"]
    with fs.open_input_stream(f"{store.root}/cluster/k4-123/sub/adapter.json") as f:
        assert f.read() == b'{"r": 4}'
    # A publish cut short has files but no manifest: it must never come back as a stage.
    with fs.open_output_stream(f"{store.root}/train/cluster-0/adapter_model.safetensors") as f:
        f.write(b"half")

    fresh = s3_run(seaweedfs, tmp_path, "roundtrip", local="fresh")
    assert sorted(fresh.fetch()) == ["cluster/k4-123", "embed"]
    assert artifacts.is_complete(fresh.local / "embed", key)
    assert artifacts.is_complete(fresh.local / "cluster" / "k4-123", key)
    assert not (fresh.local / "train").exists()
    assert fresh.fetch() == []  # idempotent


def test_a_rerun_on_a_fresh_working_copy_leaves_the_demo_corpus_in_the_store_untouched(seaweedfs, tmp_path,
                                                                                          tiny_base, monkeypatch):
    """A driver restarted elsewhere fetches the finished demo corpus and uploads nothing: the corpus files keep
    their modification times, so the embed stage's input digest, and every stage after it, stays reusable."""
    from pipelines import session
    from tclora.corpus import list_input_files

    monkeypatch.setattr(session, "init_ray", lambda cfg: None)  # everything of a run's start but Ray

    def started(local: str):
        raw = {**store_config(seaweedfs, tmp_path, "demo-corpus", local), "model": {"name_or_path": str(tiny_base)},
               "data": {"path": "demo", "demo_train_per_task": 2, "demo_eval_per_task": 1}}
        cfg, _ = session.start(validate(raw))
        files = list_input_files(cfg.data.path, cfg.run.storage_options)
        return cfg.data, files.digest(), [(f.path, f.mtime_ns) for f in files.files]

    first = started("first")
    time.sleep(1.1)  # S3 keeps modification times in whole seconds: an upload now would show
    second = started("second")
    assert first[0].path.startswith("s3://") and first == second


def test_republish_unpublishes_first_and_replaces_stale_files(seaweedfs, tmp_path):
    store = s3_run(seaweedfs, tmp_path, "replace")
    fs, stage = seaweedfs["filesystem"], finished_stage(store.local, "train", {"v": 1})
    store.publish(stage)
    with fs.open_output_stream(f"{store.root}/train/stale.txt") as f:
        f.write(b"left by an older attempt")
    store.publish(stage)  # same manifest: nothing copied, nothing deleted
    assert fs.get_file_info(f"{store.root}/train/stale.txt").type == pafs.FileType.File
    finished_stage(store.local, "train", {"v": 2})
    store.publish(stage)
    assert fs.get_file_info(f"{store.root}/train/stale.txt").type == pafs.FileType.NotFound
    with fs.open_input_stream(f"{store.root}/train/{artifacts.MANIFEST}") as f:
        assert f.read() == (stage / artifacts.MANIFEST).read_bytes()


def test_remote_output_lands_in_the_working_copy_and_staging_is_cleaned(seaweedfs, tmp_path):
    store = s3_run(seaweedfs, tmp_path, "staging")
    target = store.local / ".embed.tmp" / "embeddings"
    with store.remote_output(target) as path:
        assert path.startswith(f"{store.root}/{storage.STAGING}/")
        with store.filesystem.open_output_stream(f"{path}/part-0.parquet") as f:  # as a remote writer would
            f.write(b"rows")
    assert (target / "part-0.parquet").read_bytes() == b"rows"
    staged = store.filesystem.get_file_info(pafs.FileSelector(f"{store.root}/{storage.STAGING}", recursive=True,
                                                             allow_not_found=True))
    assert not [f for f in staged if f.type == pafs.FileType.File]


def test_uri_run_dir_never_makes_a_local_s3_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store = storage.open_run(validate({"run": {"dir": "s3://bucket/runs/x"}}).run)
    assert store.remote and store.uri == "s3://bucket/runs/x" and store.root == "bucket/runs/x"
    assert store.local == (tmp_path / "home" / ".cache" / "tclora" / "runs" / "s3" / "bucket" / "runs" / "x")
    assert not (tmp_path / "s3:").exists()
    assert store.path(store.local / "embed" / "embeddings") == "bucket/runs/x/embed/embeddings"
    assert store.uri_of(store.local / "metrics.json") == "s3://bucket/runs/x/metrics.json"


def test_a_local_run_dir_is_its_own_store(tmp_path):
    store = storage.open_run(validate({"run": {"dir": str(tmp_path / "run")}}).run)
    assert not store.remote and store.local == tmp_path / "run"
    store.check()
    stage = finished_stage(store.local, "embed", {})
    store.publish(stage)  # no-op
    assert store.fetch() == []
    assert store.ray_storage(store.local / ".train_work") == (str(tmp_path / "run" / ".train_work"), None)
    with store.remote_output(store.local / "x") as path:
        assert path == str(tmp_path / "run" / "x")


def test_storage_path_beside_a_local_run_dir(tmp_path):
    store = storage.open_run(validate({"run": {"dir": str(tmp_path / "head" / "myrun"),
                                               "storage_path": f"file://{tmp_path / 'bucket'}"}}).run)
    assert store.remote and store.root == str(tmp_path / "bucket" / "myrun")
    store.publish(finished_stage(store.local, "embed", {"k": 1}))
    assert (tmp_path / "bucket" / "myrun" / "embed" / artifacts.MANIFEST).is_file()


def test_bad_stores_fail_fast_with_the_uri_named(seaweedfs, tmp_path):
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'ftp'"):
        storage.open_run(validate({"run": {"dir": "ftp://host/run"}}).run)
    with pytest.raises(storage.StorageError, match="run.storage_options"):
        storage.open_run(validate({"run": {"dir": "s3://b/r", "storage_options": {"no_such_option": 1}}}).run)
    missing = validate({"run": {"dir": "s3://no-such-bucket/run", "local_dir": str(tmp_path / "l"),
                                "storage_options": {"endpoint": seaweedfs["endpoint"]}}}).run
    with pytest.raises(storage.StorageError, match="no-such-bucket"):
        storage.open_run(missing).check()
    from tests.cluster_fixtures import free_port

    dead = validate({"run": {"dir": "s3://tclora/run", "local_dir": str(tmp_path / "l2"), "storage_options": {
        "endpoint": f"http://127.0.0.1:{free_port()}", "connect_timeout": 1, "request_timeout": 1}}}).run
    started = time.time()
    with pytest.raises(storage.StorageError, match="s3://tclora/run"):
        storage.open_run(dead).check()
    assert time.time() - started < 60
