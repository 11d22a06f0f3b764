"""Base model loading (hub name, local checkpoint or the offline ``"demo"`` base) and the MiniLM lookup.

The demo base itself (tokenizer, pre-training, cache) lives in :mod:`tclora.demo_base`; here it is just
another ``from_pretrained`` checkpoint, exactly the code path a user takes with Phi-3 or Mistral.

    model, tok = load_base("demo")                                  # built once, then cached
    model, tok = load_base("microsoft/Phi-3-mini-4k-instruct", dtype="bfloat16")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tclora.demo_base import DemoBaseSpec, build_demo_base, demo_llama_config, demo_spec

if TYPE_CHECKING:
    from tclora.config import ModelSection

log = logging.getLogger(__name__)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def load_base(
    name_or_path: str, *, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
    cache_dir: str | Path | None = None, demo_spec: DemoBaseSpec | None = None,
):
    """``(model, tokenizer)`` for a hub name, a local checkpoint, or ``"demo"`` (built once, cached).

    Safe by default: safetensors weights only, and no repository code unless ``trust_remote_code``.
    The tokenizer always has a pad token (falling back to EOS, as for Llama/Mistral).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(build_demo_base(cache_dir, demo_spec or DemoBaseSpec())) if name_or_path == "demo" else name_or_path
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_torch_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def load_base_for(model_cfg: ModelSection) -> tuple:
    """``load_base`` from a :class:`tclora.config.ModelSection`."""
    return load_base(model_cfg.name_or_path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                     cache_dir=model_cfg.cache_dir, demo_spec=demo_spec(model_cfg))


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Turn transformers' gradient (activation) checkpointing on or off, non-reentrant: each decoder layer's
    activations are recomputed in the backward pass instead of kept (``train.gradient_checkpointing``). It acts
    in training mode only, and on frozen inputs too (LoRA, no ``enable_input_require_grads`` needed).

    The recomputation runs fused LoRI groups' layers in the mode their forward ran in
    (``tclora.multi_lori.checkpoint_context``), so ``train.merge_aware``'s summed pass is recomputed summed.

    transformers 5.2x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and
    deprecated the old name; older releases have only the old one.
    """
    from tclora.multi_lori import checkpoint_context

    kwargs = {"use_reentrant": False, "context_fn": checkpoint_context}
    new_api = hasattr(model, "activation_checkpointing_enable")
    if enabled and new_api:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()


def module_skeleton(model_cfg: ModelSection) -> torch.nn.Module:
    """The base model of a :class:`tclora.config.ModelSection` on the meta device: its module tree only.

    Reads just the model's config (for ``"demo"``, not even that: nothing is built), so it is cheap enough
    to check module names before any stage runs.

    Raises:
        OSError: the config cannot be read here (no such checkpoint, or an unreachable hub).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.name_or_path == "demo":
        config = demo_llama_config(demo_spec(model_cfg))
    else:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):  # shapes without storage: a 7B skeleton costs no memory
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)


