"""``tclora`` command line: run the pipeline, inspect configs and merge methods.

    tclora run --config configs/demo.yaml --set cluster.k=4 --set merge.cp_rank=8
    tclora config --config configs/demo.yaml          # print the resolved config
    tclora merge-methods                              # registered merge methods and parameters
    tclora sweep --config configs/demo.yaml --k 2,4,8 --cp-rank 2,4,8   # Ray Tune over k, R, sparsity
"""

from __future__ import annotations

import argparse
import logging
import sys

from tclora.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: built-in defaults, i.e. the demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set cluster.k=4 --set merge.methods=[cp,ties]")


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import run  # the Ray layer is imported only by the commands that need it

    run(load_config(args.config, args.overrides))
    return 0


def _csv(kind):
    """argparse type for comma-separated values: ``2,4,8``."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.sweep import sweep

    sweep(load_config(args.config, args.overrides), args.k, args.cp_rank, args.sparsity, search=args.search,
          num_samples=args.num_samples, metric=args.metric, split=args.split, max_concurrent=args.max_concurrent)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(load_config(args.config, args.overrides).model_dump(mode="json"), sort_keys=False))
    return 0


def _cmd_merge_methods(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from tclora.merge import registry

    rows = []
    for name in registry.names():
        spec = registry.get(name)
        params = ", ".join(f"{p.name}={p.default!r}" for p in spec.params)
        rows.append([name, spec.default_weights, params, spec.reference_url])
    print(tabulate(rows, headers=["method", "default weights", "parameters", "reference"]))
    return 0


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from tclora.demo_corpus import build_demo_corpus

    paths = build_demo_corpus(args.out, train_per_task=args.train_per_task, eval_per_task=args.eval_per_task,
                              seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tclora",
        description="Cluster a multi-task corpus, train one LoRI adapter per cluster on Ray, and merge them "
        "with TC-LoRA's joint CP decomposition (plus linear, cat, TIES, DARE, SVD and KnOTS baselines).",
        epilog="Submit to a cluster: ray job submit --working-dir . -- tclora run --config configs/phi3-flan.yaml",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="embed -> cluster -> train -> merge + eval, reusing finished stages")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("sweep", help="Ray Tune over cluster count k, CP rank R and LoRI sparsity s, reusing stages")
    _add_config_args(p)
    p.add_argument("--k", type=_csv(int), help="cluster counts, e.g. 2,4,8 (default: cluster.k)")
    p.add_argument("--cp-rank", type=_csv(int), help="CP ranks, e.g. 2,4,8 (default: merge.cp_rank)")
    p.add_argument("--sparsity", type=_csv(float), help="LoRI sparsities, e.g. 0.8,0.9 (default: lori.sparsity)")
    p.add_argument("--search", choices=["grid", "optuna"], default="grid",
                   help="grid (default) or Optuna TPE with ASHA over eval size (needs: pip install optuna)")
    p.add_argument("--num-samples", type=int, help="Optuna trials (default: half the grid); grid ignores it")
    p.add_argument("--metric", default="cp", help="objective: eval.<metric>.mean, a merge method (default cp)")
    p.add_argument("--split", help="eval split (file stem) the objective reads (default: the first eval path)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: train.max_concurrent or resources)")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("config", help="validate a config and print it with defaults filled in")
    _add_config_args(p)
    p.set_defaults(fn=_cmd_config)

    p = sub.add_parser("merge-methods", help="list the registered merge methods and their parameters")
    p.set_defaults(fn=_cmd_merge_methods)

    p = sub.add_parser("demo-corpus", help="write the embedded multi-task demo corpus as JSONL splits")
    p.add_argument("--out", default="demo_corpus", help="output directory")
    p.add_argument("--train-per-task", type=int, default=300)
    p.add_argument("--eval-per-task", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"tclora: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
