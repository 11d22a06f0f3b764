"""``tclora run --dry-run``: what a run would do and produce, before paying for GPUs. No Ray work.

    tclora run --config configs/phi3-flan.yaml --set run.dir=s3://bucket/runs/x --dry-run

Reports where the run lives (and that the store is reachable), which Ray it would use, the corpus (files,
and rows when an embed stage for this input already finished), ``cluster.k``, the adapters to train and
to reuse, each merge method's exported rank (and whether vLLM serves it padded, or it exceeds vLLM's largest
listed rank), and which stages a rerun would skip. Stage reuse is read from the manifests in the run's
store, the same check the run makes.
"""

from __future__ import annotations

import json
import logging
import os

import pyarrow.fs as pafs
import torch

from tclora import adapters, compare, storage
from tclora.artifacts import MANIFEST
from tclora.config import Config
from tclora.merge.base import LowRank

log = logging.getLogger(__name__)


def merged_ranks(cfg: Config, k: int) -> dict[str, dict]:
    """Each ``merge.methods`` entry's result for ``k`` rank-``lori.rank`` adapters: exported rank and format.

    Found by running the method itself on random factors of one small module (wide enough, ``k * r + 8``,
    that no rank is capped by the module's shape), so the answer is the method's, not a table's. A real
    module narrower than that caps the rank at its smaller dimension.
    """
    r, d = cfg.lori.rank, k * cfg.lori.rank + 8
    gen = torch.Generator().manual_seed(0)
    factors = [{"model.layers.0.self_attn.q_proj": LowRank(torch.randn(d, r, generator=gen),
                                                             torch.randn(r, d, generator=gen))} for _ in range(k)]
    out = {}
    for method in cfg.merge.methods:
        delta = next(iter(compare.merge_one(factors, method, cfg.merge).values()))
        if isinstance(delta, LowRank):
            rank = delta.rank
            served = adapters.vllm_rank(rank)
            out[method] = {"format": "peft_adapter", "rank": rank, "vllm_rank": served,
                           "note": (f"above vLLM's largest listed rank {adapters.VLLM_RANKS[-1]}: exported unpadded, "
                                    f"serve with --max-lora-rank {rank}") if served > adapters.VLLM_RANKS[-1] else ""}
        else:
            out[method] = {"format": "merged_model", "rank": None, "vllm_rank": None,
                           "note": "dense: a merged checkpoint, served without LoRA"}
    return out


def _manifest(store: storage.RunStore, rel: str) -> dict | None:
    """A stage's manifest from the store (the working copy for a local run.dir), or None."""
    path = f"{store.root}/{rel}/{MANIFEST}" if store.remote else str(store.local / rel / MANIFEST)
    fs = store.filesystem
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def plan(cfg: Config) -> dict:
    """The dry-run report as a dict (also printed by :func:`print_plan`).

    Raises:
        StorageError: the store cannot be reached (the same check a run makes before Ray starts).
        CorpusError: ``data.path`` does not exist or holds no corpus files.
    """
    from pipelines.session import ray_address

    store = storage.open_run(cfg.run)
    store.check(cfg.run.storage_options)
    report: dict = {"run_dir": store.uri, "working_copy": str(store.local) if store.remote else None,
                    "ray": ray_address(cfg), "k": cfg.cluster.k, "adapter_rank": cfg.lori.rank}
    if cfg.data.path == "demo":
        report["data"] = {"path": "demo", "rows": "built at run time (data.demo_train_per_task per task family)"}
    else:
        from tclora.corpus import list_input_files

        inputs = list_input_files(cfg.data.path, cfg.run.storage_options)
        embed = _manifest(store, "embed")
        same = embed is not None and embed.get("key", {}).get("inputs") == inputs.digest() \
            and embed["key"].get("config") == cfg.section_hash("data", "embed")
        report["data"] = {"path": cfg.data.path, "files": len(inputs.files),
                          "bytes": sum(f.size or 0 for f in inputs.files),
                          "rows": embed["rows"] if same else "counted by the embed stage"}
    stages = {name: _manifest(store, name) is not None for name in ("embed", "train", "merge_eval")}
    train = _manifest(store, "train")
    reused = len(train.get("adapters", {})) if train else 0
    report["adapters"] = {"to_train": "up to k (clusters below cluster.min_cluster_size are merged or skipped)"
                          if not train else f"{cfg.cluster.k} unless the clustering changed",
                          "finished_in_store": reused}
    report["stages_finished_in_store"] = stages
    # k: auto is chosen in the cluster stage: plan for the largest k it may pick
    report["merges"] = merged_ranks(cfg, cfg.cluster.k if cfg.cluster.k != "auto" else cfg.cluster.k_range[1])
    return report


def print_plan(report: dict) -> None:
    """Human-readable dry-run report on stdout."""
    from tabulate import tabulate

    print(f"run.dir      {report['run_dir']}" + (f"  (working copy {report['working_copy']})"
                                                 if report["working_copy"] else ""))
    print(f"Ray          {'a local instance' if report['ray'] == 'local' else report['ray']}")
    print(f"data         {json.dumps(report['data'])}")
    print(f"clusters     k={report['k']}, adapter rank r={report['adapter_rank']}")
    print(f"adapters     {json.dumps(report['adapters'])}")
    print("finished     " + ", ".join(f"{n}: {'yes (will be checked and reused)' if done else 'no'}"
                                      for n, done in report["stages_finished_in_store"].items()))
    rows = [[m, v["format"], v["rank"], v["vllm_rank"], v["note"]] for m, v in report["merges"].items()]
    print(tabulate(rows, headers=["merge", "format", "rank", "vLLM rank", "note"]))
    print("dry run: nothing was started (no Ray, no training)" + os.linesep)


def main_dry_run(cfg: Config) -> int:
    print_plan(plan(cfg))
    return 0


