"""The LoRI training recipe, read top to bottom: attach → LoRI-D → mask → LoRI-S → save.

The loop talks to an *engine* with DeepSpeed's three-call interface (``engine(**batch)``,
``engine.backward(loss)``, ``engine.step()``). :class:`TorchEngine` gives plain PyTorch the same
shape, so the single-process path and the Ray Train + DeepSpeed workers share this one loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from tclora import data, lori
from tclora.config import LoRISection, TrainSection

log = logging.getLogger(__name__)


class Engine(Protocol):
    module: nn.Module

    def __call__(self, **batch: torch.Tensor): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...


def clip_grad_norm_per_adapter_(params: Sequence[nn.Parameter], max_norm: float, n_adapters: int = 1) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each adapter on its own: scale adapter t's gradient by
    ``min(1, max_norm / (‖g_t‖₂ + 1e-6))``, the norm taken over all of its parameters.

    A fused group stacks its T adapters along dim 0 of every parameter (B: (T, d_out, r)); one adapter
    (``n_adapters=1``) owns the whole of each parameter. Clipping the group's global norm instead would
    make each adapter's step depend on the others' gradients.

    Returns:
        (T,) the adapters' gradient norms before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(n_adapters)
    norms = torch.stack([g.reshape(n_adapters, -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (T,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(n_adapters, *[1] * (g.dim() - 1)))
    return norms


class TorchEngine:
    """DeepSpeed's engine interface over a plain AdamW, for single-process training."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0):
        self.module = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def __call__(self, **batch: torch.Tensor):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass(frozen=True)
class Phase:
    name: str  # "dense" (LoRI-D) or "sparse" (LoRI-S)
    steps: int
    lr: float


def lori_phases(train: TrainSection, lori_cfg: LoRISection) -> list[Phase]:
    phases = [Phase("dense", train.steps, train.lr)]
    if lori_cfg.mode == "lori_s":
        phases.append(Phase("sparse", train.sparse_steps or train.steps, train.lr * train.sparse_lr_multiplier))
    return phases


class LoRIAdapters(Protocol):
    """The adapters one step function trains together: one PEFT model (:class:`SoloLoRI`), or several
    adapters fused into one forward/backward pass (:class:`tclora.multi_lori.LoRIGroup`)."""

    model: nn.Module

    def extract_masks(self, sparsity: float, scope: str = "global") -> Any: ...
    def masked(self, masks: Any) -> lori.MaskedB: ...


