"""Many LoRI adapters per base copy on one GPU: fused (one forward/backward for all) vs one after another, bf16.

    python -m benchmarks.bench_gpu_train                # CUDA: a 1.1B-parameter Llama built locally, 8 adapters
    python -m benchmarks.bench_gpu_train --smoke        # CPU, float32, a tiny model: checks the script runs
    python -m benchmarks.bench_gpu_train --adapters 4 --batch-size 4 --steps 20

Issue 16, target 2, its GPU half. The same step functions the Train worker runs (``tclora.train.
train_lori_adapter`` for one adapter, ``tclora.multi_lori.train_lori_group`` for a fused group; LoRI-D then
LoRI-S), each adapter on the same batches in both modes, with a plain AdamW instead of DeepSpeed, so it
needs neither Ray nor DeepSpeed. Modes, back to back on one loaded base:

- ``sequential``: the adapters one after another (what ``train.clusters_per_run: 1`` does per Train run);
- ``fused``: all of them in one forward/backward pass per step (``train.fused``, ``clusters_per_run >= 2``);
- ``fused_checkpointed``: the same with ``train.gradient_checkpointing`` (activation memory for compute).

Reported: adapters per hour of each mode and the ratio to ``sequential``; peak GPU memory of each; how far
each fused adapter's B is from the one trained alone (relative Frobenius norm: bf16 rounding on the GPU;
float32 on CPU, where the two agree to float rounding); and the merge of the trained adapters (``cp`` at
CP rank 4, ``linear``) timed on the GPU against the CPU. The base is a ``LlamaConfig`` with random weights
and the demo's word vocabulary (no hub at run time), saved and loaded through ``from_pretrained``; the rows
are the demo corpus's instruction families, short (~20 tokens), so one adapter's batch alone leaves a large
GPU idle: the regime where fusing pays most. Writes ``bench_gpu_train[_smoke].json`` and ``.png``.

On the device machine (no Ray, DeepSpeed, pydantic or tensorly there) carry wheels of ``pydantic``,
``pydantic-core``, ``annotated-types``, ``typing-inspection`` and ``tensorly`` (``/work/.library/device``'s
README) and run ``python3 -m benchmarks.bench_gpu_train --out $OUT``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from benchmarks.common import arg_parser, headline, machine_info, result_stem, setup_logging, write_result

log = logging.getLogger("benchmarks.gpu_train")
MODES = ("sequential", "fused", "fused_checkpointed")
FULL = dict(hidden=2048, layers=16, heads=16, intermediate=5632)  # TinyLlama-1.1B's shape, the demo's vocabulary
SMOKE = dict(hidden=32, layers=2, heads=2, intermediate=64)


def parse_args(argv: list[str] | None = None):
    p = arg_parser(__doc__)
    p.add_argument("--adapters", type=int, default=8, help="adapters per base copy (default 8)")
    p.add_argument("--steps", type=int, default=50, help="steps of each LoRI phase (default 50)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per adapter per step (default 16)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16, α = 2r)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def build_base(root: Path, shape: dict, dtype: str):
    """A random-weight Llama of ``shape`` saved as a checkpoint and loaded back as users load theirs."""
    from transformers import AutoModelForCausalLM

    from tclora.demo_base import DemoBaseSpec, build_word_tokenizer, demo_llama_config
    from tclora.models import load_base

    AutoModelForCausalLM.from_config(demo_llama_config(DemoBaseSpec(**shape))).save_pretrained(root)
    build_word_tokenizer().save_pretrained(root)
    return load_base(str(root), dtype=dtype)


def record_sets(n: int, rows: int) -> list[list[dict]]:
    """``n`` adapters' rows: the demo's instruction families in turn, a fresh payload seed per adapter."""
    from tclora import demo_corpus

    families = list(demo_corpus.FAMILIES)
    family = [families[t % len(families)] for t in range(n)]
    return [[r for r in demo_corpus.generate_split("train", rows, seed=t) if r["task_name"] == family[t]]
            for t in range(n)]


def train_mode(mode: str, model, tokenizer, sets, lori_cfg, train_cfg, out: Path, device: str) -> dict:
    """Train every adapter in ``mode``; seconds, adapters/hour and peak memory (GiB, CUDA only)."""
    import torch

    from tclora.models import set_gradient_checkpointing
    from tclora.multi_lori import train_lori_group
    from tclora.train import train_lori_adapter

    seeds = list(range(len(sets)))
    dirs = [out / mode / f"adapter-{t}" for t in seeds]
    set_gradient_checkpointing(model, mode == "fused_checkpointed")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if mode == "sequential":
        for records, seed, d in zip(sets, seeds, dirs):
            train_lori_adapter(model, tokenizer, records, lori_cfg, train_cfg, seed=seed, out_dir=d, max_length=64)
    else:
        train_lori_group(model, tokenizer, sets, lori_cfg, train_cfg, seeds=seeds, out_dirs=dirs, max_length=64)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    log.info("%s: %d adapters in %.1f s", mode, len(sets), seconds)
    return {"seconds": round(seconds, 2), "adapters_per_hour": round(3600 * len(sets) / seconds, 1),
            "peak_memory_gib": None if peak is None else round(peak, 2), "dirs": [str(d) for d in dirs]}


def b_distance(alone: list[str], fused: list[str]) -> float:
    """Largest ``‖B_fused - B_alone‖ / ‖B_alone‖`` over every adapter and module."""
    from safetensors.torch import load_file

    worst = 0.0
    for a, f in zip(alone, fused):
        want, got = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (a, f))
        for key in (k for k in want if "lora_B" in k):
            w, g = want[key].float(), got[key].float()
            worst = max(worst, float((g - w).norm() / w.norm().clamp(min=1e-12)))
    return worst


def merge_seconds(dirs: list[str], device: str, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Seconds of ``cp`` (CP rank 4) and ``linear`` merges of the adapters on ``device`` and on the CPU (best of
    ``repeats``, after one warm-up)."""
    import torch

    from tclora.merge import merge_adapters
    from tclora.peft_merge import load_adapters

    _, factors = load_adapters(dirs)
    times: dict[str, dict[str, float]] = {}
    for where in dict.fromkeys([device, "cpu"]):
        moved = [{m: f.to(where, torch.float32) for m, f in adapter.items()} for adapter in factors]
        for method, params in (("cp", {"rank": 4}), ("linear", {})):
            runs = []
            for _ in range(repeats + 1):
                started = time.perf_counter()
                merge_adapters(moved, method, params=params)
                if where == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - started)
            times.setdefault(method, {})[where] = round(min(runs[1:]), 4)
    return times


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = result["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(list(modes), [m["adapters_per_hour"] for m in modes.values()], color="tab:blue")
    axes[0].set_ylabel("adapters / hour")
    axes[1].bar(list(modes), [m["peak_memory_gib"] or 0 for m in modes.values()], color="tab:orange")
    axes[1].set_ylabel("peak memory (GiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"{result['adapters']} LoRI adapters on one {result['device']} base copy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import torch

    from tclora.config import LoRISection, TrainSection

    args = parse_args(argv)
    setup_logging()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not (args.smoke or args.device):  # a 1.1B base on 2 cores would take hours
        raise SystemExit("bench_gpu_train: no CUDA device here; --smoke runs a tiny model on the CPU, "
                         "--device cpu the full size anyway")
    dtype = "bfloat16" if device == "cuda" else "float32"
    n, steps = (2, 4) if args.smoke else (args.adapters, args.steps)
    batch, rank = (4, 4) if args.smoke else (args.batch_size, args.rank)
    lori_cfg = LoRISection(rank=rank, alpha=2.0 * rank, sparsity=0.9, mode="lori_s")
    train_cfg = TrainSection(steps=steps, sparse_steps=steps, batch_size=batch, lr=1e-3, sparse_lr_multiplier=10.0)
    with tempfile.TemporaryDirectory(prefix="tclora-gpu-bench-") as tmp:
        model, tokenizer = build_base(Path(tmp) / "base", SMOKE if args.smoke else FULL, dtype)
        model.to(device)
        sets = record_sets(n, rows=max(64, batch * steps))
        warm = TrainSection(steps=2, sparse_steps=2, batch_size=batch, lr=1e-3)  # CUDA context, cuBLAS, allocator
        train_mode("fused", model, tokenizer, sets, lori_cfg, warm, Path(tmp) / "warm-up", device)
        modes = {m: train_mode(m, model, tokenizer, sets, lori_cfg, train_cfg, Path(tmp), device) for m in MODES}
        distance = {m: b_distance(modes["sequential"]["dirs"], modes[m]["dirs"]) for m in MODES[1:]}
        merges = merge_seconds(modes["fused"]["dirs"], device)
    for m in modes.values():
        m.pop("dirs")
    parameters = sum(p.numel() for p in model.parameters())
    speedup = modes["fused"]["adapters_per_hour"] / modes["sequential"]["adapters_per_hour"]
    result = {
        "benchmark": "gpu_train", "smoke": args.smoke, "device": torch.cuda.get_device_name() if device == "cuda"
        else "cpu", "dtype": dtype, "base_parameters": parameters, "adapters": n, "steps_per_phase": steps,
        "batch_size_per_adapter": batch, "rank": rank, "modes": modes, "b_relative_distance": distance,
        "merge_seconds": merges, "machine": machine_info(),
        "headline": [headline("gpu_train: fused vs one after another", round(speedup, 2),
                              f"{speedup:.2f}x adapters/hour ({n} adapters, {device}, {dtype})")],
    }
    write_result(args.out, result_stem("gpu_train", args.smoke), result, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
