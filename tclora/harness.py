"""Standard benchmarks (ARC, HellaSwag, BBH, ...) through lm-evaluation-harness, on a model in memory.

    pip install 'tclora[eval]'
    scores = run_tasks(model, tokenizer, cfg.eval)   # {"arc_easy": {"acc": 0.61, "acc_norm": 0.57, "n": 2376}}

The model is the one the merge/eval actor already holds: the base, or the base with a merge's deltas
added in place (:func:`tclora.adapters.deltas_applied`), wrapped in lm-eval's ``HFLM`` without reloading.
lm-eval is an optional extra, imported only here and only when tasks are configured. Its task datasets
come from the HF hub (cached by ``datasets``); a task YAML whose data are local files runs offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from tclora.config import ConfigError, EvalSection

NO_FILTER = "none"  # lm-eval's name for the unfiltered result: "acc,none" is reported as plain "acc"


def _is_task_file(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def task_manager(cfg: EvalSection):
    """lm-eval's task index over ``eval.lm_eval_include_path`` and, when a task is named, its built-in tasks.

    Indexing the ~16K built-in YAML files takes seconds (~16 s on 2 busy cores), so it is skipped when
    every task is given as a file.
    """
    from lm_eval.tasks import TaskManager

    builtin = not all(_is_task_file(t) for t in cfg.lm_eval_tasks)
    return TaskManager(include_path=list(cfg.lm_eval_include_path) or None, include_defaults=builtin)


def check_tasks(cfg: EvalSection, manager=None) -> None:
    """Fail before any training: task files and include paths exist, names are known, code tasks are allowed.

    Raises:
        ConfigError: naming ``eval.lm_eval_tasks`` or ``eval.lm_eval_include_path``.
    """
    if not cfg.lm_eval_tasks:
        return
    missing_dirs = [p for p in cfg.lm_eval_include_path if not Path(p).is_dir()]
    if missing_dirs:
        raise ConfigError(f"eval.lm_eval_include_path: no such directory {missing_dirs}")
    missing = [t for t in cfg.lm_eval_tasks if _is_task_file(t) and not Path(t).is_file()]
    if missing:
        raise ConfigError(f"eval.lm_eval_tasks: no such task file {missing}")
    manager = manager or task_manager(cfg)
    unknown = [t for t in cfg.lm_eval_tasks if not _is_task_file(t) and t not in manager.task_index]
    if unknown:
        raise ConfigError(f"eval.lm_eval_tasks: unknown lm-eval task(s) {unknown} "
                          "(see `lm-eval ls tasks`; local tasks need eval.lm_eval_include_path)")
    # Checks the named entries themselves; a group hiding a code task is still refused by lm-eval, later.
    unsafe = [t for t in cfg.lm_eval_tasks if not _is_task_file(t)
              and (manager.task_index[t].cfg or {}).get("unsafe_code")]
    if unsafe and not cfg.lm_eval_confirm_unsafe_code:
        raise ConfigError(f"eval.lm_eval_tasks: {unsafe} execute model-generated code; set "
                          "eval.lm_eval_confirm_unsafe_code=true to run them")


def run_tasks(model, tokenizer, cfg: EvalSection, manager=None) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``eval.lm_eval_tasks``; returns :func:`flatten` of lm-eval's results.

    Pass one ``manager`` (:func:`task_manager`) when scoring several models: the index is built once.
    The caller's train/eval mode is restored afterwards (lm-eval switches the model to eval mode).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if cfg.lm_eval_confirm_unsafe_code:
        # HF `evaluate`'s code_eval metric (humaneval) refuses to execute code unless this is set.
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    was_training = model.training
    try:
        results = simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size),
            tasks=list(cfg.lm_eval_tasks), task_manager=manager or task_manager(cfg),
            num_fewshot=cfg.lm_eval_num_fewshot, limit=cfg.lm_eval_limit,
            confirm_run_unsafe_code=cfg.lm_eval_confirm_unsafe_code,
            log_samples=False,  # per-example outputs stay out of memory and metrics.json
        )
    finally:
        model.train(was_training)
    return flatten(results)


def _metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5}``: numbers only."""
    out = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == NO_FILTER else key] = float(value)
    return out


def flatten(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """lm-eval's ``simple_evaluate`` output -> ``{task: {metric: value, ..., "n": examples scored}}``.

    Metrics keep lm-eval's names; a filtered one keeps its filter (``exact_match,flexible-extract``).
    A group with its own aggregate (``bbh_zeroshot``) stands for its subtasks, which are left out; a
    group without one is left out and its subtasks are kept.
    """
    counts = {t: n["effective"] for t, n in results.get("n-samples", {}).items()}
    children: dict[str, Sequence[str]] = results.get("group_subtasks", {})

    def n_of(task: str) -> int:
        return counts.get(task, 0) + sum(n_of(c) for c in children.get(task, ()))

    scores = {task: _metrics(entry) for task, entry in results["results"].items()}
    covered = {c for group, kids in children.items() if scores.get(group) for c in kids}
    return {task: {**m, "n": n_of(task)} for task, m in sorted(scores.items()) if m and task not in covered}
