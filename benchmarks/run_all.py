"""``make bench``: run every benchmark in turn, each in its own process, then regenerate the README table.

    python -m benchmarks.run_all                          # full sizes: tens of minutes on 2 cores
    python -m benchmarks.run_all --smoke                  # every script at smoke size: a few minutes
    python -m benchmarks.run_all --smoke --only lori_params merge_quality
    make bench ARGS="--smoke"

A separate process per benchmark keeps one script's threads, Ray instance or memory from skewing the
next one's timings. A benchmark that fails is reported and the others still run; the exit status is 1
if any failed. Scripts not present in this checkout are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import readme_table
from benchmarks.common import DEFAULT_OUT, REPO, setup_logging

log = logging.getLogger("benchmarks.run_all")

# name -> (module, extra args at full size, args at smoke size). Not every script has --smoke.
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "lori_params": ("benchmarks.bench_lori_params", [], ["--smoke"]),
    "merge_quality": ("benchmarks.bench_merge_quality", [], ["--smoke"]),
    "cp_merge": ("benchmarks.bench_cp_merge", [], ["--smoke"]),
    "embed": ("benchmarks.bench_embed", [], ["--rows", "2000", "--actors", "1"]),
    "kmeans": ("benchmarks.bench_kmeans", ["--rows", "1000000"], ["--rows", "20000", "--skip", "sklearn_sample"]),
    "parallel_train": ("benchmarks.bench_parallel_train", [], ["--smoke"]),
    "scale": ("benchmarks.bench_scale", [], ["--smoke"]),
    "demo": ("benchmarks.bench_demo", [], ["--smoke"]),
    "demo_fresh": ("benchmarks.bench_demo", ["--fresh"], ["--smoke", "--fresh"]),  # pre-trains the base: ~8 min
    "cluster_scale": ("benchmarks.bench_cluster_scale", [], ["--smoke"]),  # full: 1M and 10M rows, ~18 GiB of disk
}


def run_one(name: str, out: Path, smoke: bool) -> tuple[str, float]:
    """Run one benchmark script as ``python -m``; returns its status and seconds."""
    module, full_args, smoke_args = BENCHMARKS[name]
    if importlib.util.find_spec(module) is None:
        return "missing", 0.0
    cmd = [sys.executable, "-m", module, "--out", str(out), *(smoke_args if smoke else full_args)]
    log.info("%s: %s", name, " ".join(cmd[1:]))
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=REPO).returncode
    return ("ok" if code == 0 else f"failed (exit {code})"), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run every benchmark at its smoke size")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                   help=f"run only these: {', '.join(BENCHMARKS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--no-readme", action="store_true", help="do not regenerate the README table afterwards")
    args = p.parse_args(argv)
    setup_logging()
    out = args.out if args.out.is_absolute() else REPO / args.out  # scripts run with cwd = repo root

    status = {name: run_one(name, out, args.smoke) for name in (args.only or BENCHMARKS)}
    print("\nbenchmark        status              seconds")
    for name, (state, seconds) in status.items():
        print(f"{name:16s} {state:19s} {seconds:7.0f}"
              + ("   (script not in this checkout)" if state == "missing" else ""))
    if not args.no_readme:
        readme_table.main(["--results", str(out)])
    return int(any(state.startswith("failed") for state, _ in status.values()))


if __name__ == "__main__":
    sys.exit(main())
