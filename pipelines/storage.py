"""Shared storage for multi-node runs: Ray checkpoints and a mirror of every finished stage.

``run.dir`` is the driver's local working directory: stages write there atomically (temp dir + rename,
which object stores cannot do). ``run.storage_path`` (``s3://``, ``gs://``, or a path every node
mounts) is where a multi-node run keeps what must outlive a node:

- Ray Train and Tune checkpoints (``RunConfig(storage_path=...)``), so a trial that loses its node
  resumes on another one;
- a copy of each finished stage (manifest included), so a driver restarted on a fresh head node pulls
  the finished stages back and carries on: a stage is trusted again only if its manifest's content
  hashes still match (``artifacts.is_complete``).

Everything goes below ``<storage_path>/<run name>/``, the run name being ``run.dir``'s last component.
Without ``run.storage_path`` all of it stays under ``run.dir``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from tclora import artifacts
from tclora.config import Config

log = logging.getLogger(__name__)


def run_uri(cfg: Config) -> str | None:
    """``<run.storage_path>/<run name>``, or None when the run keeps everything in ``run.dir``."""
    if not cfg.run.storage_path:
        return None
    return f"{cfg.run.storage_path.rstrip('/')}/{Path(cfg.run.dir).resolve().name}"


def ray_storage(cfg: Config, local: Path, *parts: str) -> str:
    """Where Ray Train / Tune keep a run's checkpoints: below the shared storage if set, else ``local``."""
    uri = run_uri(cfg)
    return "/".join([uri, *parts]) if uri else str(Path(local).resolve())


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).resolve()))


def mirror_stage(cfg: Config, run_dir: Path, stage: Path) -> None:
    """Copy a finished stage directory to the shared storage (a no-op without ``run.storage_path``)."""
    uri = run_uri(cfg)
    if uri is None:
        return
    relative = Path(stage).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    fs, root = _filesystem(uri)
    target = f"{root}/{relative}"
    remote = fs.get_file_info(f"{target}/{artifacts.MANIFEST}")
    if remote.type == pafs.FileType.File and remote.size == (stage / artifacts.MANIFEST).stat().st_size:
        with fs.open_input_stream(f"{target}/{artifacts.MANIFEST}") as f:
            if f.read() == (stage / artifacts.MANIFEST).read_bytes():
                return  # already mirrored (a rerun of a finished stage)
    fs.delete_dir_contents(target, missing_dir_ok=True)
    # The manifest goes last: a copy cut short has no manifest, so it is never restored.
    files = [p for p in sorted(Path(stage).rglob("*")) if p.is_file() and p.name != artifacts.MANIFEST]
    for path in [*files, Path(stage) / artifacts.MANIFEST]:
        dest = f"{target}/{path.relative_to(stage).as_posix()}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(path), dest, destination_filesystem=fs)
    log.info("mirrored %s to %s/%s", relative, uri, relative)


def remove(uri: str) -> None:
    """Delete a directory on the shared storage or locally (missing is fine)."""
    fs, path = _filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def restore_run(cfg: Config, run_dir: Path) -> list[str]:
    """Pull finished stages from the shared storage that ``run_dir`` lacks; returns their relative paths.

    Only directories holding a manifest are copied; whether a stage is reused is then decided as for
    any local stage, by its key and content hashes.
    """
    uri = run_uri(cfg)
    if uri is None:
        return []
    fs, root = _filesystem(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    restored = []
    selector = pafs.FileSelector(root, recursive=True)
    manifests = [info.path for info in fs.get_file_info(selector)
                 if info.type == pafs.FileType.File and info.base_name == artifacts.MANIFEST]
    for manifest in sorted(manifests, key=len):
        relative = manifest[len(root) + 1: -len(artifacts.MANIFEST) - 1]
        local = Path(run_dir) / relative
        if any(relative.startswith(done + "/") for done in restored) or (local / artifacts.MANIFEST).exists():
            continue
        tmp = local.with_name(f".{local.name}.tmp-restore")
        for stale in (tmp, local):  # a half-restored copy, or a local directory with no manifest
            shutil.rmtree(stale, ignore_errors=True)
        pafs.copy_files(f"{root}/{relative}", str(tmp.resolve()), source_filesystem=fs)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(local)
        restored.append(relative)
    if restored:
        log.info("restored %d finished stage(s) from %s: %s", len(restored), uri, ", ".join(restored))
    return restored