class SoloLoRI:
    """One LoRI adapter attached to the base (a PEFT model): :class:`LoRIAdapters` of size one."""

    def __init__(self, model: nn.Module):
        self.model = model

    def extract_masks(self, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
        return lori.extract_masks(lori.lora_b_params(self.model), sparsity, scope)

    def masked(self, masks: dict[str, torch.Tensor]) -> lori.MaskedB:
        return lori.MaskedB(self.model, masks)


def run_lori_phases(
    adapters: LoRIAdapters,
    phases: Sequence[Phase],
    lori_cfg: LoRISection,
    run_phase: Callable[[int, Phase, "lori.MaskedB | None"], None],
    *,
    start: int = 0,
    masks: Any = None,
    on_phase_end: Callable[[int, Any], None] | None = None,
) -> Any:
    """The LoRI phase sequence (LoRI-D, mask, LoRI-S), from phase ``start``; returns the masks (None for LoRI-D only).

    ``run_phase(index, phase, masked)`` trains one phase (``masked``: the sparse phase's gradient and
    weight masking, hooked before the phase's engine is built, so masked gradients are what ZeRO
    buckets). The masks are taken from B at the *end* of the phase before LoRI-S, so that a checkpoint
    written in ``on_phase_end(index, masks)`` already holds them and a resume at LoRI-S's first step
    needs no B to re-derive them. ``masks``: those of a resumed run that is past LoRI-D.
    Source: LoRI (Zhang et al., 2025, arXiv 2504.07448), Sec. 3: dense training, top-(1-s) |B| mask,
    sparse training from reset B.
    """
    for index in range(start, len(phases)):
        masked = adapters.masked(masks) if phases[index].name == "sparse" else None
        if masked is not None:
            masked.reset_()
        run_phase(index, phases[index], masked)
        if masked is not None:
            masked.remove()
        if index + 1 < len(phases) and phases[index + 1].name == "sparse":
            masks = adapters.extract_masks(lori_cfg.sparsity, lori_cfg.mask_scope)
        if on_phase_end is not None:
            on_phase_end(index, masks)
    return masks


def adapter_meta(lori_cfg: LoRISection, seed: int, losses: Mapping[str, Sequence[float]], seconds: float, *,
                 masks: dict[str, torch.Tensor] | None = None, a_shapes: Mapping[str, tuple] | None = None,
                 **extra: Any) -> dict:
    """``lori.json`` of a finished adapter: LoRI settings, first and last loss per phase (last: mean of
    the final 10 steps), parameter counts when masked, seconds, and ``extra`` (cluster id, rows, resumes...)."""
    meta: dict[str, Any] = {"seed": seed, "rank": lori_cfg.rank, "alpha": lori_cfg.alpha, "mode": lori_cfg.mode,
                            "sparsity": lori_cfg.sparsity, "mask_scope": lori_cfg.mask_scope, **extra}
    for name, values in losses.items():
        meta[f"{name}_loss_first"], meta[f"{name}_loss_last"] = values[0], sum(values[-10:]) / len(values[-10:])
    if masks is not None:
        meta["parameters"] = lori.parameter_counts(masks, a_shapes)
    meta["seconds"] = round(seconds, 2)
    return meta


def causal_lm_loss(engine: Engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The model's own loss (mean over label tokens); the loss and the value to record."""
    loss = engine(**batch).loss
    return loss, loss.item()


def train_loop(
    engine: Engine,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    *,
    masked: lori.MaskedB | None = None,
    start_step: int = 0,
    on_step: Callable[[int, Any], None] | None = None,
    desc: str = "train",
    loss_fn: Callable[[Engine, dict[str, torch.Tensor]], tuple[torch.Tensor, Any]] = causal_lm_loss,
    max_grad_norm: float = 0.0,
    n_adapters: int = 1,
) -> list:
    """Run optimizer steps ``start_step .. steps-1``; returns the recorded losses.

    ``loss_fn(engine, batch)`` gives the loss to backpropagate and the value recorded per step (a float;
    a fused group of adapters records one loss per adapter: :func:`tclora.multi_lori.routed_loss`).
    ``max_grad_norm``: clip each of the engine's ``n_adapters`` adapters before every step
    (:func:`clip_grad_norm_per_adapter_`; 0: off, e.g. when a DeepSpeed engine clips itself).
    ``on_step(step, recorded)`` runs after each step (the Ray worker reports and checkpoints there).
    """
    engine.module.train()
    device = next(engine.module.parameters()).device
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    losses = []
    it: Iterator = iter(batches)
    bar = tqdm(range(start_step, steps), desc=desc, leave=False, disable=None)
    for step in bar:
        batch = {k: v.to(device) for k, v in next(it).items()}
        loss, recorded = loss_fn(engine, batch)
        engine.backward(loss)
        if max_grad_norm:
            clip_grad_norm_per_adapter_(trainable, max_grad_norm, n_adapters)
        engine.step()
        if masked is not None:
            masked.project_()
        losses.append(recorded)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def train_lori_adapter(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict],
    lori_cfg: LoRISection,
    train_cfg: TrainSection,
    *,
    seed: int,
    out_dir: str | Path,
    max_length: int,
    base_model_name_or_path: str | None = None,
    make_engine: Callable[[nn.Module, float], Engine] | None = None,
) -> dict:
    """Train one LoRI adapter on ``records`` and save it (PEFT files + mask) to ``out_dir``.

    ``model`` is the base model; it is wrapped in place with a PEFT adapter and unwrapped afterwards.
    ``make_engine(model, lr)`` builds the optimizer engine per phase (default: :class:`TorchEngine`).
    Returns the metadata written to ``lori.json``.
    """
    make_engine = make_engine or (lambda m, lr: TorchEngine(m, lr, train_cfg.weight_decay))
    peft_model = lori.attach_lori(model, lori_cfg, seed, base_model_name_or_path)
    started, losses = time.time(), {}
    phases = lori_phases(train_cfg, lori_cfg)

    def run_phase(index: int, phase: Phase, masked: lori.MaskedB | None) -> None:
        stream = data.batches(records, tokenizer, train_cfg.batch_size, max_length, phase.steps, seed=seed)
        losses[phase.name] = train_loop(make_engine(peft_model, phase.lr), stream, phase.steps, masked=masked,
                                        desc=f"LoRI {phase.name}", max_grad_norm=train_cfg.max_grad_norm)
        log.info("LoRI %s: %d steps, loss %.3f -> %.3f", phase.name, phase.steps, losses[phase.name][0],
                 sum(losses[phase.name][-10:]) / len(losses[phase.name][-10:]))

    masks = run_lori_phases(SoloLoRI(peft_model), phases, lori_cfg, run_phase)
    meta = adapter_meta(lori_cfg, seed, losses, time.time() - started, masks=masks,
                        a_shapes=lori.lora_a_shapes(peft_model), rows=len(records))
    lori.save_lori_adapter(peft_model, out_dir, masks, meta)
    peft_model.unload()  # the base model is left exactly as it came in
    return meta
