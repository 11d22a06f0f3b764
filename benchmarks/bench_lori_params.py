"""LoRI's trainable parameters and adapter bytes against PEFT LoRA at the same rank, at 7B shapes.

    python -m benchmarks.bench_lori_params              # Mistral-7B and Phi-3-mini shapes, 2 layers each: ~1 min
    python -m benchmarks.bench_lori_params --smoke      # the same shapes divided by 32, seconds
    python -m benchmarks.bench_lori_params --shapes mistral-7b --layers 1 --sparsity 0.95

Nothing is downloaded: the model is built from a config with random weights (bfloat16), with the real
layer shapes but only ``--layers`` layers and a 256-token vocabulary (embeddings are not adapted), then
wrapped by ``tclora.lori.attach_lori`` at rank 32, targets q,k,v,o,gate,up,down. Every layer has the
same modules, so whole-model figures are the measured ones x (real layers / measured layers); the JSON
says so (``extrapolation``). ``phi3-mini`` uses the unfused Llama layout (Phi-3 checkpoints fuse
qkv_proj and gate_up_proj; split, the seven targets have the same total shapes).

Counted (whole model):
- ``lora``: PEFT LoRA trainable parameters at the same rank (A and B);
- ``lori_d``: LoRI-D, B only (A is frozen);
- ``lori_s``: LoRI-S, the non-zeros of B under the global top-(1 - sparsity) mask.
B is filled with Gaussian noise as a stand-in for a trained LoRI-D B before the mask is extracted (the
counts do not depend on the values).

Bytes (safetensors adapter file only; ``adapter_config.json``, ~1 KB, is needed by all and excluded):
- ``lora_peft``: ``PeftModel.save_pretrained``: dense A and B, what a LoRA at this rank weighs;
- ``lori_as_saved``: ``tclora.lori.save_lori_adapter`` today: the same PEFT file + a uint8 mask file;
- ``sparse_<index>_a_<seed|explicit>``: :func:`save_sparse_lori` below: B's non-zeros as values plus
  their positions (``bitmask``: one bit per entry of B, packed; ``int32``: one flat index per non-zero),
  and A either rebuilt from the seed (not stored) or stored explicitly (vLLM cannot rebuild A). The
  files are read back and checked to reproduce A and the masked B exactly.

Targets: LoRI-S <= 5% of LoRA's trainable parameters; sparse storage <= 15% of LoRA's bytes.
Writes ``bench_lori_params[_smoke].json`` and ``.png`` to ``--out``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result
from tclora import lori
from tclora.adapters import ADAPTER_WEIGHTS
from tclora.config import LoRISection

log = logging.getLogger("benchmarks.lori_params")

# Real decoder shapes. kv_heads < heads is grouped-query attention (k, v project to kv_heads * head_dim).
SHAPES = {
    "mistral-7b": dict(arch="mistral", hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32),
    "phi3-mini": dict(arch="llama", hidden=3072, intermediate=8192, heads=32, kv_heads=32, layers=32),
}
SMOKE_DIVISOR = 32  # --smoke: hidden and MLP widths / 32, head counts kept: every module shape / 32, same ratios
TARGET_PARAM_FRACTION = 0.05
TARGET_BYTES_FRACTION = 0.15
VOCAB = 256  # embeddings and lm_head are not adapted; a small vocab keeps the model in memory


def build_model(shape: dict, layers: int, divisor: int = 1):
    """A causal LM with ``shape``'s linear-layer shapes (widths / ``divisor``) and random bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    hidden, heads = shape["hidden"] // divisor, shape["heads"]
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=shape["intermediate"] // divisor,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=shape["kv_heads"],
              head_dim=hidden // heads, tie_word_embeddings=False)
    config_cls, model_cls = ((MistralConfig, MistralForCausalLM) if shape["arch"] == "mistral"
                             else (LlamaConfig, LlamaForCausalLM))
    torch.manual_seed(0)
    return model_cls(config_cls(**kw)).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# A sparse LoRI-S adapter file. Belongs in tclora.lori (see benchmarks/README.md); here until it moves.


