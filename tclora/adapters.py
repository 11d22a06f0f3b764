"""PEFT-format adapters <-> low-rank factor views, and applying merged deltas to a base model.

Merges work on :class:`~tclora.merge.base.LowRank` factors keyed by the module's path in the base model
(``model.layers.0.self_attn.q_proj``). This module reads PEFT checkpoints into that view (LoRA scaling
folded into B), writes merge results back as adapters that plain PEFT and vLLM's multi-LoRA serving
load, and adds dense or factored deltas into a model's weights for evaluation or export.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from tclora.adapter_checks import LORA_A, LORA_B, PEFT_PREFIX, adapter_problems
from tclora.merge.base import Delta, LowRank, dense

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Ranks vLLM's multi-LoRA serving accepts as max_lora_rank; exported adapters are zero-padded up to one.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterError(ValueError):
    """An adapter directory is missing, malformed or incompatible; the message names it."""


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        AdapterError: the file is missing or is not a JSON object; the message names the directory.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM from a Windows editor is fine
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{adapter_dir}: {ADAPTER_CONFIG} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{adapter_dir}: {ADAPTER_CONFIG} holds a JSON {type(cfg).__name__}, not an object")
    return cfg


def load_factors(adapter_dir: str | Path) -> dict[str, LowRank]:
    """Read a PEFT LoRA adapter as ``{module path: LowRank(B * scaling, A)}``, B (d_out, r), A (r, d_in).

    ``scaling`` is PEFT's own: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with ``r`` and ``alpha``
    per module from ``rank_pattern`` / ``alpha_pattern``, whose regex keys PEFT's own matcher resolves
    against the module path exactly as ``LoraModel`` does when it builds the layers. The view is in the
    logical ``(d_out, d_in)`` orientation whatever the base layer stores (``fan_in_fan_out``, GPT-2's
    ``Conv1D``): :func:`add_deltas_` transposes where the layer does.

    Everything the adapter carries must be a plain LoRA pair: an option or tensor whose update is not
    ``s·B·A`` on a Linear layer (see :func:`tclora.adapter_checks.adapter_problems`) is refused, never dropped.

    Raises:
        AdapterError: missing files, non-safetensors weights, or weights/options a low-rank merge cannot
            represent; the message names the adapter directory, each offending option or tensor, and
            what to do.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) on a torn file
        raise AdapterError(f"{adapter_dir}: {ADAPTER_WEIGHTS} cannot be read ({err})") from None
    problems = adapter_problems(cfg, tensors)
    if problems:
        raise AdapterError(f"{adapter_dir}: not a plain LoRA adapter that tclora can merge; nothing was loaded:\n  - "
                           + "\n  - ".join(problems))
    if "lora_alpha" not in cfg or "r" not in cfg:
        raise AdapterError(f"{adapter_dir}: {ADAPTER_CONFIG} has no 'r' or 'lora_alpha'")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    factors: dict[str, LowRank] = {}
    for key, a in tensors.items():
        if not key.endswith(LORA_A):
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(LORA_A)
        b = tensors[key.removesuffix(LORA_A) + LORA_B]
        if a.ndim != 2 or b.ndim != 2:
            raise AdapterError(
                f"{adapter_dir}: module {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}: LoRA on "
                "a non-Linear layer (a convolution?). tclora merges LoRA on Linear layers only: remove this "
                "module from target_modules and retrain")
        if b.shape[1] != a.shape[0]:
            raise AdapterError(f"{adapter_dir}: module {module!r}: lora_B {tuple(b.shape)} and lora_A {tuple(a.shape)} "
                               "disagree on the rank")
        # PEFT's LoraModel._create_and_replace: first matching pattern key, else the global value.
        rank = rank_pattern.get(get_pattern_key(list(rank_pattern), module), cfg["r"])
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), cfg["lora_alpha"])
        if a.shape[0] != rank:
            raise AdapterError(f"{adapter_dir}: module {module!r} has rank {a.shape[0]} in {ADAPTER_WEIGHTS}, but "
                               f"{ADAPTER_CONFIG} (r / rank_pattern) gives {rank}")
        scaling = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)  # PEFT's LoraLayer.update_layer
        factors[module] = LowRank(b.float() * scaling, a.float())
    if not factors:
        raise AdapterError(f"{adapter_dir}: no LoRA weights found in {ADAPTER_WEIGHTS}")
    return factors


