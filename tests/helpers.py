"""Tiny random models and batches for unit tests that need no pre-trained base; tiny run configs."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    """2 layers, hidden 32: every Llama module name a real model has, in a few KB; ``config`` overrides
    LlamaConfig fields (e.g. ``attention_bias=True``)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64), **config})
    return LlamaForCausalLM(cfg)


def random_batches(n_steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        yield {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def demo_run_config(run_dir: Path, base: Path, **sections: dict) -> dict:
    """A raw config for the whole pipeline on the demo corpus at smoke size; ``sections`` update its sections."""
    raw = {
        "run": {"dir": str(run_dir), "seed": 0},
        "data": {"path": "demo", "demo_train_per_task": 20, "demo_eval_per_task": 4},
        "model": {"name_or_path": str(base), "max_length": 64},
        "embed": {"batch_size": 256, "view": "template"},  # as configs/demo.yaml
        "cluster": {"k": 2, "min_cluster_size": 1, "n_init": 2},
        "lori": {"rank": 4, "alpha": 8.0, "sparsity": 0.8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"steps": 4, "sparse_steps": 3, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 50,
                  "max_concurrent": 2, "cpus_per_worker": 1.0},
        "merge": {"methods": ["cp", "linear"], "cp_iters": 10},
        "eval": {"batch_size": 64, "max_new_tokens": 8},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return raw