def save_sparse_lori(path: Path, b: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                     a: dict[str, torch.Tensor], *, seed: int, index: str, a_explicit: bool) -> int:
    """B's non-zeros + their positions (+ A, or only the seed A is drawn from); returns the file's bytes.

    Args:
        b: module -> B (d_out, r), already zero outside its mask.
        masks: module -> boolean mask of B (d_out, r).
        a: module -> A (r, d_in); only its shape is stored unless ``a_explicit``.
        index: ``"bitmask"`` (packed, 1 bit per entry of B) or ``"int32"`` (one flat index per non-zero).
    """
    tensors, shapes = {}, {}
    for name, B in b.items():
        keep = masks[name].flatten()  # (d_out * r,)
        tensors[f"{name}.lora_B.values"] = B.flatten()[keep].contiguous()  # (nnz,)
        if index == "bitmask":
            # (ceil(d_out * r / 8),) uint8
            tensors[f"{name}.lora_B.bitmask"] = torch.from_numpy(np.packbits(keep.numpy()))
        elif index == "int32":
            tensors[f"{name}.lora_B.indices"] = keep.nonzero().flatten().to(torch.int32)  # (nnz,)
        else:
            raise ValueError(f"index must be 'bitmask' or 'int32', got {index!r}")
        if a_explicit:
            tensors[f"{name}.lora_A.weight"] = a[name].contiguous()
        shapes[name] = [B.shape[0], B.shape[1], a[name].shape[1]]  # d_out, r, d_in
    meta = {"format": "lori-sparse-v0", "index": index, "a": "explicit" if a_explicit else "seed", "seed": str(seed),
            "shapes": json.dumps(shapes)}
    save_file(tensors, str(path), metadata=meta)
    return path.stat().st_size


def frozen_a(seed: int, module: str, r: int, d_in: int) -> torch.Tensor:
    """LoRI's A for ``module``, redrawn exactly as ``tclora.lori.init_lori_`` draws it."""
    gen = torch.Generator().manual_seed(lori._module_seed(seed, module))
    bound = 1.0 / math.sqrt(d_in)  # same arithmetic as init_lori_, so the floats match bit for bit
    return (torch.rand((r, d_in), generator=gen) * 2 - 1) * bound


