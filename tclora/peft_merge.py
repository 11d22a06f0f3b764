"""``tclora merge``: the merge methods for PEFT LoRA adapters trained anywhere, not only by a run.

    merged = merge_peft_adapters(["org/lora-a", "./lora-b"], "out/merged", methods=["cp"])
    merged = merge_peft_adapters(dirs, "out/best", methods=["cp", "ties", "linear"],
                                 validation="val.jsonl")      # λ and knobs tuned, the best one written

Inputs are plain PEFT LoRA adapters on one base: mixed ranks and alphas, rsLoRA, ``rank_pattern`` /
``alpha_pattern`` (all read exactly by :func:`tclora.adapters.load_factors`), local directories or
Hub-style names resolved with ``huggingface_hub`` (honouring ``HF_HUB_OFFLINE`` and the Hub cache, the
same resolution ``from_pretrained`` uses for models). A module only some adapters target counts as a
zero update in the others (the task vector of an adapter that never touched it).

Without validation rows each method runs at its configured setting (``merge.params``, else the
signature defaults) and one method is written. With ``validation`` (FLAN-flat JSONL: ``source``,
``target``, optional ``task_name``) every method's λ and knobs are tuned as a run tunes them
(:func:`tclora.compare.tune_all`) and the best on validation is written. Low-rank results are saved as
a PEFT adapter (vLLM-loadable, as the run exports them), dense ones (TIES, DARE) as a merged HF
checkpoint; ``merge.json`` beside it names the inputs and their content hashes, the weights, the
method, its parameters and the validation scores.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from tclora import adapters, compare, tune_merge
from tclora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from tclora.artifacts import sha256_file
from tclora.config import DataSection, EvalSection, MergeSection
from tclora.merge import LowRank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter given to the merge: as the user named it, where it was found, what it holds."""

    name: str  # as given: a directory or a Hub repo id
    path: str  # the resolved local directory
    sha256: dict[str, str]  # file name -> sha256 (as the stage manifests record files): which bytes were merged
    base_model: str | None  # base_model_name_or_path from its config


