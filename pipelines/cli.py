"""``tclora`` command line: run the pipeline, inspect configs and merge methods.

    tclora run --config configs/demo.yaml --set cluster.k=4 --set merge.cp_rank=8
    tclora config --config configs/demo.yaml          # print the resolved config
    tclora merge-methods                              # registered merge methods and parameters
    tclora sweep --config configs/demo.yaml --k 2,4,8 --cp-rank 2,4,8   # Ray Tune over k, R, sparsity
    tclora route --farm runs/demo/farm "reverse the words: box cup pen"   # which adapter serves an input
    tclora merge --adapters a/ b/ org/lora-c --method cp,ties,linear --validation val.jsonl --out merged/
"""

from __future__ import annotations

import argparse
import sys

from pipelines import session
from tclora.config import ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        from pipelines.plan import main_dry_run

        return main_dry_run(session.config_from_args(args))
    from pipelines.run import run  # the Ray layer is imported only by the commands that need it

    run(session.config_from_args(args), until=args.until)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.sweep import sweep_from_args

    sweep_from_args(args)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(session.config_from_args(args).model_dump(mode="json"), sort_keys=False))
    return 0


def _cmd_merge_methods(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from tclora.merge import registry

    rows = []
    for name in registry.names():
        spec = registry.get(name)
        params = ", ".join(f"{p.name}={p.default!r}" for p in spec.params)
        scope = "whole model" if spec.whole_model else "per module"
        rows.append([name, scope, "merge.cp_rank" if spec.rank_param else "", params, spec.reference_url])
    print(tabulate(rows, headers=["method", "scope", "rank from", "parameters", "reference"]))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from tclora.adapters import AdapterError
    from tclora.peft_merge import merge_peft_adapters

    cfg = session.config_from_args(args)
    try:
        info = merge_peft_adapters(args.adapters, args.out, args.method, weights=args.weights, merge_cfg=cfg.merge,
                                   validation=args.validation, base=args.base, eval_cfg=cfg.eval,
                                   dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    except (AdapterError, KeyError, ValueError) as err:
        print(f"tclora merge: {err}", file=sys.stderr)
        return 2
    if info["validation"]:
        rows = [[m, f"{s:.4f}", "<- written" if m == info["method"] else ""] for m, s in info["validation"].items()]
        print(tabulate(rows, headers=["method", "validation (best setting)", ""]))
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
    print(f"{info['method']} ({params}) of {len(info['inputs'])} adapters -> {info['out']} ({info['format']}; "
          "merge.json beside it)")
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from tclora.farm import Farm

    try:
        farm = Farm.load(args.farm)
    except FileNotFoundError as err:
        print(f"tclora route: {err}", file=sys.stderr)
        return 2
    routes = farm.route(args.inputs, args.threshold)
    rows = [[text[:60], r.cluster, f"{r.distance:.4f}", "merge (far from every cluster)" if r.fallback else "adapter",
             r.adapter or "none: this farm has no recommended merge"] for text, r in zip(args.inputs, routes)]
    print(tabulate(rows, headers=["input", "cluster", "distance", "uses", "directory"]))
    threshold = farm.info["threshold"] if args.threshold is None else args.threshold  # --threshold 0 is a value
    print(f"threshold {threshold:.4f}; base model {farm.base_model}")
    return 0


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from tclora.demo_corpus import build_demo_corpus

    paths = build_demo_corpus(args.out, train_per_task=args.train_per_task, eval_per_task=args.eval_per_task,
                              seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _add_merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge PEFT LoRA adapters trained anywhere (tuned on validation rows if given)",
                       description="Merge PEFT LoRA adapters on one base with any registered method. With "
                       "--validation, every --method is tuned (λ and its knobs) as a run tunes them and the best "
                       "one is written. Low-rank results are written as a PEFT adapter, dense ones (ties, dare) "
                       "as a merged checkpoint, with merge.json (inputs, hashes, method, parameters, scores).")
    p.add_argument("--adapters", nargs="+", required=True, metavar="DIR_OR_REPO",
                   help="adapter directories or Hub repo ids (org/name), all on one base model")
    p.add_argument("--method", type=session.csv_arg(str), default=["linear"],
                   help="merge method, or several comma-separated with --validation (see tclora merge-methods)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", type=session.csv_arg(float), default=None,
                   help="per-adapter weights, comma-separated, negative allowed (write --weights=-0.5,1 when the "
                   "first is negative); default 1 each")
    p.add_argument("--validation", metavar="FILE", default=None,
                   help="JSONL/Parquet rows (source, target, task_name) to tune λ and each method's knobs on")
    p.add_argument("--base", default=None, help="base model (default: the adapters' base_model_name_or_path)")
    session.add_config_args(p)  # merge.params / merge.cp_rank / merge.tune_grid / eval.* via --set
    p.set_defaults(fn=_cmd_merge)


def _add_route_parser(sub) -> None:
    p = sub.add_parser("route", help="which adapter of a run's farm each input should use (nearest centroid)",
                       description="Route inputs with a farm a run exported (<run.dir>/farm): the adapter of the "
                       "nearest cluster centroid, or the recommended merge when the input is farther from every "
                       "centroid than the training rows almost ever are (the farm's calibrated threshold).")
    p.add_argument("--farm", required=True, help="farm directory (<run.dir>/farm)")
    p.add_argument("--threshold", type=float, default=None, help="distance beyond which the merge is used "
                   "(default: the farm's, the 0.99 quantile of the training rows' distances)")
    p.add_argument("inputs", nargs="+", help="input texts, each one model prompt")
    p.set_defaults(fn=_cmd_route)


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
    session.add_config_args(p)
    session.add_run_args(p)  # --until, --dry-run
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("sweep", help="Ray Tune over cluster count k, CP rank R and LoRI sparsity s, reusing stages")
    session.add_config_args(p)
    session.add_sweep_args(p)
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("config", help="validate a config and print it with defaults filled in")
    session.add_config_args(p)
    p.set_defaults(fn=_cmd_config)

    p = sub.add_parser("merge-methods", help="list the registered merge methods and their parameters")
    p.set_defaults(fn=_cmd_merge_methods)

    _add_merge_parser(sub)
    _add_route_parser(sub)

    p = sub.add_parser("demo-corpus", help="write the embedded multi-task demo corpus as JSONL splits")
    p.add_argument("--out", default="demo_corpus", help="output directory")
    p.add_argument("--train-per-task", type=int, default=300)
    p.add_argument("--eval-per-task", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_demo_corpus)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    session.setup_logging(args.verbose)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"tclora: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
