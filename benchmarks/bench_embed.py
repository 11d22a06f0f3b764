"""Ray Data embed stage vs plain ``SentenceTransformer.encode`` on the same rows, in the same run.

    python benchmarks/bench_embed.py                      # 16k rows, 1 and 2 actors: a few minutes on 2 cores
    python benchmarks/bench_embed.py --rows 2000 --actors 1
    python benchmarks/bench_embed.py --rows 100000 --no-chunked --repeats 1   # ~35 min on 2 cores

Writes a JSONL corpus of ``--rows`` synthetic sentences (mixed lengths), then times
- ``plain``: one in-process ``Embedder.encode`` over all sources (model load timed separately), once
  before and once after the Ray runs (the machine's speed drifts; ratios use the mean, both are kept);
- ``plain_chunked``: the same, one ``encode`` call per ``--batch-size`` rows, as the embed actor calls it
  (sentence-transformers sorts by length within a call), without Ray;
- ``ray_<n>``: ``pipelines.embed.run_embed`` with ``embed.num_actors = n``, each run on a fresh local Ray
  with the machine's CPUs (``--repeats`` runs per mode, ABBA order, mean reported): validation scan +
  read -> validate -> embed (actor pool) -> Parquet write, end to end,
  and its embed pass alone (``seconds_embed`` in the manifest, which includes actor start and model load),
  with each actor's own timings from the manifest (model load, encode wall and CPU seconds).
Ratios are Ray rows/s over plain rows/s (the design note's naive ``from_items`` pipeline reached 0.6x).
Writes ``bench_embed_<rows>.json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from tclora.config import EmbedSection

WORDS = ("model data cluster adapter merge train token layer vector sample batch query answer task "
         "river market garden engine planet music recipe league theorem protein contract weather").split()


def synthetic_corpus(path: Path, rows: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sources = [" ".join(rng.choices(WORDS, k=rng.randint(6, 40))).capitalize() + "." for _ in range(rows)]
    with open(path, "w") as f:
        for i, s in enumerate(sources):
            f.write(json.dumps({"source": s, "target": str(i), "task_name": f"t{i % 8}"}) + "\n")
    return sources


def time_plain(sources: list[str], model: str, chunk: int | None = None) -> dict:
    """One in-process ``Embedder``: model load, then ``encode`` over all sources in one call or, with
    ``chunk``, one call per ``chunk`` rows as the embed actor calls it (each call sorts its own rows by
    length). Each run loads a fresh model, so warm-up and run order show in the difference too: in one
    warmed-up process, alternating the two, chunks of 500 or 2048 rows were no slower (issue 16)."""
    from tclora.embed import Embedder

    started = time.perf_counter()
    embedder = Embedder(model, device="cpu")
    loaded = time.perf_counter()
    for i in range(0, len(sources), chunk or len(sources)):
        embedder.encode(sources[i : i + (chunk or len(sources))], batch_size=64)
    done = time.perf_counter()
    return {"load_seconds": round(loaded - started, 2), "seconds": round(done - loaded, 2),
            "rows_per_s": round(len(sources) / (done - loaded), 1), **({"chunk": chunk} if chunk else {})}


def time_ray(corpus: Path, rows: int, actors: int, batch_size: int, run_dir: Path) -> dict:
    """One embed stage as ``tclora run`` starts it: a fresh local Ray (started outside the timing), so
    Ray Data's own start-up (its stats and coordinator actors, the first task's worker) is paid each time."""
    import ray

    from pipelines.embed import run_embed
    from tclora.config import validate

    cfg = validate({"embed": {"num_actors": actors, "batch_size": batch_size}})
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        started = time.perf_counter()
        out = run_embed(cfg, run_dir, str(corpus)).dir
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "seconds_scan": manifest["seconds_scan"], "seconds_embed_pass": manifest["seconds_embed"],
            "rows_per_s_embed_pass": round(rows / manifest["seconds_embed"], 1), "actors": manifest["actors"]}


def _mean_run(runs: list[dict], rows: int) -> dict:
    """The mean of repeated runs of one mode (seconds and rows/s from the mean), each run kept."""
    mean = lambda key: round(sum(r[key] for r in runs) / len(runs), 2)  # noqa: E731
    seconds, embed_pass = mean("seconds"), mean("seconds_embed_pass")
    return {"seconds": seconds, "rows_per_s": round(rows / seconds, 1), "seconds_scan": mean("seconds_scan"),
            "seconds_embed_pass": embed_pass, "rows_per_s_embed_pass": round(rows / embed_pass, 1), "runs": runs}


def plot(result: dict, path: Path) -> None:
    """Seconds end to end, model load included, as the overhead target counts them; the dashed line is
    plain ``encode`` + 10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = result["runs"]["plain"]
    plain_total = plain["load_seconds"] + plain["seconds"]
    bars = {"plain": plain_total}
    if "plain_chunked" in result["runs"]:
        bars["plain_chunked"] = plain["load_seconds"] + result["runs"]["plain_chunked"]["seconds"]
    bars.update({n: r["seconds"] for n, r in result["runs"].items() if n.startswith("ray_")})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(bars), list(bars.values()), color=["tab:gray" if n.startswith("plain") else "tab:blue" for n in bars])
    ax.axhline(1.1 * plain_total, color="tab:red", linestyle="--", linewidth=1, label="plain + 10%")
    ax.set_ylabel("seconds, model load included")
    ax.set_title(f"{result['rows']} rows, {result['cpus']} CPUs", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16_000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=EmbedSection().batch_size,
                        help="rows per map_batches call (default: embed.batch_size)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each Ray mode, in ABBA order; the JSON keeps each and reports their mean")
    parser.add_argument("--no-chunked", action="store_true",
                        help="skip plain_chunked (the sort-by-length diagnostic; saves one plain run at 100k rows)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from pipelines.embed import pool_size

    cpus = len(os.sched_getaffinity(0))
    result = {"rows": args.rows, "batch_size": args.batch_size, "cpus": cpus, "load_before": os.getloadavg(),
              "auto_actors": pool_size("auto", 0.0, args.rows, args.batch_size, {"CPU": cpus}),  # the default's pick
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = synthetic_corpus(work / "corpus.jsonl", args.rows)
        # Plain encode before and after the Ray runs: the machine's speed drifts (up to 1.8x within
        # minutes on a shared 2-core box), so the ratio uses their mean and the JSON keeps both.
        first = time_plain(sources, args.model)
        print("plain (first)", first, flush=True)
        if not args.no_chunked:
            result["runs"]["plain_chunked"] = time_plain(sources, args.model, args.batch_size)
            print("plain_chunked", result["runs"]["plain_chunked"], flush=True)
        # Ray runs in ABBA order (1, 2, 2, 1 actors, ...), so a drift in the machine's speed hits both alike.
        repeats: dict[int, list[dict]] = {n: [] for n in args.actors}
        for rep in range(args.repeats):
            for n in args.actors if rep % 2 == 0 else args.actors[::-1]:
                run_dir = work / f"run-{n}-{rep}"
                repeats[n].append(time_ray(work / "corpus.jsonl", args.rows, n, args.batch_size, run_dir))
                print(f"ray {n} actor(s), run {rep + 1}", repeats[n][-1], flush=True)
        ray_runs = {f"ray_{n}_actor{'s' if n > 1 else ''}": _mean_run(runs, args.rows) for n, runs in repeats.items()}
        last = time_plain(sources, args.model)
        print("plain (last)", last, flush=True)
        # The first run's load is the cold one (imports and all), as each Ray actor's is; the last
        # reuses this process's imports, so only encoding is averaged.
        plain = {"load_seconds": first["load_seconds"], "seconds": round((first["seconds"] + last["seconds"]) / 2, 2)}
        plain.update(rows_per_s=round(args.rows / plain["seconds"], 1), first=first, last=last)
        result["runs"]["plain"] = plain
        for name, run in ray_runs.items():
            run["ratio_vs_plain"] = round(run["rows_per_s"] / plain["rows_per_s"], 3)
            run["ratio_embed_pass_vs_plain"] = round(run["rows_per_s_embed_pass"] / plain["rows_per_s"], 3)
            # The measure: the whole stage against plain encode with its model load.
            run["overhead_vs_plain"] = round(run["seconds"] / (plain["load_seconds"] + plain["seconds"]) - 1, 3)
            result["runs"][name] = run
            print(name, run, flush=True)
    result["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_embed_{args.rows}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
