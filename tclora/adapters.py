"""PEFT-format adapters <-> low-rank factor views, and applying merged deltas to a base model.

Merges work on :class:`~tclora.merge.base.LowRank` factors keyed by the module's path in the base model
(``model.layers.0.self_attn.q_proj``). This module reads PEFT checkpoints into that view (LoRA scaling
folded into B), writes merge results back as adapters that plain PEFT and vLLM's multi-LoRA serving
load, and adds dense or factored deltas into a model's weights for evaluation or export.
"""

from __future__ import annotations

import bisect
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from tclora.merge.base import Delta, LowRank, dense

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Ranks vLLM's multi-LoRA serving accepts as max_lora_rank; exported adapters are zero-padded up to one.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterError(ValueError):
    """An adapter directory is missing, malformed or incompatible; the message names it."""


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    return json.loads(path.read_text())


def load_factors(adapter_dir: str | Path) -> dict[str, LowRank]:
    """Read a PEFT LoRA adapter as ``{module path: LowRank(B * scaling, A)}``.

    Raises:
        AdapterError: missing files, non-safetensors weights, or a LoRA variant we cannot express.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise AdapterError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (only safetensors adapters are loaded)")
    if cfg.get("use_dora"):
        raise AdapterError(f"{adapter_dir}: DoRA adapters are not low-rank deltas; not supported")
    tensors = load_file(str(weights_path))
    factors: dict[str, LowRank] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise AdapterError(f"{adapter_dir}: {key} has no matching lora_B")
        r = a.shape[0]
        leaf = module.rsplit(".", 1)[-1]
        rank = cfg.get("rank_pattern", {}).get(leaf, r)
        alpha = cfg.get("alpha_pattern", {}).get(leaf, cfg["lora_alpha"])
        scaling = alpha / (rank**0.5 if cfg.get("use_rslora") else rank)
        factors[module] = LowRank(tensors[b_key].float() * scaling, a.float())
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
    """The smallest rank vLLM serves that fits ``rank``."""
    i = bisect.bisect_left(VLLM_RANKS, rank)
    if i == len(VLLM_RANKS):
        raise AdapterError(f"rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")
    return VLLM_RANKS[i]


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


def _linear(model: nn.Module, module: str) -> nn.Linear:
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(f"the base model has no module {module!r}") from None
    if not isinstance(layer, nn.Linear):
        raise AdapterError(f"module {module!r} is a {type(layer).__name__}, not a Linear layer")
    return layer


@torch.no_grad()
def add_deltas_(model: nn.Module, deltas: Mapping[str, Delta], sign: float = 1.0) -> None:
    """``W += sign * ΔW`` for every module, in the weight's dtype and device."""
    for module, delta in deltas.items():
        weight = _linear(model, module).weight  # (d_out, d_in)
        d = dense(delta.to(device=weight.device, dtype=torch.float32) if isinstance(delta, LowRank) else delta.float().to(weight.device))
        if d.shape != weight.shape:
            raise AdapterError(f"delta for {module!r} has shape {tuple(d.shape)}, weight is {tuple(weight.shape)}")
        weight.add_((sign * d).to(weight.dtype))


@contextmanager
def deltas_applied(model: nn.Module, deltas: Mapping[str, Delta]) -> Iterator[nn.Module]:
    """Temporarily merge deltas into the weights: one base model in memory evaluates every merge."""
    originals = {m: _linear(model, m).weight.detach().clone() for m in deltas}
    add_deltas_(model, deltas)
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, w in originals.items():
                _linear(model, m).weight.copy_(w)


def save_merged_model(model: nn.Module, tokenizer, deltas: Mapping[str, Delta], out_dir: str | Path) -> Path:
    """Bake dense deltas into a copy of the weights and save a plain HF checkpoint (safetensors)."""
    with deltas_applied(model, deltas):
        model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