def resolve_adapter(name_or_path: str | Path) -> Path:
    """A local adapter directory, or a Hub repo id (``org/name``) fetched into or read from the HF cache.

    Raises:
        AdapterError: neither an existing directory nor a repo id the Hub (or, offline, its cache) has;
            the message names the input.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise AdapterError(f"{name}: not an adapter directory (and not a Hub repo id of the form org/name)")
    from huggingface_hub import snapshot_download

    try:  # only the two files a LoRA adapter needs: never pickled weights
        return Path(snapshot_download(name, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
    except Exception as err:  # HfHubHTTPError, LocalEntryNotFoundError (offline, not cached), ...
        raise AdapterError(f"{name}: no such local directory, and the Hub could not provide it "
                           f"({type(err).__name__}: {err})") from None


def load_adapters(names: Sequence[str | Path]) -> tuple[list[AdapterInput], list[dict[str, LowRank]]]:
    """Resolve and read every adapter; modules some adapters lack are zero updates of rank 1 there.

    Returns:
        (one :class:`AdapterInput` per adapter, one ``{module: LowRank}`` per adapter, all on the same
        modules).

    Raises:
        AdapterError: an adapter cannot be found or read, or two adapters give one module different
            shapes (different base models); the message names both adapters and the module.
    """
    if not names:
        raise AdapterError("no adapters to merge")
    inputs, factors = [], []
    for name in names:
        path = resolve_adapter(name)
        factors.append(adapters.load_factors(path))  # validates the files before they are hashed
        hashes = {f: sha256_file(path / f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
        inputs.append(AdapterInput(str(name), str(path), hashes,
                                   adapters.read_adapter_config(path).get("base_model_name_or_path")))
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    for given, f in zip(inputs, factors):
        for module, lr in f.items():
            seen = shapes.setdefault(module, (lr.shape, given.name))
            if seen[0] != lr.shape:
                raise AdapterError(f"{given.name}: module {module} has shape {lr.shape}, but {seen[1]} gives it "
                                   f"{seen[0]}: adapters of different base models cannot be merged")
    for given, f in zip(inputs, factors):
        missing = sorted(set(shapes) - set(f))
        if missing:
            log.info("%s: %d modules not adapted (e.g. %s): zero updates there", given.name, len(missing), missing[0])
        for module in missing:
            (d_out, d_in), _ = shapes[module]
            f[module] = LowRank(torch.zeros(d_out, 1), torch.zeros(1, d_in))
    order = sorted(shapes)
    return inputs, [{m: f[m] for m in order} for f in factors]


def base_model_of(inputs: Sequence[AdapterInput], base: str | None = None) -> str:
    """The base the adapters share: ``base`` when given, else their common ``base_model_name_or_path``.

    Raises:
        AdapterError: no base given and the adapters name none, or different ones.
    """
    named = {i.base_model for i in inputs if i.base_model}
    if base is not None:
        if named - {base}:
            log.warning("adapters name base models %s; merging onto %s as asked", sorted(named), base)
        return base
    if len(named) != 1:
        which = ", ".join(f"{i.name}: {i.base_model!r}" for i in inputs)
        raise AdapterError(f"the adapters do not name one base model ({which}); pass the base explicitly "
                           "(tclora merge --base NAME_OR_PATH)")
    return named.pop()


def merge_peft_adapters(
    adapter_names: Sequence[str | Path], out_dir: str | Path, methods: Sequence[str] = ("linear",), *,
    weights: Sequence[float] | None = None, merge_cfg: MergeSection | None = None,
    validation: str | Path | None = None, base: str | None = None, eval_cfg: EvalSection | None = None,
    dtype: str = "float32", trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge PEFT LoRA adapters with one method, or tune several on validation rows and keep the best.

    Args:
        adapter_names: adapter directories or Hub repo ids, all on one base model.
        out_dir: where the result goes: a PEFT adapter (low-rank results) or a merged HF checkpoint (dense).
        methods: registered merge methods (``tclora merge-methods``); several need ``validation``.
        weights: per-adapter weights (negative allowed), 1 each by default; λ then scales the update.
        merge_cfg: settings (``params``, ``cp_rank``, ``tune_grid``, ``tune_max_per_task``); ``methods``
            and ``weights`` above replace its own.
        validation: JSONL or Parquet rows (``source``, ``target``, ``task_name``) to tune on.
        base: the base model (name or path); default the adapters' common ``base_model_name_or_path``.

    Returns:
        What ``merge.json`` holds: ``inputs``, ``weights``, ``base_model``, ``method``, ``params``,
        ``tuned``, ``validation`` (method -> best validation score, tuned runs only), ``format``, ``out``.

    Raises:
        AdapterError: an adapter cannot be read or the adapters do not fit together (named).
        ValueError: unknown method or parameter, several methods without validation, wrong weight count.
    """
    from tclora.merge import registry

    for method in methods:
        registry.get(method)  # KeyError naming the known methods
    if len(methods) != 1 and validation is None:
        raise ValueError(f"comparing {len(methods)} methods needs validation rows to choose among them "
                         "(--validation FILE.jsonl); or give one --method")
    inputs, factors = load_adapters(adapter_names)
    if weights is not None and len(weights) != len(factors):
        raise ValueError(f"{len(weights)} weights for {len(factors)} adapters")
    base_name = base_model_of(inputs, base)
    cfg = (merge_cfg or MergeSection()).model_copy(
        update={"methods": list(methods), "weights": None if weights is None else list(weights)})
    model = tokenizer = None
    scores: dict[str, float] = {}
    if validation is not None:
        model, tokenizer = _load_base(base_name, dtype, trust_remote_code)
        rows = compare.cap_per_task(_read_rows(validation), cfg.tune_max_per_task)
        tuned = compare.tune_all(model, tokenizer, factors, rows, cfg, eval_cfg or EvalSection())
        scores = {m: r.score for m, r in tuned.items()}
        best = tune_merge.recommend(tuned)
        method, params = best.method, best.params
        log.info("validation (%d rows): %s; best %s", len(rows),
                 ", ".join(f"{m} {s:.3f}" for m, s in scores.items()), method)
    else:
        method = methods[0]
        params = tune_merge.resolved(method, compare.method_params(method, cfg), len(factors))
    deltas = compare.merge_one(factors, method, cfg, params)
    low_rank = all(isinstance(d, LowRank) for d in deltas.values())
    if model is None and not low_rank:
        model, tokenizer = _load_base(base_name, dtype, trust_remote_code)  # a dense result: a merged checkpoint
    info = {"inputs": [asdict(i) for i in inputs], "weights": cfg.weights, "base_model": base_name,
            "method": method, "params": params, "tuned": validation is not None, "validation": scores or None,
            "format": "peft_adapter" if low_rank else "merged_model", "out": str(out_dir)}
    compare.save_merge(deltas, Path(out_dir), base_name, model, tokenizer, info)
    return info


def _load_base(name: str, dtype: str, trust_remote_code: bool) -> tuple:
    from tclora.models import load_base

    return load_base(name, dtype=dtype, trust_remote_code=trust_remote_code)


def _read_rows(path: str | Path) -> list[Mapping[str, Any]]:
    from tclora.corpus import read_records

    rows = read_records(str(path), DataSection())
    if not rows:
        raise ValueError(f"{path}: no valid validation rows (each needs source and target)")
    return rows
