"""Merge + eval stage: one Ray actor merges the cluster adapters and evaluates base, adapters and merges.

    tclora run --config configs/demo.yaml --set merge.cp_rank=8     # reruns only this stage
    python -m pipelines.merge_eval --config configs/demo.yaml --set merge.cp_rank=8   # this stage alone

The actor (resources from ``eval.num_cpus`` / ``eval.num_gpus``) loads the base model once, routes each
held-out example to its nearest cluster centroid (for the oracle row), runs every configured merge
method on the adapters' factors, saves each result (PEFT adapter, or merged checkpoint for dense
methods) and scores everything; with ``eval.lm_eval_tasks`` set, also the base and each merge on
lm-eval benchmarks. If its process dies, Ray restarts it (``max_restarts``) and retries the call in
flight on the new process (``max_task_retries``); a retried call starts over in an emptied directory, so
nothing of the killed attempt reaches the stage, which only appears once the whole stage has finished.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch

from pipelines import session
from tclora import adapters, artifacts, compare, report, storage
from tclora.artifacts import StageResult
from tclora.cluster import route_records, routing_accuracy
from tclora.config import Config, validate
from tclora.corpus import read_records

log = logging.getLogger(__name__)


def adapter_dirs(train_dir: Path) -> dict[int, Path]:
    """``cluster-<id>`` adapter directories of the train stage, by cluster id."""
    found = {}
    for path in Path(train_dir).glob("cluster-*"):
        match = re.fullmatch(r"cluster-(\d+)", path.name)
        if match and (path / adapters.ADAPTER_CONFIG).is_file():
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _empty(directory: Path) -> None:
    """Delete everything inside ``directory`` (kept itself): what a killed attempt of the stage left."""
    for path in directory.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@functools.lru_cache(maxsize=1)
def _reused_base(model_json: str, cuda: bool) -> tuple:
    """The base (and tokenizer) of the last ``model`` section this process loaded with ``reuse_base``.

    Safe to share between stages because nothing keeps a change to it: every merge is applied for the
    length of a block and copied back (:func:`tclora.adapters.deltas_applied`), Arrow's LoRA layers are
    unloaded (:func:`tclora.farm.arrow_applied`). One entry: a process holds one base at a time.
    """
    from tclora.config import ModelSection
    from tclora.models import load_base_for

    model, tokenizer = load_base_for(ModelSection.model_validate_json(model_json))
    return (model.to("cuda") if cuda else model), tokenizer


class MergeEval:
    """The stage's work on one loaded base: merge the run's adapters, save the merges, score everything.

    ``tclora run`` runs it as :class:`MergeEvalActor`; a sweep trial runs it in its own process, which
    is already a Ray actor holding the eval resources (a second process would import torch,
    transformers and PEFT again and load the base again). Tune hands that process the next trial
    (``reuse_actors``), and ``reuse_base`` keeps the base loaded for it.
    """

    def __init__(self, cfg: dict, reuse_base: bool = False):
        from tclora.models import load_base_for

        self.cfg: Config = validate(cfg)
        cuda = self.cfg.eval.num_gpus > 0 and torch.cuda.is_available()  # Ray set CUDA_VISIBLE_DEVICES for us
        if reuse_base:
            self.model, self.tokenizer = _reused_base(self.cfg.model.model_dump_json(), cuda)
        else:
            self.model, self.tokenizer = load_base_for(self.cfg.model)
            if cuda:
                self.model.to("cuda")

    def run(self, out_dir: str, cluster_dir: str, train_dir: str, store: storage.RunStore | None = None) -> dict:
        """Merge, save and score into ``out_dir``; the three paths are on ``store.filesystem`` (the run's
        store: this actor usually runs on another node than the driver), or local without a store."""
        if store is not None and store.remote:
            with tempfile.TemporaryDirectory(prefix="tclora-merge-") as scratch, \
                    storage.localized(store.filesystem, cluster_dir) as cluster_local, \
                    storage.localized(store.filesystem, train_dir) as train_local:
                result = self._run(Path(scratch), cluster_local, train_local)
                storage.upload_dir(Path(scratch), store.filesystem, out_dir)  # pulled by the driver
                return result
        return self._run(Path(out_dir), Path(cluster_dir), Path(train_dir))

    def _run(self, out: Path, cluster_dir: Path, train_dir: Path) -> dict:
        cfg = self.cfg
        # After a restart this call is a retry: a killed attempt may have left half-written merges or a
        # torn temp file in `out`, which the manifest would otherwise hash as outputs. Start over.
        restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if restarted:
            log.warning("merge/eval actor was restarted: redoing the stage from an empty %s", out)
        _empty(out)
        dirs = adapter_dirs(Path(train_dir))
        adapters.check_compatible(list(dirs.values()))
        factors = {cid: adapters.load_factors(d) for cid, d in dirs.items()}
        for cid, d in dirs.items():  # an adapter trained on another base fails here, naming itself and the module
            adapters.check_fits(self.model, factors[cid], d)

        splits = {}
        for path in cfg.data.eval_paths:
            records = compare.cap_per_task(read_records(path, cfg.data, cfg.run.storage_options), cfg.eval.max_per_task)
            splits[Path(path).stem] = route_records(records, Path(cluster_dir), cfg.embed.model)
            log.info("evaluating %d examples of %s", len(splits[Path(path).stem]), path)
        validation = None
        if cfg.data.validation_path:  # selection only (tuning, the sweep's objective): never a reported result
            validation = compare.cap_per_task(read_records(cfg.data.validation_path, cfg.data, cfg.run.storage_options),
                                              cfg.merge.tune_max_per_task)
            validation = route_records(validation, Path(cluster_dir), cfg.embed.model)
        merge_info: dict = {}

        def save(method: str, deltas, setting: dict) -> None:  # each merge saved before any evaluation
            info = {"method": method, **{k: setting[k] for k in ("params", "knobs", "tuned", "validation_score")}}
            fmt = compare.save_merge(deltas, out / "merges" / method, cfg.model.name_or_path,
                                     self.model, self.tokenizer, info)
            merge_info[method] = {"seconds": setting["seconds"], "format": fmt, **info}

        started = time.time()
        result = compare.compare_merges(self.model, self.tokenizer, factors, splits, cfg.merge, cfg.eval, validation,
                                        on_merged=save, arrow_dirs=list(dirs.values()))
        merged = result["merged"]
        headline = next(iter(splits))
        summary = {"eval": report.combine_splits(result["eval"], headline), "eval_split": headline, "merge": merge_info,
                   "tuning": {"tuned": bool(result["recommended"]), "compare_seconds": round(time.time() - started, 2),
                              "trials": {m: s["trials"] for m, s in result["settings"].items()}},
                   "recommended": result["recommended"],
                   "routing": routing(splits, result["arrow_choices"], list(dirs), Path(cluster_dir)),
                   "validation": None if result["validation"] is None else
                   {m: {"mean": v["mean"], "n": v["n"]} for m, v in result["validation"].items()}}
        if cfg.eval.lm_eval_tasks:
            log.info("lm-eval: %s on the base and %d merges", cfg.eval.lm_eval_tasks, len(merged))
            summary["lm_eval"] = compare.lm_eval_all(self.model, self.tokenizer, merged, cfg.eval)
        artifacts.atomic_write_json(out / "eval.json", summary)
        return {**summary, "adapters": {str(c): d.name for c, d in dirs.items()}, "actor_restarted": restarted,
                "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote(max_restarts=2, max_task_retries=2)
class MergeEvalActor(MergeEval):
    """:class:`MergeEval` in an actor of its own (``eval.num_cpus``, ``eval.num_gpus``, ``eval.resources``),
    restarted by Ray when its process dies: the retried call redoes the stage from an empty directory."""


def routing(splits: dict[str, list[dict]], arrow_choices: dict[str, list[int]] | None, cluster_ids: list[int],
            cluster_dir: Path) -> dict:
    """Routing accuracy per router and split (``tclora.cluster.routing_accuracy``): nearest centroid (each
    record's ``cluster``), and Arrow's most-weighted adapter per record when it was scored."""
    report_file = cluster_dir / "report.json"  # the tasks per cluster; absent: no task names to score
    top_tasks = json.loads(report_file.read_text()).get("top_tasks", {}) if report_file.is_file() else {}
    if not top_tasks:
        return {}
    routed = {"centroid": splits}
    if arrow_choices is not None:
        routed["arrow"] = {split: [{**r, "cluster": cluster_ids[c]} for r, c in zip(records, arrow_choices[split])]
                           for split, records in splits.items()}
    accuracy = {router: {split: routing_accuracy(records, top_tasks) for split, records in by_split.items()}
                for router, by_split in routed.items()}
    return {router: {s: acc for s, acc in by_split.items() if acc is not None} for router, by_split in accuracy.items()}


def _digest(path: str, storage_options: dict) -> str:
    """Content hash of an eval split file (local or on a store), else its path (a directory or glob)."""
    fs, inner = storage.filesystem(path, storage_options)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        return storage.digest(fs, inner)
    return path


def run_merge_eval(cfg: Config, run_dir: Path, cluster_dir: Path, train_dir: Path,
                   in_process: bool = False) -> StageResult:
    """Stage driver: skipped when merge/eval config, adapters and eval data are unchanged.

    ``in_process``: do the work in this process instead of a :class:`MergeEvalActor`, on the base this
    process loaded last when the model section is the same; for callers that are themselves Ray actors
    holding the eval resources (a sweep trial, which Tune may reuse for the next trial).
    """
    if not cfg.data.eval_paths:
        raise ValueError("data.eval_paths: no held-out split to evaluate on (set data.eval_paths)")
    final = run_dir / "merge_eval"
    key = {
        "config": cfg.section_hash("merge", "eval", "model", "embed"),
        "train": artifacts.tree_digest(train_dir),
        "cluster": artifacts.tree_digest(cluster_dir),
        "eval_data": [_digest(p, cfg.run.storage_options) for p in cfg.data.eval_paths],
        "validation": _digest(cfg.data.validation_path, cfg.run.storage_options) if cfg.data.validation_path else None,
    }
    if artifacts.is_complete(final, key):
        write_best_merge(run_dir, final)
        return StageResult(final, reused=True)
    extra: dict = {}
    store = storage.store_for(cfg, run_dir)
    with artifacts.stage_dir(final, key, extra) as tmp, store.remote_output(tmp) as out:
        # The work gets the run's store and paths on it, never this driver's directories.
        paths = (out, store.path(cluster_dir), store.path(train_dir), store)
        if in_process:
            extra.update(MergeEval(cfg.model_dump(mode="json"), reuse_base=True).run(*paths))
        else:
            actor = MergeEvalActor.options(num_cpus=cfg.eval.num_cpus, num_gpus=cfg.eval.num_gpus,
                                           resources=cfg.eval.resources or None).remote(cfg.model_dump(mode="json"))
            try:
                extra.update(ray.get(actor.run.remote(*paths)))
            finally:
                ray.kill(actor)
    write_best_merge(run_dir, final)
    return StageResult(final, reused=False)


def write_best_merge(run_dir: Path, stage: Path) -> Path | None:
    """``<run_dir>/best_merge.yaml`` (atomic) from the stage's recommended merge; None for an untuned run."""
    manifest = artifacts.read_manifest(stage) or {}
    best = manifest.get("recommended")
    if not best:
        return None
    scores = {split: v for split, v in manifest["eval"][best["method"]]["splits"].items()}
    text = compare.best_merge_yaml(best, scores, str(stage / "merges" / best["method"]))
    path = Path(run_dir) / "best_merge.yaml"
    artifacts.atomic_write_bytes(path, text.encode())
    return path


def _run_alone(cfg: Config, run_dir: Path) -> StageResult:
    # Imported here: the actor's process imports this module, and needs neither Ray Train nor Ray Data.
    from pipelines.cluster import finished_cluster
    from pipelines.train import finished_train

    cluster_dir = finished_cluster(cfg, run_dir)
    return run_merge_eval(cfg, run_dir, cluster_dir, finished_train(cfg, run_dir, cluster_dir))


def main(argv: list[str] | None = None) -> int:
    return session.stage_main("merge_eval", _run_alone, argv)


if __name__ == "__main__":
    sys.exit(main())
