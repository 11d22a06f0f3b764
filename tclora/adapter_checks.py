"""What in a PEFT adapter a low-rank merge can represent, and what it cannot.

tclora merges per-module updates ``ΔW = s·B·A`` on Linear layers. A PEFT adapter may carry more: full
trained copies of modules (``modules_to_save``), trained biases, DoRA magnitudes, LoRA on embeddings or
convolutions, trainable token rows, a base the adapter's initialisation rewrote (PiSSA and kin), or a
LoRA variant whose forward is not ``x + s·B·A·x``. Dropping any of these would merge a different model
than the one trained, silently; :func:`adapter_problems` lists each one instead, naming the option or
tensor and what to do. Both the options (``adapter_config.json``) and the tensor names are checked,
because either alone can miss one (a hand-edited config, an older PEFT that saved extra tensors).

Sources: PEFT ``LoraConfig`` (``src/peft/tuners/lora/config.py``; fields marked ``is_lora_variant``),
``LoraLayer.update_layer`` (which initialisations rewrite the base weight) and
``get_peft_model_state_dict`` (the saved tensor names).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import peft
from peft import LoraConfig

PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"

# LoraConfig options under which every (lora_A, lora_B) pair still means ΔW = s·B·A on its layer: which
# modules are adapted, how s is computed (read by load_factors), training-only settings and metadata.
# VeLoRA only changes the backward pass; fan_in_fan_out only says the base layer stores W transposed
# (the lora_A/lora_B tensors are (r, d_in)/(d_out, r) either way; add_deltas_ transposes by layer type).
PLAIN_OPTIONS = frozenset({
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "lora_dropout", "fan_in_fan_out", "runtime_config",
    "ensure_weight_tying", "megatron_config", "megatron_core", "velora_config", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # read only by their init_lora_weights
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version",
})
# init_lora_weights values that leave the base model as it is. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA
# subtract their initial s·B·A from the base weights, so the adapter is relative to a base that no
# longer exists on disk (LoraLayer.pissa_init, olora_init, ...).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")

_RETRAIN = "retrain as plain LoRA without it"
# What each option means and what to do, where a better hint than the generic one exists.
OPTION_ADVICE = {
    "modules_to_save": "full trained copies of these modules ride along with the adapter, and a low-rank merge "
                       "cannot represent them: retrain without modules_to_save, or merge those modules separately",
    "bias": "trained biases are full-size updates that a low-rank merge cannot represent: retrain with bias='none'",
    "lora_bias": "lora_B carries a bias, an update outside B·A: retrain with lora_bias=False",
    "use_dora": "DoRA rescales each output by a learned magnitude, so the update is not B·A: fold DoRA adapters "
                "into full weights (merge_and_unload) before comparing, or retrain as plain LoRA",
    "trainable_token_indices": "trained embedding rows are not a low-rank update: retrain without "
                               "trainable_token_indices",
    "init_lora_weights": "this initialisation rewrote the base weights, so B·A is relative to a base that is not "
                         "on disk: convert the adapter with PEFT's save_pretrained("
                         "path_initial_model_for_weight_conversion=...) first",
    "layer_replication": "the adapter was trained on a model with replicated layers, not on the base: retrain "
                         "without layer_replication",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. MoE experts) is not a Linear layer update: retrain with "
                         "target_modules only",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, not as a fixed weight "
                               "update: " + _RETRAIN,
}

# Saved tensor name (suffix, or part for full copies) -> what it is and what to do.
TENSOR_ADVICE = (
    (".lora_magnitude_vector", "a DoRA magnitude vector (use_dora)", OPTION_ADVICE["use_dora"]),
    (".lora_B.bias", "a LoRA bias (lora_bias)", OPTION_ADVICE["lora_bias"]),
    (".lora_A.bias", "a LoRA bias (lora_bias)", OPTION_ADVICE["lora_bias"]),
    (".lora_embedding_A", "LoRA on an embedding layer", "tclora merges LoRA on Linear layers only: remove the "
     "embedding from target_modules and retrain"),
    (".lora_embedding_B", "LoRA on an embedding layer", "tclora merges LoRA on Linear layers only: remove the "
     "embedding from target_modules and retrain"),
    ("trainable_tokens_delta", "trainable token rows (trainable_token_indices)",
     OPTION_ADVICE["trainable_token_indices"]),
    (".bias", "a trained bias (bias='all' or 'lora_only')", OPTION_ADVICE["bias"]),
)


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str, tuple)) and not value)


def option_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Options of ``adapter_config.json`` under which the adapter is not a plain ``s·B·A`` per Linear layer.

    Any option outside :data:`PLAIN_OPTIONS` that is set to other than PEFT's default is a problem: the
    named ones with their own hint, the rest (LoRA variants: QALoRA, Arrow, block-diagonal, KaSA,
    MonteCLoRA, options of a newer PEFT) with a generic one. Returns one line per problem.
    """
    if cfg.get("peft_type", "LORA") != "LORA":
        return [f"peft_type {cfg['peft_type']!r}: a {cfg['peft_type']} adapter, not LoRA; tclora merges PEFT LoRA "
                "adapters only (AdaLoRA, LoHa, LoKr, IA3... keep other tensors than lora_A/lora_B)"]
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(LoraConfig)}
    problems = []
    for name, value in sorted(cfg.items()):
        if name in PLAIN_OPTIONS or _unset(value) or (name in defaults and value == defaults[name]):
            continue
        if name == "init_lora_weights" and value in PLAIN_INITS:
            continue
        hint = OPTION_ADVICE.get(name) or (
            "a PEFT LoRA variant whose update is not s·B·A on a Linear layer: " + _RETRAIN if name in defaults
            else f"an option PEFT {peft.__version__} does not know, so tclora cannot tell whether the update is "
                 "s·B·A: upgrade PEFT, or retrain without it")
        problems.append(f"option {name}={value!r}: {hint}")
    return problems


def tensor_problems(tensors: Mapping[str, Any]) -> list[str]:
    """Saved tensors that are not half of a ``lora_A.weight`` / ``lora_B.weight`` pair, one line each.

    Full module copies (``modules_to_save``, embeddings PEFT saved with the adapter) are named as such.
    """
    problems = []
    for key in sorted(tensors):
        if key.endswith(LORA_A) or key.endswith(LORA_B):
            own, other = (LORA_A, LORA_B) if key.endswith(LORA_A) else (LORA_B, LORA_A)
            if key.removesuffix(own) + other not in tensors:
                problems.append(f"tensor {key}: has no matching {other.strip('.')}; the file is incomplete: "
                                "save the adapter again")
            continue
        what, hint = next(((w, h) for part, w, h in TENSOR_ADVICE if key.endswith(part)), (None, None))
        if what is None:
            what, hint = ("a full weight saved with the adapter (modules_to_save, or an embedding PEFT saved)",
                          OPTION_ADVICE["modules_to_save"])
        problems.append(f"tensor {key}: {what}; {hint}")
    return problems


def adapter_problems(cfg: Mapping[str, Any], tensors: Mapping[str, Any]) -> list[str]:
    """Every reason the adapter is not a plain LoRA that merges as ``s·B·A`` per Linear layer (empty: fine)."""
    problems = option_problems(cfg) + tensor_problems(tensors)
    if len(problems) > 12:  # a 7B adapter with modules_to_save on every layer: enough to act on
        problems = problems[:12] + [f"... and {len(problems) - 12} more"]
    return problems
