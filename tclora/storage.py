"""One storage layer for every run artefact: a local path, a shared mount, or an object-store URI.

``run.dir`` says where a run's artefacts live: ``runs/demo`` (local), ``/mnt/shared/runs/demo`` (a mount
every node sees), or ``s3://bucket/runs/demo`` / ``gs://...`` (an object store, reached through pyarrow's
filesystems with ``run.storage_options``: endpoint, region, timeouts; credentials come from the
environment, never from the config). :class:`RunStore` is that place plus the driver's working copy:

- stages are computed in a local directory on the driver (``store.local``), atomically (temp dir +
  rename, which object stores cannot do), and then *published*: every file uploaded, the manifest last,
  after the old manifest was deleted first. A reader trusts a stage only through its manifest and the
  content hashes it lists, so a publish cut short is never taken for a finished stage;
- processes on other nodes (Ray Data tasks, Train workers, Tune trials, the merge/eval actor) never get a
  driver-local path: they get :meth:`RunStore.path` (a path inside ``store.filesystem``, which pickles)
  and read or write through the filesystem; what they write for the driver goes to a staging prefix
  (:meth:`RunStore.remote_output`) that the driver pulls into its working copy;
- a driver restarted elsewhere (a new head node, a job retried) pulls the finished stages back
  (:meth:`RunStore.fetch`) and reuses them after checking their hashes.

With a local ``run.dir`` the store *is* the working copy and every transfer is a no-op. ``run.storage_path``
(a bucket or mount besides a local ``run.dir``) is the older spelling of the same thing: the store is then
``<storage_path>/<run name>``. Ray-free by design (``tclora`` never imports ``ray``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tclora.artifacts import MANIFEST
from tclora.config import ConfigError

log = logging.getLogger(__name__)

STAGING = ".staging"  # below the store root: what remote processes write for the driver to pull


class StorageError(ConfigError):
    """``run.dir`` / ``data.path`` / ``run.storage_options`` cannot be used; the message names which and why."""


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    return "://" in str(path)


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """``run.storage_options`` in pyarrow's ``S3FileSystem`` terms: ``endpoint`` may carry its scheme."""
    opts = dict(options)
    if "endpoint" in opts:
        endpoint = str(opts.pop("endpoint"))
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        opts.setdefault("endpoint_override", parsed.netloc)
        opts.setdefault("scheme", parsed.scheme)
    return opts


def filesystem(uri: str, options: dict[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path, ``file://``, ``s3://`` or ``gs://`` URI.

    ``options`` (``run.storage_options``) go to the object store's filesystem: ``endpoint`` (``http://host:port``
    for an S3-compatible server), ``region`` and any other ``S3FileSystem`` / ``GcsFileSystem`` argument.
    The returned filesystem pickles with its options, so remote tasks reach the same store.

    Raises:
        StorageError: an unsupported scheme, or an option the filesystem does not take.
    """
    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    try:
        if scheme == "file":
            return pafs.LocalFileSystem(), str(Path(rest).resolve())
        if scheme in ("s3", "s3a"):
            return pafs.S3FileSystem(**_s3_options(options or {})), rest.rstrip("/")
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem(**(options or {})), rest.rstrip("/")
    except TypeError as err:  # an option the constructor does not take
        raise StorageError(f"run.storage_options {sorted(options or {})} for {uri!r}: {err}") from None
    raise StorageError(f"{uri!r}: unsupported storage scheme {scheme!r} (use a local path, file://, s3:// or gs://)")


def default_local_dir(uri: str) -> Path:
    """The driver's working copy of a run stored at an object-store URI: ``~/.cache/tclora/runs/<scheme>/<path>``.

    Never a directory named ``s3:`` below the current directory.
    """
    scheme, rest = uri.split("://", 1)
    safe = "/".join(part for part in rest.strip("/").split("/") if part not in ("", ".", ".."))
    return Path.home() / ".cache" / "tclora" / "runs" / scheme / safe


# ---- directory transfers (manifest last on upload: the publish step) ------------------------------
def _files(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type != pafs.FileType.Directory:
        return []
    return [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]


def upload_dir(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Publish the local directory ``local`` at ``path`` on ``fs``: stale copy's manifest deleted first,
    stale files removed, every file uploaded, the manifest (if any) last."""
    local = Path(local)
    manifest = local / MANIFEST
    remote_manifest = f"{path}/{MANIFEST}"
    if manifest.is_file() and fs.get_file_info(remote_manifest).type == pafs.FileType.File:
        with fs.open_input_stream(remote_manifest) as f:
            if f.read() == manifest.read_bytes():
                return  # already published (a rerun of a finished stage)
    if fs.get_file_info(remote_manifest).type == pafs.FileType.File:
        fs.delete_file(remote_manifest)  # unpublish first: a half-replaced copy is never trusted
    fs.delete_dir_contents(path, missing_dir_ok=True)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p != manifest]
    for p in [*files, *([manifest] if manifest.is_file() else [])]:
        dest = f"{path}/{p.relative_to(local).as_posix()}"
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with open(p, "rb") as src, fs.open_output_stream(dest) as out:
            shutil.copyfileobj(src, out, 1 << 22)