def check_compatible(adapter_dirs: list[Path]) -> None:
    """Adapters to be merged must share a base model, the adapted modules and their shapes.

    Raises:
        AdapterError: naming the first adapter that differs from the first one.
    """
    if not adapter_dirs:
        raise AdapterError("no adapters to merge")
    ref_dir = adapter_dirs[0]
    ref_base = read_adapter_config(ref_dir).get("base_model_name_or_path")
    ref = {m: lr.shape for m, lr in load_factors(ref_dir).items()}
    for d in adapter_dirs[1:]:
        base = read_adapter_config(d).get("base_model_name_or_path")
        if base != ref_base:
            raise AdapterError(f"{d}: trained on base model {base!r}, but {ref_dir} on {ref_base!r}")
        shapes = {m: lr.shape for m, lr in load_factors(d).items()}
        if set(shapes) != set(ref):
            diff = sorted(set(shapes) ^ set(ref))[:5]
            raise AdapterError(f"{d}: adapts different modules than {ref_dir} (e.g. {diff})")
        bad = [m for m in shapes if shapes[m] != ref[m]]
        if bad:
            raise AdapterError(f"{d}: module {bad[0]} has shape {shapes[bad[0]]}, {ref_dir} has {ref[bad[0]]}")


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM serves that fits ``rank``; ``rank`` itself above vLLM's largest listed rank
    (512): such an adapter is exported unpadded and served with ``--max-lora-rank <rank>`` where the vLLM
    build accepts it (:func:`save_factors` warns)."""
    i = bisect.bisect_left(VLLM_RANKS, rank)
    return VLLM_RANKS[i] if i < len(VLLM_RANKS) else rank


def save_factors(
    factors: Mapping[str, LowRank], out_dir: str | Path, base_model_name_or_path: str | None,
    pad_for_vllm: bool = True,
) -> Path:
    """Write factors as a standard PEFT LoRA adapter that vLLM also loads.

    One rank for all modules (zero-padded, up to a vLLM rank when ``pad_for_vllm``), scaling folded into
    B with ``lora_alpha = r`` (scaling 1), no rsLoRA/DoRA/bias/modules_to_save, A written explicitly.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank = max(f.rank for f in factors.values())
    if pad_for_vllm:
        rank = vllm_rank(rank)
        if rank > VLLM_RANKS[-1]:  # a merge (cat of many adapters, say) above every rank vLLM lists
            log.warning("%s: rank %d exceeds vLLM's largest listed max_lora_rank %d: exported unpadded; serve "
                        "it with --max-lora-rank %d (or merge to a lower rank)", out_dir, rank, VLLM_RANKS[-1], rank)
    tensors = {}
    for module, f in factors.items():
        pad = rank - f.rank
        B = torch.cat([f.B, f.B.new_zeros(f.B.shape[0], pad)], dim=1)  # (d_out, rank)
        A = torch.cat([f.A, f.A.new_zeros(pad, f.A.shape[1])], dim=0)  # (rank, d_in)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.contiguous()
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted({m.rsplit(".", 1)[-1] for m in factors}),
        lora_dropout=0.0, bias="none", use_rslora=False, use_dora=False, task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    # PEFT turns the list into a set, written in the process's hash-seed order: sorted, the same merge
    # saves the same bytes in every process (content-hashed manifests stay reproducible).
    config.target_modules = sorted(config.target_modules)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
    return out_dir