def load_sparse_lori(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(B, A)`` by module, dense, from a :func:`save_sparse_lori` file."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        shapes, seed = json.loads(meta["shapes"]), int(meta["seed"])
        b, a = {}, {}
        for name, (d_out, r, d_in) in shapes.items():
            values = f.get_tensor(f"{name}.lora_B.values")
            flat = torch.zeros(d_out * r, dtype=values.dtype)
            if meta["index"] == "bitmask":
                bits = np.unpackbits(f.get_tensor(f"{name}.lora_B.bitmask").numpy(), count=d_out * r)
                flat[torch.from_numpy(bits.astype(bool))] = values
            else:
                flat[f.get_tensor(f"{name}.lora_B.indices").long()] = values
            b[name] = flat.view(d_out, r)
            a[name] = (f.get_tensor(f"{name}.lora_A.weight") if meta["a"] == "explicit"
                       else frozen_a(seed, name, r, d_in))
    return b, a


# --------------------------------------------------------------------------------------------------


def measure(name: str, shape: dict, args, work: Path) -> dict:
    """Counts and bytes for one model shape, measured on ``args.layers`` layers, extrapolated to all."""
    divisor = SMOKE_DIVISOR if args.smoke else 1
    started = time.perf_counter()
    model = build_model(shape, args.layers, divisor)
    cfg = LoRISection(rank=args.rank, alpha=2 * args.rank, sparsity=args.sparsity)
    peft_model = lori.attach_lori(model, cfg, seed=args.seed)

    # LoRA at the same LoraConfig trains every lora_ parameter; LoRI leaves only B trainable.
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    b_params = lori.lora_b_params(peft_model)
    a_shapes = lori.lora_a_shapes(peft_model)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for p in b_params.values():  # stand-in for a trained LoRI-D B: the mask needs distinct magnitudes
            p.copy_(torch.randn(p.shape, generator=gen))
    masks = lori.extract_masks(b_params, args.sparsity, "global")
    counts = lori.parameter_counts(masks, a_shapes)
    assert counts["lora"] == lora_params and counts["lori_d"] == trainable, (counts, lora_params, trainable)
    with torch.no_grad():
        for n, p in b_params.items():  # LoRI-S's B: zero outside the mask
            p.mul_(masks[n].to(p.dtype))

    # Bytes: the PEFT LoRA file, LoRI as tclora saves it today, and the sparse variants.
    files: dict[str, int] = {}
    lora_dir = work / f"{name}-lora"
    peft_model.save_pretrained(str(lora_dir), safe_serialization=True)
    files["lora_peft"] = (lora_dir / ADAPTER_WEIGHTS).stat().st_size
    lori_dir = work / f"{name}-lori"
    lori.save_lori_adapter(peft_model, lori_dir, masks, {"seed": args.seed})
    files["lori_as_saved"] = files["lora_peft"] + (lori_dir / lori.MASK_FILE).stat().st_size
    b = {n: p.detach() for n, p in b_params.items()}
    a = {n: m.lora_A["default"].weight.detach() for n, m in _lora_modules(peft_model).items()}
    for index in ("bitmask", "int32"):
        for a_explicit in (False, True):
            key = f"sparse_{index}_a_{'explicit' if a_explicit else 'seed'}"
            path = work / f"{name}-{key}.safetensors"
            files[key] = save_sparse_lori(path, b, masks, a, seed=args.seed, index=index, a_explicit=a_explicit)
            b2, a2 = load_sparse_lori(path)  # the format is only worth its bytes if it reads back exactly
            assert all(torch.equal(b2[n], b[n]) and torch.equal(a2[n], a[n]) for n in b), f"{key} does not round-trip"

    scale = shape["layers"] / args.layers
    lora, lori_d = counts["lora"] * scale, counts["lori_d"] * scale
    params = {"lora": round(lora), "lori_d": round(lori_d), "lori_s": round((1 - args.sparsity) * lori_d),
              "lori_d_fraction_of_lora": counts["lori_d_fraction_of_lora"],
              "lori_s_fraction_of_lora": counts["lori_s_fraction_of_lora"],
              # Sparsity at which LoRI-S would reach the 5% target on this shape.
              "sparsity_for_target": 1 - TARGET_PARAM_FRACTION * counts["lora"] / counts["lori_d"]}
    whole = {k: round(v * scale) for k, v in files.items()}
    fractions = {k: v / files["lora_peft"] for k, v in files.items()}
    a_bytes = files["sparse_bitmask_a_explicit"] - files["sparse_bitmask_a_seed"]  # A's share of the explicit file
    spare = TARGET_BYTES_FRACTION * files["lora_peft"] - files["sparse_bitmask_a_seed"]
    log.info("%s: LoRI-S %.2f%% of LoRA params; sparse (bitmask) %.1f%% of LoRA bytes with A from seed, %.1f%% with A",
             name, 100 * params["lori_s_fraction_of_lora"], 100 * fractions["sparse_bitmask_a_seed"],
             100 * fractions["sparse_bitmask_a_explicit"])
    return {
        "shape": {**shape, "divided_by": divisor, "vocab_size": VOCAB},
        "extrapolation": (f"measured on {args.layers} of {shape['layers']} layers; whole-model counts and bytes = "
                          f"measured x {scale:g} (every layer has the same seven modules)"),
        "adapter_dtype": str(next(iter(b.values())).dtype).removeprefix("torch."),
        "params": params,
        "params_measured": counts,
        "bytes": whole,
        "bytes_measured": files,
        "bytes_fraction_of_lora": fractions,
        # A explicit but one A shared by T adapters (lori.shared_a): the smallest T meeting the bytes target.
        "shared_a_adapters_for_target": math.ceil(a_bytes / spare) if spare > 0 else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _lora_modules(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)}


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def headlines(models: dict) -> list[dict]:
    rows = []
    for name, m in models.items():
        p, f = m["params"], m["bytes_fraction_of_lora"]
        rows.append(headline(f"{name}: LoRI-S trainable params / LoRA", p["lori_s_fraction_of_lora"],
                             f"{p['lori_s_fraction_of_lora']:.2%} ({_count(p['lori_s'])} of {_count(p['lora'])})",
                             target=f"<= {TARGET_PARAM_FRACTION:.0%}",
                             met=p["lori_s_fraction_of_lora"] <= TARGET_PARAM_FRACTION))
        for variant, label in (("sparse_bitmask_a_seed", "A from seed"), ("sparse_bitmask_a_explicit", "A explicit")):
            rows.append(headline(f"{name}: LoRI-S sparse bytes ({label}) / LoRA", f[variant],
                                 f"{f[variant]:.1%} ({m['bytes'][variant] / 2**20:.1f} of "
                                 f"{m['bytes']['lora_peft'] / 2**20:.1f} MiB)",
                                 target=f"<= {TARGET_BYTES_FRACTION:.0%}", met=f[variant] <= TARGET_BYTES_FRACTION))
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(models)
    pkeys = ["lora", "lori_d", "lori_s"]
    bkeys = ["lora_peft", "lori_as_saved", "sparse_bitmask_a_explicit", "sparse_bitmask_a_seed"]
    for j, (name, m) in enumerate(models.items()):
        ax1.bar([i + j * width for i in range(len(pkeys))], [m["params"][k] / 1e6 for k in pkeys], width, label=name)
        ax2.bar([i + j * width for i in range(len(bkeys))], [m["bytes"][k] / 2**20 for k in bkeys], width, label=name)
    ax1.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(pkeys))],
                   ["LoRA (A+B)", "LoRI-D (B)", "LoRI-S (nnz B)"])
    ax1.set_ylabel("trainable parameters (M)")
    ax2.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(bkeys))],
                   ["LoRA PEFT", "LoRI saved today", "sparse, A explicit", "sparse, A seed"], rotation=15)
    ax2.set_ylabel("adapter file (MiB)")
    r = result["config"]
    fig.suptitle(f"rank {r['rank']}, sparsity {r['sparsity']}, whole model (extrapolated from {r['layers']} layer(s))"
                 + (" [smoke: widths / 32]" if result["smoke"] else ""), fontsize=10)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def parse_args(argv: list[str] | None = None):
    p = arg_parser(__doc__)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="model shapes to measure")
    p.add_argument("--layers", type=int, default=2, help="layers actually built (the rest is extrapolated)")
    p.add_argument("--rank", type=int, default=32, help="LoRA / LoRI rank r (alpha = 2r, as in the LoRI paper)")
    p.add_argument("--sparsity", type=float, default=0.9, help="LoRI-S: fraction of B's entries masked out")
    p.add_argument("--seed", type=int, default=0, help="seed of A (and of the stand-in B)")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    result = {"benchmark": "lori_params", "smoke": args.smoke, "machine": machine_info(),
              "config": {"rank": args.rank, "alpha": 2 * args.rank, "sparsity": args.sparsity, "mask_scope": "global",
                         "layers": args.layers, "targets": list(LoRISection().target_modules), "seed": args.seed},
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            result["models"][name] = measure(name, SHAPES[name], args, Path(tmp))
    result["headline"] = headlines(result["models"])
    write_result(args.out, result_stem("lori_params", args.smoke), result, plot)
    return result


if __name__ == "__main__":
    main()