def upload_file(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """One file to ``path`` on ``fs`` (object stores write whole objects: readers never see half of it)."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(path) as out:
        shutil.copyfileobj(src, out, 1 << 22)


def download_dir(fs: pafs.FileSystem, path: str, local: Path) -> Path:
    """Copy everything below ``path`` on ``fs`` into ``local`` (created); returns ``local``."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for info in _files(fs, path):
        dest = local / info.path[len(path.rstrip("/")) + 1:] if info.path != path else local / info.base_name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    return local


@contextlib.contextmanager
def localized(fs: pafs.FileSystem, path: str) -> Iterator[Path]:
    """``path`` on ``fs`` as a local directory for code that needs one (PEFT, numpy): the path itself on a
    local filesystem, else a temporary download removed afterwards."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="tclora-fetch-") as tmp:
        yield download_dir(fs, path, Path(tmp) / Path(path).name)


def _unreachable(uri: str, err: Exception, options: dict) -> StorageError:
    where = f" (run.storage_options: {sorted(options)})" if options else " (no run.storage_options set)"
    return StorageError(f"run.dir {uri!r}: the store cannot be used{where}: {err}")


@dataclass(frozen=True)
class RunStore:
    """Where a run's artefacts live (``uri``: the filesystem and ``root`` inside it) and the driver's
    working copy (``local``). ``remote`` is False when both are the same directory."""

    uri: str
    filesystem: pafs.FileSystem
    root: str
    local: Path
    remote: bool

    # -- naming ---------------------------------------------------------------------------------------
    def _inside(self, local_path: Path | str) -> bool:
        return Path(local_path).resolve().is_relative_to(self.local.resolve())

    def relative(self, local_path: Path | str) -> str:
        """``local_path`` (below ``self.local``) relative to the run, in POSIX form.

        Raises:
            ValueError: the path is not inside the run's working copy.
        """
        return Path(local_path).resolve().relative_to(self.local.resolve()).as_posix()

    def path(self, local_path: Path | str) -> str:
        """Path inside :attr:`filesystem` of a file or directory of the run: what remote processes get.

        On a local store a directory outside the run (a cluster stage shared by several runs, a test's
        fixture) is its own absolute path; on an object store it must be inside the run.

        Raises:
            ValueError: an object-store run asked for a path outside its working copy.
        """
        if not self.remote and not self._inside(local_path):
            return str(Path(local_path).resolve())
        rel = self.relative(local_path)
        return self.root if rel == "." else f"{self.root}/{rel}"

    def uri_of(self, local_path: Path | str) -> str:
        """``path`` as a URI (for logs and for readers that take URIs)."""
        if not self.remote and not self._inside(local_path):
            return str(Path(local_path).resolve())
        rel = self.relative(local_path)
        return self.uri if rel == "." else f"{self.uri.rstrip('/')}/{rel}"

    def ray_storage(self, local_path: Path | str) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for Ray Train / Tune ``RunConfig`` below this run."""
        if not self.remote:
            return str(Path(local_path).resolve()), None
        return self.path(local_path), self.filesystem

    # -- checks ---------------------------------------------------------------------------------------
    def check(self, options: dict | None = None) -> None:
        """Fail fast, before any Ray work: the store is reachable and writable (a probe object is written
        and deleted). A missing bucket is an error, never created silently.

        Raises:
            StorageError: naming ``run.dir`` and the underlying error.
        """
        self.local.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return
        probe = f"{self.root}/{STAGING}/probe-{uuid.uuid4().hex[:8]}"
        try:
            bucket = self.root.split("/", 1)[0]
            if not isinstance(self.filesystem, pafs.LocalFileSystem) and \
                    self.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"bucket {bucket!r} does not exist")
            self.filesystem.create_dir(probe.rsplit("/", 1)[0], recursive=True)
            with self.filesystem.open_output_stream(probe) as f:
                f.write(b"ok")
            self.filesystem.delete_file(probe)
        except (OSError, FileNotFoundError) as err:
            raise _unreachable(self.uri, err, options or {}) from None

    # -- transfers ------------------------------------------------------------------------------------
    def publish(self, local_path: Path | str) -> None:
        """Copy a finished stage directory (manifest last) or one file of the working copy to the store."""
        if not self.remote:
            return
        local_path = Path(local_path)
        if local_path.is_dir():
            upload_dir(local_path, self.filesystem, self.path(local_path))
        else:
            upload_file(local_path, self.filesystem, self.path(local_path))
        log.info("published %s", self.uri_of(local_path))

    def fetch(self, local_dir: Path | str | None = None) -> list[str]:
        """Pull finished stages (directories with a manifest) below ``local_dir`` (default: the whole run)
        that the working copy lacks; returns their run-relative paths. Whether one is reused is then
        decided as for any local stage, by its key and content hashes."""
        if not self.remote:
            return []
        local_dir = Path(local_dir) if local_dir is not None else self.local
        root = self.path(local_dir)
        if self.filesystem.get_file_info(root).type != pafs.FileType.Directory:
            return []
        manifests = [f.path for f in _files(self.filesystem, root)
                     if f.base_name == MANIFEST and f"/{STAGING}/" not in f.path]
        restored: list[str] = []
        for manifest in sorted(manifests, key=len):
            remote_dir = manifest[: -len(MANIFEST) - 1]
            rel = remote_dir[len(self.root) + 1:]
            local = self.local / rel
            if any(rel.startswith(done + "/") for done in restored) or (local / MANIFEST).exists():
                continue
            tmp = local.with_name(f".{local.name}.tmp-fetch")
            for stale in (tmp, local):  # a half-fetched copy, or a local directory with no manifest
                shutil.rmtree(stale, ignore_errors=True)
            download_dir(self.filesystem, remote_dir, tmp)
            if not (tmp / MANIFEST).is_file():  # unpublished between listing and download
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            tmp.replace(local)
            restored.append(rel)
        if restored:
            log.info("fetched %d finished stage(s) from %s: %s", len(restored), self.uri, ", ".join(restored))
        return restored

    def remove(self, local_path: Path | str) -> None:
        """Delete a directory of the run, in the working copy and on the store (missing is fine)."""
        local_path = Path(local_path)
        shutil.rmtree(local_path, ignore_errors=True)
        if self.remote:
            path = self.path(local_path)
            self.filesystem.delete_dir_contents(path, missing_dir_ok=True)
            if self.filesystem.get_file_info(path).type == pafs.FileType.Directory:
                self.filesystem.delete_dir(path)

    @contextlib.contextmanager
    def remote_output(self, local_dir: Path | str) -> Iterator[str]:
        """A path on :attr:`filesystem` for other processes to write ``local_dir``'s content into; on a
        clean exit that content is in ``local_dir`` on the driver. Locally it is ``local_dir`` itself; on a
        store, a fresh staging prefix pulled down and deleted afterwards (also on error)."""
        local_dir = Path(local_dir)
        if not self.remote:
            yield str(local_dir.resolve())
            return
        staging = f"{self.root}/{STAGING}/{uuid.uuid4().hex[:12]}/{local_dir.name}"
        try:
            yield staging
            download_dir(self.filesystem, staging, local_dir)
        finally:
            self.filesystem.delete_dir_contents(staging.rsplit("/", 1)[0], missing_dir_ok=True)


