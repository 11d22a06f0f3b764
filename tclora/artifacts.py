"""Atomic stage directories with content-hashed manifests.

Every stage writes into a temporary sibling directory and renames it into place when complete, then a
``manifest.json`` records what it was computed from (config hash, input hashes) and the sha256 of every
file it wrote. A stage is skipped only when its manifest matches *and* its files still hash the same, so
a crash never leaves behind an output that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def short_hash(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys; values
    JSON cannot hold are written as ``str``). The one hash behind stage keys, cache and directory names:
    a name that must stay stable keeps its ``length`` (8, 12 or 16 today)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class StageResult:
    """What every stage function returns: its finished directory, and whether it was reused as found
    (its manifest matched) rather than computed by this call."""

    dir: Path
    reused: bool


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (manifest excluded), keyed by relative path."""
    root = Path(root)
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def tree_digest(root: Path) -> str:
    """One hash for a whole directory: what a downstream stage records as its input."""
    manifest = read_manifest(root)
    return short_hash(manifest["outputs"] if manifest else hash_tree(root))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path, ignore: Any = None) -> None:
    """``dst`` as a copy of the tree ``src`` made of hard links where possible: a finished adapter moves
    on (checkpoint, stage staging, the stage) without its bytes being copied again. Safe because
    finished files are never written in place (see :func:`atomic_write_bytes`); ``ignore`` as in
    :func:`shutil.copytree`."""
    shutil.copytree(src, dst, copy_function=_link_or_copy, ignore=ignore, dirs_exist_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_manifest(stage: Path) -> dict | None:
    path = Path(stage) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(stage: Path, key: dict[str, Any]) -> bool:
    """True when ``stage`` finished with the same ``key`` (config hash, inputs) and its files are intact."""
    manifest = read_manifest(stage)
    if manifest is None or manifest.get("key") != key:
        return False
    return hash_tree(stage) == manifest.get("outputs")


@contextmanager
def stage_dir(final: Path, key: dict[str, Any], extra: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success hash it, write the manifest and rename it to ``final``.

    ``extra`` (a dict the caller may fill while inside the block) is stored in the manifest too.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed attempt are never trusted or reused (one driver owns a run directory).
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    started = time.time()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = {
        "key": key,
        "outputs": hash_tree(tmp),
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    if final.exists():
        # A stale or corrupt earlier attempt: move it aside first so the rename below stays atomic.
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
