"""What every benchmark shares: the command line, machine facts, headline rows and atomic output.

A result JSON written through :func:`write_result` looks like::

    {"benchmark": "lori_params", "smoke": false, "machine": {...}, "config": {...},
     "headline": [{"metric": ..., "value": ..., "display": ..., "target": ..., "met": ...}, ...],
     ...the benchmark's own measurements...}

``headline`` is what ``benchmarks/readme_table.py`` turns into the README table; everything else is
for people reading the JSON. Timings on a shared machine are noisy: ``machine.load_avg`` is recorded
at the start and at the end of every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("benchmarks/results")


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """``--out`` and ``--smoke`` for every script; ``--help`` prints the script's docstring."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for JSON + PNG (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs, numbers mean little")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """CPU count, library versions, date and load: enough to tell two results' machines apart."""
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "processor": platform.processor() or platform.machine(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git_commit(),
    }


def headline(metric: str, value: float | int | str | None, display: str, *, target: str | None = None,
             met: bool | None = None) -> dict[str, Any]:
    """One README row: ``display`` is the value as shown, ``target`` the goal in words, ``met`` whether reached."""
    return {"metric": metric, "value": value, "display": display, "target": target, "met": met}


def result_stem(name: str, smoke: bool) -> str:
    return f"bench_{name}_smoke" if smoke else f"bench_{name}"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary sibling and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_result(out_dir: Path, stem: str, result: dict, plot: Callable[[dict, Path], None] | None = None) -> Path:
    """``<out_dir>/<stem>.json`` (and ``.png`` from ``plot(result, path)``), each written atomically.

    Prints the headline rows too, so every script ends with the lines the README table will show.
    """
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    out_dir = Path(out_dir)
    path = out_dir / f"{stem}.json"
    _atomic(path, lambda p: p.write_text(json.dumps(result, indent=2, default=str) + "\n"))
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        _atomic(out_dir / f"{stem}.png", lambda p: plot(result, p))
    logging.getLogger("benchmarks").info("wrote %s", path)
    print_headline(result.get("headline", []))
    return path


def print_headline(rows: list[dict[str, Any]]) -> None:
    """The headline rows as the README shows them, one per line."""
    width = max((len(r["metric"]) for r in rows), default=0)
    for r in rows:
        verdict = "" if r["met"] is None else ("met" if r["met"] else "MISSED")
        target = f"target {r['target']} {verdict}" if r["target"] else ""
        print(f"{r['metric']:{width}s}  {r['display']}  {target}".rstrip())
