"""Regenerate the README's benchmark table from ``benchmarks/results/*.json``: never typed by hand.

    python -m benchmarks.readme_table                         # rewrites README.md between the markers
    python -m benchmarks.readme_table --results /tmp/r --readme /tmp/README.md

The table goes between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in the README. Without the
markers the README is left alone: the table is printed with a note saying where to put them.

One row per headline metric of every result file: the ``headline`` list that scripts writing through
``benchmarks.common.write_result`` include; for result files without one (older scripts), a few fields
are picked out below in :data:`LEGACY`. Smoke results are listed only while a benchmark has no full-size
result; each row names its machine (CPUs, torch, load average) and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import DEFAULT_OUT, REPO, headline

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
HEADER = ["benchmark", "metric", "result", "target", "met", "machine", "date"]


# --------------------------------------------------------------------------------------------------
# Result files that predate the ``headline`` convention: the numbers that matter, picked out by name.


def _cp_merge(r: dict) -> list[dict]:
    p = r["projection"]
    wall, cpu = (p, None) if "speedup" in p else (p["wall"], p.get("cpu"))  # older files: wall clock only
    first = r["modules"][0]
    check = first.get("fit_check") or {"factored": first["factored_fit"], "dense": first["dense_fit"]}
    layers = r["config"]["layers"]
    return [headline("CP-ALS whole model: factored vs dense tensorly (dense extrapolated)", wall["speedup"],
                     f"{wall['speedup']:.0f}x wall" + (f", {cpu['speedup']:.0f}x CPU" if cpu else "")
                     + f" ({wall['factored_s'] / 60:.1f} min vs {wall['dense_s'] / 3600:.1f} h); fit on "
                     f"{first['module']}: {check['factored']:.4f} vs {check['dense']:.4f}",
                     target=">= 50x at the same fit", met=wall["speedup"] >= 50),
            headline(f"CP-ALS whole model, factored ({layers} layers x {len(r['modules'])} modules, one layer "
                     "measured)", wall["factored_s"], f"{wall['factored_s']:.0f} s wall",
                     target="<= 60 s on 2 CPU cores", met=wall["factored_s"] <= 60 if not r.get("smoke") else None)]


def _embed(r: dict) -> list[dict]:
    plain = r["runs"]["plain"]
    plain_total = plain["load_seconds"] + plain["seconds"]  # Ray's actors load the model inside its timing
    rows = []
    for name, run in r["runs"].items():
        if not name.startswith("ray_"):  # plain and plain_chunked: the references, not the stage
            continue
        overhead = run["seconds"] / plain_total - 1
        # The target is the default's (embed.num_actors auto: the pool size bench_embed records); other pool
        # sizes are shown beside it. Files from before auto existed ran the default of then, one actor.
        default = name == f"ray_{r.get('auto_actors', 1)}_actor{'s' if r.get('auto_actors', 1) > 1 else ''}"
        rows.append(headline(
            f"embed: {name}{' (the default here)' if default else ''} vs plain encode, {r['rows']} rows",
            round(overhead, 3),
            f"{overhead:+.1%} time end to end, model load in both ({run['seconds']:.0f} vs {plain_total:.0f} s: "
            f"{run['rows_per_s']:.0f} vs {plain['rows_per_s']:.0f} rows/s encoding alone); embed pass "
            f"{run['seconds_embed_pass'] / plain_total - 1:+.1%}",
            target="Ray Data overhead <= 10%" if default else None, met=overhead <= 0.10 if default else None))
    one, two = r["runs"].get("ray_1_actor"), r["runs"].get("ray_2_actors")
    if one and two and r.get("auto_actors", 1) >= 2:  # judged where the default would start two
        ratio = two["seconds"] / one["seconds"]
        rows.append(headline(
            f"embed: 2 actors vs 1, {r['rows']} rows, {r['cpus']} CPUs", round(ratio, 3),
            f"{ratio:.2f}x the time ({two['seconds']:.0f} vs {one['seconds']:.0f} s)",
            target="2 actors not slower than 1", met=ratio <= 1.0))
    return rows


def _kmeans(r: dict) -> list[dict]:
    t, ref = r["methods"]["tclora"], r["methods"].get("sklearn_full", {})
    at_target_size = r["rows"] == 1_000_000  # the docstring's target is stated for 1M rows
    ratio = t.get("inertia_ratio")
    met = (t["seconds"] <= 15 and ratio is not None and ratio <= 1.005) if at_target_size else None
    return [headline(f"k-means fit + assign, {r['rows']} x {r['dim']}, k={r['k']}", t["seconds"],
                     f"{t['seconds']:.1f} s" + (f" (sklearn KMeans {ref['seconds']:.1f} s)" if ref else "")
                     + (f", inertia {ratio:.4f} x sklearn" if ratio else ""),
                     target="<= 15 s and inertia <= 1.005x at 1M rows", met=met)]


LEGACY: dict[str, Callable[[dict], list[dict]]] = {"cp_merge": _cp_merge, "embed": _embed, "kmeans": _kmeans}


# --------------------------------------------------------------------------------------------------


def bench_name(path: Path) -> str:
    """``bench_embed_16000.json`` -> ``embed``; ``bench_cp_merge_smoke.json`` -> ``cp_merge``."""
    return re.sub(r"(_smoke)?(_\d+)?$", "", path.stem.removeprefix("bench_"))


def is_smoke(path: Path, r: dict) -> bool:
    return bool(r.get("smoke")) or path.stem.endswith("_smoke")


def machine(r: dict) -> str:
    m = r.get("machine") or r.get("environment") or {}
    cpus = m.get("cpus_usable") or m.get("cpus") or r.get("cpus")
    load = m.get("load_avg_start") or r.get("load_before") or m.get("load_average_1min")
    load = [load] if isinstance(load, (int, float)) else load
    end = m.get("load_avg_end") or r.get("load_after")  # 1-minute load average when the run finished
    shown = f"load {load[0]:.0f}" + (f"→{end[0]:.0f}" if end else "") if load else None
    parts = [f"{cpus} CPUs" if cpus else None, f"torch {m['torch']}" if m.get("torch") else None, shown]
    return ", ".join(p for p in parts if p) or "?"


def date(path: Path, r: dict) -> str:
    """When the result was measured: its own record, else when git last committed the file (a checkout
    sets every file's mtime to the time of the clone), else, uncommitted or outside git, the file's mtime."""
    when = (r.get("machine") or {}).get("date")
    if when:
        return when[:16].replace("T", " ")
    try:
        git = ["git", "-C", str(path.parent)]
        unchanged = not subprocess.run([*git, "diff", "--quiet", "HEAD", "--", path.name],
                                       capture_output=True).returncode
        committed = subprocess.run([*git, "log", "-1", "--format=%cI", "--", path.name], capture_output=True,
                                   text=True).stdout.strip()
    except OSError:  # no git
        unchanged, committed = False, ""
    if unchanged and committed:
        return dt.datetime.fromisoformat(committed).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M") + " (commit)"
    mtime = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
    return mtime.strftime("%Y-%m-%d %H:%M") + " (file)"


def rows_of(path: Path, r: dict) -> list[dict]:
    name = bench_name(path)
    if "headline" in r:
        heads = r["headline"]
    elif name in LEGACY:
        try:
            heads = LEGACY[name](r)
        except (KeyError, TypeError, IndexError) as err:
            heads = [headline("?", None, f"unreadable ({type(err).__name__}: {err}); see {path.name}")]
    else:
        heads = [headline("?", None, f"no `headline` in {path.name}")]
    label = name + (" (smoke)" if is_smoke(path, r) else "")
    rows = []
    for h in heads:  # a row of a combined result may name the run it came from (``run_machine``)
        run = {"machine": h.pop("run_machine")} if h.get("run_machine") else r
        rows.append({**h, "benchmark": label, "machine": machine(run), "date": date(path, run)})
    return rows


def collect(results_dir: Path) -> list[dict]:
    """Rows of every result file; a benchmark's smoke results are dropped once it has a full-size one."""
    loaded = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            loaded.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError as err:
            print(f"skipping {path}: not JSON ({err})", file=sys.stderr)
    full = {bench_name(p) for p, r in loaded if not is_smoke(p, r)}
    return [row for p, r in loaded if not (is_smoke(p, r) and bench_name(p) in full) for row in rows_of(p, r)]


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict], results_dir: Path) -> str:
    met = {True: "yes", False: "**no**", None: ""}
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [r["benchmark"], r["metric"], r["display"], r.get("target") or "", met[r.get("met")], r["machine"],
                 r["date"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if not rows:
        lines.append("| (no results yet: `make bench`) |" + " |" * (len(HEADER) - 1))
    try:
        where = Path(results_dir).resolve().relative_to(REPO)
    except ValueError:
        where = results_dir
    return "\n".join([f"<!-- generated by `python -m benchmarks.readme_table` from {where}/*.json: "
                      "do not edit by hand -->",
                      *lines])


def update_readme(readme: Path, table: str) -> bool:
    """Replace the text between the markers; False (README untouched) when they are missing."""
    text = readme.read_text() if readme.is_file() else ""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return False
    new = text[: start + len(START)] + "\n" + table + "\n" + text[end:]
    if new != text:
        readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=DEFAULT_OUT,
                   help=f"directory of result JSON (default {DEFAULT_OUT})")
    p.add_argument("--readme", type=Path, default=REPO / "README.md", help="README to update (default the repo's)")
    args = p.parse_args(argv)
    table = render(collect(args.results), args.results)
    if update_readme(args.readme, table):
        print(f"updated the benchmark table in {args.readme}")
    else:
        print(table)
        print(f"\n{args.readme} has no '{START}' ... '{END}' markers: the table above was not written. "
              f"Add both markers, each on its own line, where the table should go, then rerun "
              f"`python -m benchmarks.readme_table`.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