def open_run(run) -> RunStore:
    """The :class:`RunStore` of a config's ``run`` section (``dir``, ``local_dir``, ``storage_path``,
    ``storage_options``). Does not touch the store: call :meth:`RunStore.check` for that.

    Raises:
        StorageError: an unsupported scheme or bad storage options.
    """
    options = dict(run.storage_options or {})
    if is_uri(run.dir) and not run.dir.startswith("file://"):
        uri = run.dir.rstrip("/")
        local = Path(run.local_dir).expanduser() if run.local_dir else default_local_dir(uri)
    else:
        local = Path(run.dir[len("file://"):] if run.dir.startswith("file://") else run.dir).expanduser()
        uri = f"{run.storage_path.rstrip('/')}/{local.resolve().name}" if run.storage_path else str(local.resolve())
    fs, root = filesystem(uri, options)
    remote = not (isinstance(fs, pafs.LocalFileSystem) and Path(root) == local.resolve())
    return RunStore(uri=uri, filesystem=fs, root=root, local=local.resolve(), remote=remote)


def digest(fs: pafs.FileSystem, path: str) -> str:
    """sha256 of one file on ``fs`` (e.g. an eval split on a bucket), for stage keys."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def store_for(cfg, local_path: Path | str) -> RunStore:
    """The run's store when ``local_path`` lies in its working copy (what every stage is handed), else a
    plain local store rooted at ``local_path`` (a stage called on a directory of its own, as tests and the
    sweep's per-point homes outside run.dir do)."""
    store = open_run(cfg.run)
    try:
        store.relative(local_path)
        return store
    except ValueError:
        local = Path(local_path).resolve()
        return RunStore(uri=str(local), filesystem=pafs.LocalFileSystem(), root=str(local), local=local, remote=False)


@contextlib.contextmanager
def stage_dir_anywhere(store: RunStore, final: Path, key: dict, extra: dict | None = None) -> Iterator[Path]:
    """:func:`tclora.artifacts.stage_dir` for code that may run on another node (a Tune trial): in place
    for a local store; with an object store built in a local temp dir and published (manifest last) to
    ``store.path(final)``, for the driver to :meth:`RunStore.fetch`."""
    from tclora.artifacts import stage_dir

    if not store.remote:
        with stage_dir(final, key, extra) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="tclora-stage-") as scratch:
        local = Path(scratch) / Path(final).name
        with stage_dir(local, key, extra) as tmp:
            yield tmp
        upload_dir(local, store.filesystem, store.path(final))
