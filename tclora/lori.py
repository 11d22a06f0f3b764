"""LoRI: LoRA with a frozen random A and a sparse, task-specific B (arXiv 2504.07448).

The recipe, per adapter:

1. LoRI-D: A is drawn from a seed and frozen; B starts at zero and trains densely.
2. Mask: keep the top ``1 - sparsity`` fraction of B's entries by magnitude, over all adapted layers
   at once ("global") or within each layer ("per_layer").
3. LoRI-S: B restarts from zero and retrains under the mask at a higher learning rate; masked entries
   receive no gradient and are projected to zero after every step, so they stay exactly zero through
   AdamW (weight decay included).

Adapters are ordinary PEFT LoRA adapters: A is stored in the file (vLLM cannot rebuild it from a seed),
and the mask is saved beside it (one bit per entry of B).
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tclora.config import LoRISection

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

MASK_FILE = "lori_mask.safetensors"
LORI_FILE = "lori.json"


def lora_config(cfg: LoRISection, base_model_name_or_path: str | None = None) -> LoraConfig:
    # PEFT is imported where a PEFT model is built: it costs 3.5-4 s on 2 cores, and processes that import
    # this module without building one (the train stage's Tune trials, through pipelines.train) skip it.
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def check_target_modules(model: nn.Module, target_modules: Iterable[str]) -> None:
    """Fail early, naming the config key, when the model has none of a requested module name."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(target_modules) - leaf_names)
    if missing:
        raise ValueError(
            f"lori.target_modules: the model has no linear module(s) named {missing}; "
            f"available: {sorted(leaf_names)}"
        )


def _module_seed(seed: int, module_name: str) -> int:
    # Stable across processes (unlike hash()), so every worker and a resumed run draw the same A.
    return (seed * 1_000_003 + zlib.crc32(module_name.encode())) % (2**63)


def init_lori_(model: PeftModel, seed: int, train_a: bool = False) -> None:
    """Draw every A from its (seed, module name) stream, freeze it (unless ``train_a``: plain LoRA), zero B."""
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not isinstance(module.lora_A, nn.ModuleDict):
            continue
        for adapter, lin_a in module.lora_A.items():
            weight = lin_a.weight  # (r, d_in)
            a = random_a(seed, _base_name(name), tuple(weight.shape))
            with torch.no_grad():
                weight.copy_(a.to(weight.dtype))
                module.lora_B[adapter].weight.zero_()
            weight.requires_grad_(train_a)


def random_a(seed: int, module_name: str, shape: tuple[int, int]) -> torch.Tensor:
    """LoRI's frozen A of one module, float32 of ``shape`` (r, d_in), drawn from (seed, module name).

    Uniform in ±1/sqrt(d_in), LoRA's kaiming-uniform scale. The one definition of A: PEFT-attached
    adapters (:func:`init_lori_`) and fused groups (:mod:`tclora.multi_lori`) draw the same matrix.
    """
    gen = torch.Generator().manual_seed(_module_seed(seed, module_name))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _base_name(peft_module_name: str) -> str:
    """Module path in the base model: what adapters, merges and masks are keyed by."""
    return peft_module_name.removeprefix("base_model.model.")


def attach_lori(model: nn.Module, cfg: LoRISection, seed: int, base_model_name_or_path: str | None = None) -> PeftModel:
    """Wrap ``model`` with a LoRI adapter: seeded frozen A, zero trainable B.

    ``cfg.mode == "lora"``: plain LoRA (TC-LoRA's adapters), the same seeded A but trainable.

    Raises:
        ValueError: a target module name does not exist in the model.
    """
    from peft import get_peft_model  # see lora_config

    check_target_modules(model, cfg.target_modules)
    peft_model = get_peft_model(model, lora_config(cfg, base_model_name_or_path))
    init_lori_(peft_model, seed, train_a=cfg.mode == "lora")
    return peft_model


def lora_b_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The B matrices keyed by base-model module name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and isinstance(module.lora_B, nn.ModuleDict):
            for lin_b in module.lora_B.values():
                out[_base_name(name)] = lin_b.weight
    return out