def _weight(model: nn.Module, module: str) -> tuple[nn.Parameter, bool]:
    """The weight a delta for ``module`` adds to, and whether the layer stores it transposed.

    ``nn.Linear`` keeps ``(d_out, d_in)``; transformers' ``Conv1D`` (GPT-2 and kin; PEFT's
    ``fan_in_fan_out``) keeps ``(d_in, d_out)``, so its delta is added as ``ΔWᵀ``. The layer's type decides,
    never the shape, so a square module cannot take a delta in the wrong orientation.

    Raises:
        AdapterError: no such module, or a layer kind tclora does not merge into (naming module and kind).
    """
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(f"the base model has no module {module!r}") from None
    if isinstance(layer, nn.Linear):
        return layer.weight, False
    if isinstance(layer, Conv1D):
        return layer.weight, True
    raise AdapterError(f"module {module!r} is a {type(layer).__name__}; tclora adds deltas to Linear (and "
                       "transformers Conv1D) layers only")


def check_fits(model: nn.Module, deltas: Mapping[str, Delta], source: str | Path) -> None:
    """Every module of ``deltas`` is a Linear (or Conv1D) layer of ``model`` with the delta's shape.

    Run once per adapter before evaluating it, so an adapter trained on another base fails naming
    itself, not half way through an evaluation.

    Raises:
        AdapterError: naming ``source`` (the adapter directory), the module and both shapes.
    """
    for module, delta in deltas.items():
        try:
            weight, transposed = _weight(model, module)
        except AdapterError as err:
            raise AdapterError(f"{source}: {err} (trained on another base model?)") from None
        layer = tuple(weight.shape[::-1] if transposed else weight.shape)  # (d_out, d_in)
        if tuple(delta.shape) != layer:
            raise AdapterError(f"{source}: module {module!r} has an update of shape {tuple(delta.shape)} "
                               f"(d_out, d_in), the base model's layer is {layer} (trained on another base model?)")


@torch.no_grad()
def add_deltas_(model: nn.Module, deltas: Mapping[str, Delta], sign: float = 1.0) -> None:
    """``W += sign * ΔW`` for every module (``ΔWᵀ`` where the layer stores W transposed), in W's dtype and device.

    Args:
        deltas: module path -> ``LowRank`` or dense ``(d_out, d_in)`` update.

    Raises:
        AdapterError: a module is missing, not a Linear/Conv1D layer, or its delta's shape differs.
    """
    for module, delta in deltas.items():
        weight, transposed = _weight(model, module)
        d = dense(delta.to(device=weight.device, dtype=torch.float32)) if isinstance(delta, LowRank) \
            else delta.float().to(weight.device)  # (d_out, d_in)
        d_out, d_in = weight.shape[::-1] if transposed else weight.shape
        if d.shape != (d_out, d_in):
            raise AdapterError(f"delta for {module!r} has shape {tuple(d.shape)} (d_out, d_in), the layer is "
                               f"{(d_out, d_in)}")
        weight.add_((sign * (d.T if transposed else d)).to(weight.dtype))


@contextmanager
def deltas_applied(model: nn.Module, deltas: Mapping[str, Delta]) -> Iterator[nn.Module]:
    """Temporarily merge deltas into the weights: one base model in memory evaluates every merge."""
    originals = {m: _weight(model, m)[0].detach().clone() for m in deltas}
    try:
        add_deltas_(model, deltas)  # inside: a delta refused half way still restores the ones already added
        yield model
    finally:
        with torch.no_grad():
            for m, w in originals.items():
                _weight(model, m)[0].copy_(w)


def save_merged_model(model: nn.Module, tokenizer, deltas: Mapping[str, Delta], out_dir: str | Path) -> Path:
    """Bake dense deltas into a copy of the weights and save a plain HF checkpoint (safetensors)."""
    with deltas_applied(model, deltas):
        model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
