"""Tiny random models and batches for unit tests that need no pre-trained base."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 32: every Llama module name a real model has, in a few KB."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def random_batches(n_steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        yield {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