def extract_masks(b_weights: dict[str, torch.Tensor], sparsity: float,
                  scope: str = "global") -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly ``round((1 - sparsity) * n)`` entries of largest |B|.

    ``global`` ranks all entries of all B's together (the LoRI paper's choice: layers that learned more
    keep more); ``per_layer`` keeps the same fraction in every B.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"lori.sparsity must be in [0, 1), got {sparsity}")
    names = list(b_weights)
    if scope == "per_layer":
        return {n: _top_fraction(b_weights[n].detach().abs().flatten(), 1 - sparsity).view_as(b_weights[n])
                for n in names}
    if scope != "global":
        raise ValueError(f"lori.mask_scope must be 'global' or 'per_layer', got {scope!r}")
    flat = torch.cat([b_weights[n].detach().abs().flatten().float() for n in names])
    keep = _top_fraction(flat, 1 - sparsity)
    masks, offset = {}, 0
    for n in names:
        size = b_weights[n].numel()
        masks[n] = keep[offset : offset + size].view_as(b_weights[n])
        offset += size
    return masks


def _top_fraction(values: torch.Tensor, fraction: float) -> torch.Tensor:
    k = round(fraction * values.numel())
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(values.float(), k).indices] = True  # topk, not a threshold: ties can't overshoot k
    return keep


class MaskedB:
    """Keeps masked B entries exactly zero: zero their gradients and project after each step."""

    def __init__(self, model: nn.Module | None, masks: dict[str, torch.Tensor],
                 params: dict[str, nn.Parameter] | None = None):
        """``params``: the B's to mask, keyed like ``masks`` (default: ``lora_b_params(model)``; a fused
        group passes its stacked (T, d_out, r) B's with stacked masks)."""
        self.params = params if params is not None else lora_b_params(model)
        missing = sorted(set(masks) ^ set(self.params))
        if missing:
            raise ValueError(f"mask and model disagree on adapted modules: {missing[:5]}")
        self.masks = {n: masks[n].to(self.params[n].device) for n in masks}
        self._hooks = [p.register_hook(self._grad_hook(self.masks[n])) for n, p in self.params.items()]

    @staticmethod
    def _grad_hook(mask: torch.Tensor):
        return lambda grad: grad * mask.to(grad.dtype)

    def reset_(self) -> None:
        """LoRI-S starts B from scratch."""
        with torch.no_grad():
            for p in self.params.values():
                p.zero_()

    def project_(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.mul_(self.masks[n].to(p.dtype))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def save_masks(masks: dict[str, torch.Tensor], adapter_dir: str | Path) -> None:
    """One bit per entry of B (packed, ``numpy.packbits``): 1/32 of B's float32 bytes, not 1/4."""
    packed = {n: torch.from_numpy(np.packbits(m.cpu().numpy().astype(bool).ravel())) for n, m in masks.items()}
    shapes = {n: list(m.shape) for n, m in masks.items()}
    save_file(packed, str(Path(adapter_dir) / MASK_FILE), metadata={"format": "packbits", "shapes": json.dumps(shapes)})


def load_masks(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    path = str(Path(adapter_dir) / MASK_FILE)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(path)
    if meta.get("format") != "packbits":  # one byte per entry: masks saved before bits were packed
        return {n: m.bool() for n, m in tensors.items()}
    shapes = json.loads(meta["shapes"])
    return {n: torch.from_numpy(np.unpackbits(tensors[n].numpy(), count=math.prod(shape)).astype(bool)).view(shape)
            for n, shape in shapes.items()}


def save_lori_adapter(model: PeftModel, out_dir: str | Path, masks: dict[str, torch.Tensor] | None, meta: dict) -> Path:
    """PEFT adapter files (A included) + mask + ``lori.json`` (seed, sparsity, phases, losses)."""
    out_dir = Path(out_dir)
    config = model.peft_config[model.active_adapter]
    modules = config.target_modules
    # PEFT keeps a set, written in the process's hash-seed order: sorted, the same adapter saves the same bytes.
    config.target_modules = sorted(modules)
    try:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        config.target_modules = modules
    if masks is not None:
        save_masks(masks, out_dir)
    (out_dir / LORI_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def parameter_counts(masks: dict[str, torch.Tensor], a_shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Trainable parameters of LoRI-S (mask non-zeros) against LoRA at the same rank (A and B trained).

    Args:
        masks: module name -> boolean mask of B, shape (d_out, r).
        a_shapes: module name -> A's shape (r, d_in).
    """
    lori_s = sum(int(m.sum()) for m in masks.values())
    lori_d = sum(m.numel() for m in masks.values())
    lora = lori_d + sum(r * d_in for r, d_in in a_shapes.values())
    return {
        "lora": lora,
        "lori_d": lori_d,
        "lori_s": lori_s,
        "lori_s_fraction_of_lora": lori_s / lora,
        "lori_d_fraction_of_lora": lori_d / lora,
    }


def lora_a_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
            for lin_a in module.lora_A.values():
                out[_base_name(name)] = tuple(lin_a.weight.shape)
    return out
