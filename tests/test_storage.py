"""Shared storage: finished stages are mirrored, and a fresh driver pulls back only complete ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import storage
from tclora import artifacts
from tclora.config import validate


def finished_stage(run_dir: Path, name: str, key: dict) -> Path:
    with artifacts.stage_dir(run_dir / name, key) as tmp:
        (tmp / "data.bin").write_bytes(b"\x00\x01" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "adapter.json").write_text('{"r": 4}')
    return run_dir / name


@pytest.mark.parametrize("as_uri", [False, True])
def test_mirrored_stages_restore_into_a_fresh_run_dir(tmp_path, as_uri):
    shared = tmp_path / "bucket"
    uri = f"file://{shared}" if as_uri else str(shared)
    head = validate({"run": {"dir": str(tmp_path / "head" / "myrun"), "storage_path": uri}})
    run_dir = Path(head.run.dir)
    key = {"config": "abc"}
    embed = finished_stage(run_dir, "embed", key)
    cluster = finished_stage(run_dir / "cluster", "k4-123", key)
    storage.mirror_stage(head, run_dir, embed)
    storage.mirror_stage(head, run_dir, cluster)
    assert (shared / "myrun" / "embed" / artifacts.MANIFEST).is_file()
    assert (shared / "myrun" / "cluster" / "k4-123" / "sub" / "adapter.json").read_text() == '{"r": 4}'

    # A copy that was cut short has files but no manifest: it must not come back.
    (shared / "myrun" / "train").mkdir()
    (shared / "myrun" / "train" / "cluster-0.safetensors").write_bytes(b"half")

    new_head = validate({"run": {"dir": str(tmp_path / "new-head" / "myrun"), "storage_path": uri}})
    new_dir = Path(new_head.run.dir)
    assert sorted(storage.restore_run(new_head, new_dir)) == ["cluster/k4-123", "embed"]
    assert artifacts.is_complete(new_dir / "embed", key) and artifacts.is_complete(new_dir / "cluster" / "k4-123", key)
    assert not (new_dir / "train").exists()
    assert storage.restore_run(new_head, new_dir) == []  # idempotent: nothing left to pull


def test_mirror_is_a_no_op_for_an_unchanged_stage_and_replaces_a_changed_one(tmp_path):
    cfg = validate({"run": {"dir": str(tmp_path / "run"), "storage_path": str(tmp_path / "bucket")}})
    run_dir = Path(cfg.run.dir)
    stage = finished_stage(run_dir, "train", {"v": 1})
    storage.mirror_stage(cfg, run_dir, stage)
    remote = tmp_path / "bucket" / "run" / "train"
    (remote / "extra.txt").write_text("left from an older attempt")
    storage.mirror_stage(cfg, run_dir, stage)  # same manifest: nothing copied, nothing deleted
    assert (remote / "extra.txt").exists()
    finished_stage(run_dir, "train", {"v": 2})  # the stage was recomputed with another key
    storage.mirror_stage(cfg, run_dir, stage)
    assert not (remote / "extra.txt").exists()
    assert (remote / artifacts.MANIFEST).read_bytes() == (stage / artifacts.MANIFEST).read_bytes()


def test_without_storage_path_everything_stays_local(tmp_path):
    cfg = validate({"run": {"dir": str(tmp_path / "run")}})
    stage = finished_stage(Path(cfg.run.dir), "embed", {})
    storage.mirror_stage(cfg, Path(cfg.run.dir), stage)
    assert storage.restore_run(cfg, Path(cfg.run.dir)) == []
    assert storage.ray_storage(cfg, tmp_path / "work", "train") == str((tmp_path / "work").resolve())
    shared = validate({"run": {"dir": str(tmp_path / "run"), "storage_path": "s3://bucket/tclora/"}})
    assert storage.ray_storage(shared, tmp_path / "work", ".train_work", "ab12") == "s3://bucket/tclora/run/.train_work/ab12"
