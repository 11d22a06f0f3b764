"""Adapters per hour: k cluster adapters fused, packed or concurrent through Ray Tune vs one after another.

    python -m benchmarks.bench_parallel_train                  # full size: 4 clusters, demo base, all four modes;
                                                               # ~10 min on a quiet 2-core machine
    python -m benchmarks.bench_parallel_train --smoke          # 2 clusters, tiny base, few steps
    python -m benchmarks.bench_parallel_train --clusters 2 --steps 100 --num-cpus 2
    python -m benchmarks.bench_parallel_train --modes sequential packed fused   # skip the slow concurrent mode

Both modes run the real train stage path (``pipelines.train.train_clusters``: a Tune function trainable per
cluster, each a ``TorchTrainer`` with one DeepSpeed worker on CPU) on the same k synthetic clusters, in one
process and one local Ray instance, back to back: ``sequential`` with ``train.max_concurrent=1``,
``concurrent`` with ``train.max_concurrent=k``, ``packed``: ``--clusters-per-run`` clusters (default: all k)
share one Train run (``train.clusters_per_run``), trained one after another (``train.fused=false``), as
many runs at a time as there are CPUs, and ``fused``: the same runs, each training its clusters' adapters
together in one forward/backward pass on one base copy (``train.fused=true``, :mod:`tclora.multi_lori`;
issue 16's target: >= 3x ``sequential``). Each worker reserves
``num_cpus / k - 0.1`` CPUs (at most 1) so k trials fit at once; every mode uses the same reservation.
At demo sizes a Train run is mostly fixed cost (trial and worker processes, imports, DeepSpeed
start-up, reading the cluster), which packing pays once per run; ``cluster_worker_seconds`` (inside
the worker) against ``cluster_wall_seconds`` (``TorchTrainer.fit``) shows how much.
A warm-up run (skipped with ``--smoke``) fills the OS file cache
and DeepSpeed's op cache first; ``--repeats`` alternates the order of the modes, and the load average
is recorded around each, because a shared machine's load drifts. Writes
``bench_parallel_train[_smoke].json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result

log = logging.getLogger("benchmarks.parallel_train")
TASKS = {  # one synthetic task per cluster: string functions a tiny char-level model can learn
    "copy": lambda w: w, "flip": lambda w: w[::-1], "upper": str.upper, "first": lambda w: w[0],
    "last": lambda w: w[-1], "double": lambda w: w + w, "length": lambda w: str(len(w)),
    "sorted": lambda w: "".join(sorted(w)),
}


def write_clusters(root: Path, k: int, rows: int, seed: int = 0) -> Path:
    """A finished cluster stage (``clusters/cluster=<id>/*.parquet`` + manifest with sizes), task i = cluster i."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tclora import artifacts

    rng, names = random.Random(seed), list(TASKS)[:k]
    sizes = {str(i): rows for i in range(k)}
    with artifacts.stage_dir(root / "cluster", {"bench": k, "rows": rows}, {"report": {"sizes": sizes}}) as tmp:
        for cid, name in enumerate(names):
            words = ["".join(rng.choices("abcdefghijklmnop", k=rng.randint(3, 7))) for _ in range(rows)]
            part = tmp / "clusters" / f"cluster={cid}"
            part.mkdir(parents=True)
            pq.write_table(pa.Table.from_pylist(
                [{"source": f"{name}: {w}", "target": TASKS[name](w), "task_name": name} for w in words]),
                part / "part-0.parquet")
    return root / "cluster"


def make_config(base: Path, args, cpus_per_worker: float, max_concurrent: int, fused: bool = False):
    from tclora.config import validate

    return validate({
        "run": {"seed": 0},
        "model": {"name_or_path": str(base), "max_length": 48},
        "lori": {"rank": 8, "alpha": 16.0, "sparsity": 0.9},
        "train": {"steps": args.steps, "sparse_steps": args.steps, "batch_size": args.batch_size, "lr": 3e-3,
                  "num_workers": 1, "cpus_per_worker": cpus_per_worker, "zero_stage": args.zero_stage,
                  "checkpoint_every": max(1, args.steps // 2), "max_concurrent": max_concurrent, "fused": fused},
    })


def time_mode(name: str, groups: list[list[int]], cfg, cluster_dir: Path, work: Path) -> dict:
    """Train every cluster once, one Train run per group, with this config's concurrency; wall time and
    per-cluster Train time."""
    from pipelines.train import train_clusters
    from tclora import artifacts

    ids = [c for g in groups for c in g]
    load_before, started = os.getloadavg()[0], time.perf_counter()
    concurrent = train_clusters(groups, cfg, cluster_dir, work)
    seconds = time.perf_counter() - started
    summaries = [artifacts.read_manifest(work / "adapters" / f"cluster-{c}")["summary"] for c in ids]
    out = {"mode": name, "max_concurrent": concurrent, "train_runs": len(groups), "seconds": round(seconds, 2),
           "adapters_per_hour": round(len(ids) * 3600 / seconds, 1),
           "cluster_wall_seconds": [s["wall_seconds"] for s in summaries],  # TorchTrainer.fit of its run
           "cluster_worker_seconds": [s["seconds"] for s in summaries],  # inside the worker: load + train
           "final_losses": [round(s["sparse_loss_last"], 4) for s in summaries], "fused": cfg.train.fused,
           "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    log.info("%s: %d adapters in %.1fs (%.1f adapters/hour)", name, len(ids), seconds, out["adapters_per_hour"])
    return out


COLORS = {"sequential": "#999999", "concurrent": "#3b7dd8", "packed": "#2a9d5c", "fused": "#d8723b"}
MODES = list(COLORS)


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bars = ax.bar([f"{m['mode']}\n{m['train_runs']} runs, {m['max_concurrent']} at a time" for m in modes],
                  [m["adapters_per_hour"] for m in modes], color=[COLORS[m["mode"]] for m in modes])
    for bar, m in zip(bars, modes):
        ax.annotate(f"{m['adapters_per_hour']:.0f}/h\n{m['seconds']:.0f}s", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("adapters per hour")
    ax.set_title(f"{result['config']['clusters']} LoRI adapters, {result['machine']['cpus']} CPUs: "
                 + ", ".join(f"{m} {x:.2f}x" for m, x in result["speedup"].items()) + " sequential", fontsize=9)
    ax.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = arg_parser(__doc__)
    p.add_argument("--clusters", type=int, default=None, help="k clusters/adapters (default 4; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per LoRI phase (default 60; smoke 4)")
    p.add_argument("--rows", type=int, default=None, help="rows per cluster (default 64; smoke 24)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2],
                   help="DeepSpeed ZeRO stage of every mode (fused needs 0: one worker, nothing to shard)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating which goes first")
    p.add_argument("--clusters-per-run", type=int, default=None,
                   help="clusters per Train run in the packed and fused modes (default: all k in one run)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES,
                   help="modes to time (sequential is always included: speed-ups are against it)")
    args = p.parse_args(argv)
    setup_logging()
    k = args.clusters or (2 if args.smoke else 4)
    if k > len(TASKS):
        p.error(f"--clusters: at most {len(TASKS)}")
    args.steps = args.steps or (4 if args.smoke else 60)
    rows = args.rows or (24 if args.smoke else 64)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from tclora.demo_base import DemoBaseSpec, build_demo_base

    # Smoke: the test suite's tiny base (seconds to build). Full: the demo base the pipeline uses.
    spec = DemoBaseSpec(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=60, batch=16, seq_len=64) \
        if args.smoke else DemoBaseSpec()
    base = build_demo_base(None, spec)
    num_cpus = args.num_cpus or os.cpu_count() or 2
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    cpus_per_worker = round(min(1.0, num_cpus / k - 0.1), 2)
    result = {"benchmark": "parallel_train", "smoke": args.smoke, "machine": machine_info(),
              "config": {"clusters": k, "rows_per_cluster": rows, "steps_per_phase": args.steps,
                         "batch_size": args.batch_size, "zero_stage": args.zero_stage, "ray_num_cpus": num_cpus,
                         "cpus_per_worker": cpus_per_worker, "num_workers": 1, "base": spec.__dict__}}
    with tempfile.TemporaryDirectory(prefix="bench-parallel-train-") as tmp:
        cluster_dir = write_clusters(Path(tmp), k, rows)
        ids = list(range(k))
        if not args.smoke:
            log.info("warm-up: one short run")
            warm = make_config(base, args, cpus_per_worker, 1).model_copy(deep=True)
            warm.train.steps = warm.train.sparse_steps = 2
            time_mode("warmup", [ids[:1]], warm, cluster_dir, Path(tmp) / "warmup")
        per_run = args.clusters_per_run or k  # one run, one base copy: start-up paid once
        packed = [ids[i : i + per_run] for i in range(0, k, per_run)]
        at_once = min(num_cpus, len(packed))
        every = {"sequential": ([[c] for c in ids], 1), "concurrent": ([[c] for c in ids], k),
                 "packed": (packed, at_once), "fused": (packed, at_once)}
        modes = [(name, *every[name]) for name in MODES if name == "sequential" or name in args.modes]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in modes}
        for rep in range(args.repeats):
            for name, groups, limit in modes[:: 1 if rep % 2 == 0 else -1]:
                work = Path(tmp) / f"{name}-{rep}"
                cfg = make_config(base, args, cpus_per_worker, limit, fused=name == "fused")
                runs[name].append(time_mode(name, groups, cfg, cluster_dir, work))
    ray.shutdown()
    result["runs"] = runs
    # The median run of each mode (by wall time) is the one reported and plotted.
    result["modes"] = [sorted(runs[m], key=lambda r: r["seconds"])[(len(runs[m]) - 1) // 2] for m in runs]
    by_mode = {m["mode"]: m for m in result["modes"]}
    seq = by_mode["sequential"]
    result["speedup"] = {name: round(seq["seconds"] / m["seconds"], 2) for name, m in by_mode.items()
                         if name != "sequential"}
    runs_of = f"{len(packed)} run{'s' * (len(packed) > 1)} of {per_run}"
    what = {"fused": (f"{runs_of} fused adapters, {at_once} at a time", ">= 3x", 3.0),
            "packed": (f"{runs_of} packed adapters, {at_once} at a time", ">= 1.6x", 1.6),
            "concurrent": (f"{k} unpacked runs at once", None, None)}
    result["headline"] = [
        headline(f"parallel train: {k} adapters, {what[name][0]} vs one after another", x,
                 f"{x:.2f}x ({by_mode[name]['adapters_per_hour']:.0f}/h vs {seq['adapters_per_hour']:.0f}/h)",
                 target=what[name][1], met=None if what[name][2] is None else x >= what[name][2])
        for name, x in sorted(result["speedup"].items(), key=lambda kv: MODES.index(kv[0]), reverse=True)]
    write_result(args.out, result_stem("parallel_train", args.smoke), result, plot)
    return result


if __name__ == "__main__":
    main()
