"""Many tasks: the whole pipeline at k = 100 clusters with bounded driver memory, side by side with k = 10.

    python -m benchmarks.bench_scale                      # k = 10 and k = 100, 100 synthetic tasks
    python -m benchmarks.bench_scale --smoke              # k = 2 and k = 8, 8 tasks: checks the script runs
    python -m benchmarks.bench_scale --ks 10 100 --rows-per-task 40 --steps 2

A synthetic corpus of ``--tasks`` string-function tasks (one JSONL file, ``rows-per-task`` rows each,
plus a one-example-per-task test split) goes through the real driver, ``pipelines.run.run``: Ray Data
embed -> cluster at each k -> one LoRI adapter per cluster through Ray Tune + Ray Train + DeepSpeed
(very few steps: this measures the plumbing, not quality; ``--clusters-per-run`` small clusters share
one Train run, so worker start-up is paid per run, not per cluster) -> merge (factored CP and linear, never a
dense delta stack) and eval in the merge actor. A thread samples the driver's resident memory every
0.2 s. The driver holds no per-row Python objects (rows live in Ray Data blocks and Parquet; the
driver reads counts from manifests) and no adapter weights (the merge actor loads factors), so its
peak should not grow with k: the headline is the ratio of the driver's peak RSS at the largest k to
that at the smallest. Both runs share one Ray instance and one embed stage; each k gets its own run
directory for cluster/train/merge. Writes ``bench_scale[_smoke].json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result

log = logging.getLogger("benchmarks.scale")
OPS = {  # string functions; task i applies OPS[i % len(OPS)] after a task-specific shift of the letters
    "copy": lambda w: w, "flip": lambda w: w[::-1], "upper": str.upper, "first": lambda w: w[0],
    "double": lambda w: w + w, "sorted": lambda w: "".join(sorted(w)),
}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _task_row(task: int, rng: random.Random) -> dict:
    shift, op = task // len(OPS), list(OPS)[task % len(OPS)]
    word = "".join(rng.choices(ALPHABET[:12], k=rng.randint(3, 6)))
    shifted = "".join(ALPHABET[(ALPHABET.index(c) + shift) % 26] for c in word)
    # The task name in the prompt makes each task its own topic for the sentence embedder.
    return {"source": f"task {task} ({op}, shift {shift}): {word}", "target": OPS[op](shifted),
            "task_name": f"task-{task}"}


def write_corpus(root: Path, tasks: int, rows_per_task: int, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` (tasks x rows_per_task rows) and ``test.jsonl`` (one row per task)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "train.jsonl", root / "test.jsonl"
    for path, n in zip(paths, (rows_per_task, 1)):
        with path.open("w") as f:
            for task in range(tasks):
                for _ in range(n):
                    f.write(json.dumps(_task_row(task, rng)) + "\n")
    return paths


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_config(run_dir: Path, train: Path, test: Path, base: Path, k: int, args):
    from tclora.config import validate

    return validate({
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"path": str(train), "eval_paths": [str(test)]},
        "model": {"name_or_path": str(base), "max_length": 48},
        "cluster": {"k": k, "min_cluster_size": 1, "sample_fraction": 1.0},
        "lori": {"rank": 4, "alpha": 8.0, "sparsity": 0.9, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": args.steps, "sparse_steps": args.steps, "batch_size": 8, "lr": 3e-3,
                  "checkpoint_every": 1000, "max_concurrent": args.max_concurrent, "cpus_per_worker": 1.0,
                  "clusters_per_run": args.clusters_per_run},
        "merge": {"methods": ["cp", "linear"], "cp_iters": 20},
        "eval": {"batch_size": 64, "max_new_tokens": 8},
    })


def run_at(k: int, root: Path, train: Path, test: Path, base: Path, args) -> dict:
    """One full pipeline run at ``k`` clusters; the embed stage is shared through a symlinked directory."""
    from pipelines.run import run

    run_dir = root / f"k{k}"
    run_dir.mkdir(parents=True, exist_ok=True)
    shared_embed = root / "embed"
    if shared_embed.exists() and not (run_dir / "embed").exists():
        shutil.copytree(shared_embed, run_dir / "embed")  # the same stage, reused: this k embeds nothing
    cfg = make_config(run_dir, train, test, base, k, args)
    with PeakRSS() as rss:
        started = time.perf_counter()
        metrics = run(cfg)
        seconds = time.perf_counter() - started
    if not shared_embed.exists():
        shutil.copytree(run_dir / "embed", shared_embed)
    trained = json.loads((run_dir / "train" / "train_report.json").read_text())
    out = {"k": k, "clusters_trained": len(trained["clusters"]), "seconds": round(seconds, 1),
           "driver_peak_rss_mib": round(rss.peak / 2**20, 1),
           "stages": {name: s["wall_seconds"] for name, s in metrics["stages"].items()},
           "scores": {name: e.get("mean") for name, e in metrics["eval"].items()}}
    log.info("k=%d: %d adapters, %.0fs, driver peak RSS %.0f MiB", k, out["clusters_trained"], seconds,
             out["driver_peak_rss_mib"])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [f"k={r['k']}" for r in runs]
    left.bar(labels, [r["driver_peak_rss_mib"] for r in runs], color="#3b7dd8")
    left.set_ylabel("driver peak RSS (MiB)")
    left.set_title("driver memory", fontsize=10)
    bottom = [0.0] * len(runs)
    for stage in runs[0]["stages"]:
        heights = [r["stages"][stage] for r in runs]
        right.bar(labels, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    right.set_ylabel("wall seconds")
    right.set_title("stage wall time", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(f"{result['config']['tasks']} tasks, {result['config']['rows']} rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(__doc__)
    p.add_argument("--ks", type=int, nargs="+", default=None, help="cluster counts (default 10 100; smoke 2 8)")
    p.add_argument("--tasks", type=int, default=None, help="synthetic tasks (default max k)")
    p.add_argument("--rows-per-task", type=int, default=None, help="training rows per task (default 30; smoke 12)")
    p.add_argument("--steps", type=int, default=1, help="steps per LoRI phase (default 1: plumbing, not quality)")
    p.add_argument("--max-concurrent", type=int, default=2, help="Train runs at once (default 2)")
    p.add_argument("--clusters-per-run", type=int, default=10,
                   help="clusters packed into one Train run (train.clusters_per_run, default 10)")
    args = p.parse_args(argv)
    setup_logging()
    ks = sorted(args.ks or ([2, 8] if args.smoke else [10, 100]))
    tasks = args.tasks or max(ks)
    rows_per_task = args.rows_per_task or (12 if args.smoke else 30)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from tclora.demo_base import DemoBaseSpec, build_demo_base

    base = build_demo_base(None, DemoBaseSpec(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=60,
                                              batch=16, seq_len=64))
    ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    result = {"benchmark": "scale", "smoke": args.smoke, "machine": machine_info(),
              "config": {"ks": ks, "tasks": tasks, "rows_per_task": rows_per_task, "rows": tasks * rows_per_task,
                         "steps_per_phase": args.steps, "max_concurrent": args.max_concurrent,
                         "clusters_per_run": args.clusters_per_run}}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        train, test = write_corpus(Path(tmp) / "corpus", tasks, rows_per_task)
        result["runs"] = [run_at(k, Path(tmp), train, test, base, args) for k in ks]
    ray.shutdown()
    small, large = result["runs"][0], result["runs"][-1]
    ratio = round(large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 3)
    result["driver_rss_ratio"] = ratio
    result["headline"] = [
        headline(f"scale: driver peak RSS, k={large['k']} vs k={small['k']}", ratio,
                 f"{ratio:.2f}x ({large['driver_peak_rss_mib']:.0f} vs {small['driver_peak_rss_mib']:.0f} MiB)",
                 target="bounded (<= 1.2x)", met=ratio <= 1.2),
        headline(f"scale: k={large['k']} end to end ({args.steps}+{args.steps} steps per adapter)",
                 large["seconds"], f"{large['seconds']:.0f} s, {large['clusters_trained']} adapters"),
    ]
    write_result(args.out, result_stem("scale", args.smoke), result, plot)
    return result


if __name__ == "__main__":
    main()
