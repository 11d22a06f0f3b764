"""Many LoRI adapters on one base copy, trained in one forward/backward pass (fused training).

The approach of mLoRA (arXiv 2312.02515) and LoRAFusion (arXiv 2510.00206): a step concatenates the
micro-batch each adapter would see alone into one batch of T segments; every adapted linear layer adds
``s · B_t A_t x`` to the rows of segment t only, as two batched matmuls over the T adapters:

    x (T·b, L, d_in) → (T, b·L, d_in) ─bmm Aᵀ (T, d_in, r)→ (T, b·L, r) ─bmm Bᵀ (T, r, d_out)→ (T, b·L, d_out)

PEFT's own mixed-batch forward (``adapter_names=``) refuses training mode (peft 0.21,
``tuners/lora/model.py``), hence this small layer. Exactness against solo training:

- loss: adapter t's loss is the mean token cross-entropy over its own rows (what the model's loss is
  for its solo batch); the group's loss is the *sum* over adapters, so ∂loss/∂B_t is adapter t's solo
  gradient (B_t touches only its rows; no other term depends on it);
- optimizer: AdamW is element-wise, so one optimizer over the stacked B's is T independent ones with
  equal hyperparameters (the group shares the phase schedule and learning rates);
- masks: LoRI's global top-(1-s) |B| ranks adapter t's B's only (:meth:`LoRIGroup.extract_masks`);
- padding: segments are right-padded to a common width; causal attention with the attention mask
  leaves real positions unchanged (float rounding aside) and padded labels are -100.

Adapters are saved one by one through the single-adapter path (:func:`tclora.lori.save_lori_adapter`
on a PEFT adapter holding adapter t's A and B), so files are identical in layout to solo saves.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, get_args

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tclora import lori
from tclora.config import LoRISection, MergeAwareUpdates

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "lori_group.safetensors"


def adapter_masks(masks: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    """Adapter t's masks, keyed by module, out of a group's (:meth:`LoRIGroup.extract_masks`)."""
    prefix = f"{t}/"
    return {key[len(prefix):]: m for key, m in masks.items() if key.startswith(prefix)}


@dataclass(frozen=True)
class _SumMode:
    """How the routed layers sum their group's adapters inside :meth:`LoRIGroup.summed`.

    mask: (T, T) 0/1, row t the adapters segment t's rows are summed over (None: all of them).
    updates: (T, T) 0/1, row t the adapters whose B's segment t's loss trains (None: all of them).
    """

    mask: torch.Tensor | None = None
    updates: torch.Tensor | None = None


# How the routed layers run: None routes segment t's rows through adapter t, a _SumMode through a sum of the
# group's adapters (LoRIGroup.summed). A context variable, not a flag on each layer, so that activation
# checkpointing can recompute a layer in backward in the mode its forward ran in (checkpoint_context): by
# backward time the `with group.summed()` block has long exited.
_SUMMED: contextvars.ContextVar[_SumMode | None] = contextvars.ContextVar("tclora_lori_summed", default=None)


@contextlib.contextmanager
def _summed_mode(value: _SumMode | None) -> Iterator[None]:
    token = _SUMMED.set(value)
    try:
        yield
    finally:
        _SUMMED.reset(token)


def _per_segment(h: torch.Tensor, keep: torch.Tensor, n: int) -> torch.Tensor:
    """``h`` (T·b, L, T·r), the rank-r blocks of T adapters for T segments of rows, with adapter s's block of
    segment t's rows multiplied by ``keep[t, s]`` ((T, T))."""
    rows = h.reshape(n, -1, n, h.shape[-1] // n)  # (T segments, b·L, T adapters, r)
    return (rows * keep.to(h)[:, None, :, None]).reshape(h.shape)


def checkpoint_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for torch's non-reentrant activation checkpointing (``torch.utils.checkpoint``): called
    at each checkpointed forward, it returns the forward's context (nothing to add) and the recomputation's,
    which runs the routed layers in the mode (routed or :meth:`LoRIGroup.summed`) that forward ran in.
    Without it a summed forward would be recomputed routed, with other shapes. Neutral for models without
    routed layers. ``tclora.models.set_gradient_checkpointing`` passes it."""
    return contextlib.nullcontext(), _summed_mode(_SUMMED.get())


class RoutedLoRILinear(nn.Module):
    """A frozen linear layer plus T LoRI adapters; rows of segment t of the batch see adapter t only.

    Args:
        base_layer: the model's ``nn.Linear`` (d_in → d_out), kept frozen.
        a: (T, r, d_in) frozen random A's.
        scaling: LoRA's α / r.
    """

    def __init__(self, base_layer: nn.Linear, a: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        n, rank, _ = a.shape
        w = base_layer.weight
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(n, w.shape[0], rank, device=w.device, dtype=w.dtype))
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        n = self.lora_A.shape[0]
        summed = _SUMMED.get()
        if summed is not None:  # Σ_t B_t A_t = [B_1 … B_T] [A_1; …; A_T]: the rank-(T·r) product, never d_out x d_in
            a = self.lora_A.reshape(-1, x.shape[-1])                        # (T·r, d_in)
            b = self.lora_B.transpose(0, 1).reshape(self.lora_B.shape[1], -1)  # (d_out, T·r)
            h = F.linear(x.to(a.dtype), a)                                  # (..., T·r)
            if summed.mask is not None:  # segment t's rows keep adapter s's rank-r block where mask[t, s]
                h = _per_segment(h, summed.mask, n)
            if summed.updates is None:
                delta = F.linear(h, b)
            else:  # the same sum; segment t's loss reaches B_s only where updates[t, s] (and x through every B)
                trained = _per_segment(h, summed.updates, n)
                delta = F.linear(trained, b) + F.linear(h - trained, b.detach())
            return out + (delta * self.scaling).to(out.dtype)
        if x.shape[0] % n:
            raise ValueError(f"a fused batch has {x.shape[0]} rows, not a multiple of its {n} adapters")
        xs = x.reshape(n, -1, x.shape[-1]).to(self.lora_A.dtype)  # (T, b·L, d_in): segment t → adapter t
        delta = torch.bmm(torch.bmm(xs, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2))
        return out + (delta * self.scaling).reshape(out.shape).to(out.dtype)


class LoRIGroup:
    """T LoRI adapters attached to one base model in place (``group.model`` is that model).

    Adapter t has its own frozen A drawn from ``seeds[t]`` (the same matrices :func:`lori.attach_lori`
    draws) and a trainable B starting at zero. Only the B's train; the base is frozen while attached
    and :meth:`detach` gives it back untouched.

    Raises:
        ValueError: no seeds, or a target module name the model lacks (naming ``lori.target_modules``).
    """

    def __init__(self, model: nn.Module, cfg: LoRISection, seeds: Sequence[int]):
        if cfg.mode == "lora":  # fused groups share one frozen A per seed; plain LoRA trains its own A
            raise ValueError("lori.mode=lora (trainable A) cannot be trained fused: set train.fused=false")
        if not seeds:
            raise ValueError("a LoRI group needs at least one adapter seed")
        lori.check_target_modules(model, cfg.target_modules)
        self.model, self.cfg, self.seeds = model, cfg, list(seeds)
        self._grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        targets = set(cfg.target_modules)
        self.layers: dict[str, RoutedLoRILinear] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                shape = (cfg.rank, module.in_features)
                a = torch.stack([lori.random_a(seed, name, shape) for seed in self.seeds])
                self.layers[name] = RoutedLoRILinear(module, a, cfg.alpha / cfg.rank)
        self._swap(routed=True)

    def __len__(self) -> int:
        return len(self.seeds)

    def _swap(self, routed: bool) -> None:
        for name, layer in self.layers.items():
            parent_name, _, leaf = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, leaf, layer if routed else layer.base_layer)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """The base model's own forward while inside (PEFT's ``disable_adapter()`` for a group): the base
        layers are swapped back in, as :meth:`detach` does, and the routed ones out again on exit."""
        self._swap(routed=False)
        try:
            yield
        finally:
            self._swap(routed=True)

    @contextlib.contextmanager
    def summed(self, mask: torch.Tensor | None = None, updates: torch.Tensor | None = None) -> Iterator[None]:
        """Every row through the sum of all T adapters while inside: the base plus Σ_t s·B_t A_t, the model
        a task-arithmetic merge of the group at λ = 1 (``linear`` at scale 1, ``cat``) gives; differentiable
        in every B. Activation checkpointing recomputes in the same mode (:func:`checkpoint_context`).

        Args:
            mask: (T, T) 0/1, or None for all ones: segment t's rows of a fused batch go through the sum of
                the adapters s with ``mask[t, s] = 1`` only (a merge of that subset).
            updates: (T, T) 0/1, or None for all ones: a loss on segment t's rows trains B_s only where
                ``updates[t, s] = 1``; the forward is the same sum either way.

        Raises:
            ValueError: a mask or updates that is not (T, T).
        """
        for name, value in (("mask", mask), ("updates", updates)):
            if value is not None and value.shape != (len(self), len(self)):
                raise ValueError(f"summed: {name} must be ({len(self)}, {len(self)}), got {tuple(value.shape)}")
        with _summed_mode(_SumMode(mask, updates)):
            yield

    def lora_b_params(self) -> dict[str, nn.Parameter]:
        """Stacked B's, (T, d_out, r), keyed by base-model module name."""
        return {name: layer.lora_B for name, layer in self.layers.items()}

    def adapter_b(self, t: int) -> dict[str, torch.Tensor]:
        """Adapter t's B's, (d_out, r) views of the stacked parameters."""
        return {name: layer.lora_B[t] for name, layer in self.layers.items()}

    def adapter_a(self, t: int) -> dict[str, torch.Tensor]:
        return {name: layer.lora_A[t] for name, layer in self.layers.items()}

    def a_shapes(self) -> dict[str, tuple[int, int]]:
        """Each adapted module's A shape (r, d_in), as :func:`lori.lora_a_shapes` gives for one adapter."""
        return {name: tuple(layer.lora_A.shape[1:]) for name, layer in self.layers.items()}

    def extract_masks(self, sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
        """The group's LoRI masks, each adapter's ranked over its own B's only (LoRI's global top-(1-s)
        |B| per task). Keyed ``"<t>/<module>"`` (:func:`adapter_masks` picks adapter t's), a flat dict
        so :func:`lori.save_masks` stores a group's masks like one adapter's."""
        return {f"{t}/{name}": m for t in range(len(self))
                for name, m in lori.extract_masks(self.adapter_b(t), sparsity, scope).items()}

    def masked(self, masks: dict[str, torch.Tensor]) -> lori.MaskedB:
        """:class:`lori.MaskedB` over the stacked B's with the adapters' masks stacked (T, d_out, r).

        Raises:
            ValueError: ``masks`` lacks an adapter's module (masks of another group).
        """
        missing = sorted({f"{t}/{n}" for t in range(len(self)) for n in self.layers} - set(masks))
        if missing:
            raise ValueError(f"group masks lack {missing[:3]} ({len(missing)} in all): masks of another group?")
        stacked = {name: torch.stack([masks[f"{t}/{name}"] for t in range(len(self))]) for name in self.layers}
        return lori.MaskedB(None, stacked, params=self.lora_b_params())

    def save_adapter(self, t: int, out_dir: str | Path, masks: dict[str, torch.Tensor] | None, meta: dict,
                     base_model_name_or_path: str | None = None) -> Path:
        """Adapter t as a plain PEFT LoRI adapter, through the single-adapter save path.

        A PEFT LoRI adapter is attached with adapter t's seed (so its A is the same draw), given adapter
        t's B, saved by :func:`lori.save_lori_adapter` and unloaded; the group is then re-attached.
        """
        self._swap(routed=False)
        try:
            peft_model = lori.attach_lori(self.model, self.cfg, self.seeds[t], base_model_name_or_path)
            b, a = self.adapter_b(t), self.adapter_a(t)
            with torch.no_grad():
                for name, module in peft_model.named_modules():
                    if hasattr(module, "lora_B") and isinstance(module.lora_B, nn.ModuleDict):
                        key = lori._base_name(name)
                        peft_a = module.lora_A["default"].weight
                        if not torch.equal(peft_a.to(a[key].dtype), a[key]):  # same seed, same draw
                            raise RuntimeError(f"adapter {t}: A of {key} differs from its seeded draw")
                        module.lora_B["default"].weight.copy_(b[key])
            out = lori.save_lori_adapter(peft_model, out_dir, masks, meta)
            peft_model.unload()
        finally:
            self._swap(routed=True)
            for p in self.model.parameters():  # PEFT froze/unfroze the base while attached: frozen again
                p.requires_grad_(False)
            for layer in self.layers.values():
                layer.lora_B.requires_grad_(True)
        return out

    def detach(self) -> nn.Module:
        """The base model without the group's layers and with its parameters' grad flags restored."""
        self._swap(routed=False)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._grad_flags.get(n, p.requires_grad))
        return self.model


def concat_batches(batches: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One fused batch: T collated micro-batches (each (b, L_t), equal b) right-padded to max L_t.

    Returns ``input_ids``, ``labels`` (padding -100) and ``attention_mask`` (padding 0), shape (T·b, L).

    Raises:
        ValueError: the micro-batches differ in their number of rows.
    """
    rows = {b["input_ids"].shape[0] for b in batches}
    if len(rows) != 1:
        raise ValueError(f"fused micro-batches must have equal rows per adapter, got {sorted(rows)}")
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": -100, "attention_mask": 0}
    return {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
            for key, value in fill.items()}


def adapter_losses(logits: torch.Tensor, labels: torch.Tensor, n_adapters: int) -> torch.Tensor:
    """(T,) next-token cross-entropy, each the mean over its own segment's label tokens (float32, as
    Hugging Face's causal-LM loss computes it for a solo batch).

    Args:
        logits: (T·b, L, V). labels: (T·b, L), -100 where no loss is taken.
    """
    target = labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                             ignore_index=-100, reduction="none").view(target.shape)
    sums = tokens.sum(1).view(n_adapters, -1).sum(1)
    counts = (target != -100).sum(1).view(n_adapters, -1).sum(1)
    return sums / counts.clamp(min=1)


def other_cluster_rows(n_adapters: int, rows: int) -> torch.Tensor:
    """(T·b,) row indices of a fused batch that give segment t rows of the *other* segments only: row j of
    segment t is row j of segment (t + 1 + j mod (T-1)) mod T, so each adapter sees every other cluster's
    rows in turn, in every step (T ≥ 2)."""
    j = torch.arange(rows)
    return torch.cat([((t + 1 + j % (n_adapters - 1)) % n_adapters) * rows + j for t in range(n_adapters)])


def other_cluster_kl(engine, group: "LoRIGroup", batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T,) weight-disentanglement penalty: adapter t's KL(base ‖ base + adapter t) on the group's other
    clusters' rows of the batch (:func:`other_cluster_rows`), the mean over their real tokens.

    An adapter trained only on its own cluster learns its skill unconditionally: on the demo each one
    answered 55-62% of the other families' prompts with its own skill, and a sum of such switches has
    nothing left to select with (issue 12). Keeping the base's next-token distribution on the other
    clusters' rows teaches it to act on its own inputs only, the property task arithmetic needs
    (weight disentanglement, Ortiz-Jimenez et al., NeurIPS 2023; regularising the change on other tasks'
    inputs during fine-tuning, as τJp does: Yoshida et al., ICLR 2025). One no-grad base forward serves
    every adapter (its logits are re-indexed with the rows), plus one routed forward of the re-indexed batch.

    Raises:
        ValueError: a group of one adapter (it has no other clusters).
    """
    n = len(group)
    if n < 2:
        raise ValueError("the disentanglement penalty needs a fused group of at least 2 adapters")
    rows = batch["input_ids"].shape[0] // n
    index = other_cluster_rows(n, rows)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    others = {k: v[index] for k, v in inputs.items()}
    real = others["attention_mask"].bool()  # (T·b, L); vocabulary-sized work on real tokens only: (N, V)
    with torch.no_grad(), group.adapters_disabled():
        base = F.log_softmax(engine(**inputs).logits[index][real].float(), -1)
    adapted = F.log_softmax(engine(**others).logits[real].float(), -1)
    kl = F.kl_div(adapted, base, reduction="none", log_target=True).sum(-1)  # (N,) KL(base ‖ adapted) per token
    owner = torch.arange(n, device=kl.device).repeat_interleave(rows)[:, None].expand_as(real)[real]  # (N,)
    totals = torch.zeros(n, dtype=kl.dtype, device=kl.device).index_add(0, owner, kl)
    return totals / torch.bincount(owner, minlength=n).clamp(min=1).to(kl.dtype)


def adapter_dropout_mask(n_adapters: int, dropout: float, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, T) 0/1 mask for :meth:`LoRIGroup.summed`: segment t keeps its own adapter and each other one with
    probability ``1 - dropout``, independently.

    Drawn from a generator seeded by the batch's token ids: a fused step's batch is fixed by the adapters'
    seeds and the step, so a worker resumed from a checkpoint draws the same masks at the same steps without
    carrying RNG state in the checkpoint.
    """
    ids = batch["input_ids"].flatten().tolist()
    seed = int(hashlib.blake2b(repr(ids).encode(), digest_size=8).hexdigest(), 16) % 2**63
    keep = torch.rand(n_adapters, n_adapters, generator=torch.Generator().manual_seed(seed)) >= dropout
    return (keep | torch.eye(n_adapters, dtype=torch.bool)).float()


def summed_losses(engine, group: "LoRIGroup", batch: dict[str, torch.Tensor], dropout: float = 0.0,
                  updates: MergeAwareUpdates = "all") -> torch.Tensor:
    """(T,) the merged sum's cross-entropy on each segment: the model with every adapter of the group
    added (:meth:`LoRIGroup.summed`, task arithmetic at λ = 1) on cluster t's rows, the mean over their
    label tokens, as :func:`adapter_losses` takes the routed model's.

    Adapters trained each on one cluster learn their skill unconditionally (issue 12: on the demo each
    answered 55-62% of the other families' prompts with its own skill), so their sum has nothing left to
    select with. Training every adapter for the sum as well, on all of the group's rows, is the multi-task
    gradient that merging approximates, taken during tuning rather than after it (ATM, alternating tuning
    and merging: Zhou et al., arXiv 2411.03055); each adapter's own loss keeps it a working adapter alone.
    One more forward and backward pass of the fused batch per step.

    ``dropout`` > 0 sums a random subset instead (:func:`adapter_dropout_mask`: cluster t's rows through its
    own adapter plus each other one with probability 1 - dropout, drawn per step and cluster; dropout, here
    of whole adapters, as Srivastava et al., JMLR 2014). Trained on one fixed sum, the adapters learn that
    sum's shortcuts: on the demo it answered unseen instructions by their shape ("which word comes last?"
    with the first word of the trained "which word comes first?"). Measured there (issue 12, README 'Adapters
    that merge'; γ = 0.03, 3 seeds): dropout 0.5 moved the best merge from 82% to 70% of the routed adapters'
    gain in domain and from +0.067 to +0.114 over the base out of domain.

    ``updates="others"`` trains, with cluster t's summed loss, only the *other* adapters' B's: they learn to
    leave t's rows to adapter t in the sum, while adapter t learns its skill from its own loss alone, the way
    an adapter trained alone learns it, reading the word that names the skill rather than the template's
    shape. ``"all"`` (ATM's multi-task gradient) trains every adapter with it.

    Raises:
        ValueError: a group of one adapter (its sum is itself), or ``updates`` neither "all" nor "others".
    """
    n = len(group)
    if n < 2:
        raise ValueError("the merged-sum loss needs a fused group of at least 2 adapters")
    if updates not in get_args(MergeAwareUpdates):
        raise ValueError(f"updates must be one of {get_args(MergeAwareUpdates)}, got {updates!r}")
    mask = adapter_dropout_mask(n, dropout, batch) if dropout else None
    trained = 1 - torch.eye(n) if updates == "others" else None
    with group.summed(mask, trained):
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return adapter_losses(logits, batch["labels"], n)


def routed_loss(group: "LoRIGroup", disentangle: float = 0.0, merge_aware: float = 0.0,
                merge_aware_dropout: float = 0.0, merge_aware_updates: MergeAwareUpdates = "all"):
    """``loss_fn`` for :func:`tclora.train.train_loop`: backpropagates the sum of the adapters' losses,
    plus ``disentangle`` x :func:`other_cluster_kl` and ``merge_aware`` x :func:`summed_losses` (with
    ``merge_aware_dropout`` and ``merge_aware_updates``; each summed over adapters, when > 0 and the group
    has other clusters), and records the list of per-adapter cross-entropy losses of the routed model."""
    n = len(group)

    def loss_fn(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = adapter_losses(logits, batch["labels"], n)
        total = losses.sum()
        if disentangle and n > 1:
            total = total + disentangle * other_cluster_kl(engine, group, batch).sum()
        if merge_aware and n > 1:
            total = total + merge_aware * summed_losses(engine, group, batch, merge_aware_dropout,
                                                          merge_aware_updates).sum()
        return total, losses.tolist()

    return loss_fn


def save_checkpoint(path: str | Path, group: LoRIGroup, optimizer: torch.optim.Optimizer | None,
                    masks: dict[str, torch.Tensor] | None, state: dict) -> Path:
    """The group's training state in one safetensors file: stacked B's, optimizer moments, masks, and
    ``state`` (JSON: phase, step, losses ...) in its metadata. A is not stored: it is redrawn from seeds."""
    tensors = {f"B/{n}": b.detach().cpu().contiguous() for n, b in group.lora_b_params().items()}
    meta = {"state": json.dumps(state), "seeds": json.dumps(group.seeds)}
    if optimizer is not None:
        opt = optimizer.state_dict()
        for index, values in opt["state"].items():
            tensors.update({f"optim/{index}/{k}": torch.as_tensor(v).cpu() for k, v in values.items()})
        meta["param_groups"] = json.dumps(opt["param_groups"])
    tensors.update({f"mask/{key}": m.cpu() for key, m in (masks or {}).items()})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / CHECKPOINT_FILE), metadata=meta)
    return path


def load_checkpoint(path: str | Path, group: LoRIGroup, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Restore B's (and the optimizer's moments) saved by :func:`save_checkpoint`; returns (masks, state).

    Raises:
        ValueError: the checkpoint was saved for other seeds (another group of adapters).
    """
    file = str(Path(path) / CHECKPOINT_FILE)
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    if json.loads(meta["seeds"]) != group.seeds:
        raise ValueError(f"{file}: saved for adapter seeds {meta['seeds']}, this group has {group.seeds}")
    tensors = load_file(file)
    with torch.no_grad():
        for name, b in group.lora_b_params().items():
            b.copy_(tensors[f"B/{name}"])
    if optimizer is not None and "param_groups" in meta:
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, field = key.split("/", 2)
                state.setdefault(int(index), {})[field] = value
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    masks = {key.removeprefix("mask/"): v for key, v in tensors.items() if key.startswith("mask/")}
    return masks or None, json.loads(meta["state"])


def train_lori_group(
    model: nn.Module,
    tokenizer,
    record_sets: Sequence[Sequence[dict]],
    lori_cfg: LoRISection,
    train_cfg,
    *,
    seeds: Sequence[int],
    out_dirs: Sequence[str | Path],
    max_length: int,
    base_model_name_or_path: str | None = None,
    make_engine=None,
) -> list[dict]:
    """Fused :func:`tclora.train.train_lori_adapter`: T adapters, one forward/backward per step.

    Adapter t sees exactly the batches it would see alone (``data.batches(record_sets[t], ...,
    seed=seeds[t])`` per phase) and is saved to ``out_dirs[t]`` in the same PEFT layout. ``model`` is
    left as it came in. Returns each adapter's ``lori.json`` metadata.
    """
    import time

    from tclora import data
    from tclora.train import TorchEngine, lori_phases, train_loop

    if not len(record_sets) == len(seeds) == len(out_dirs):
        raise ValueError(f"{len(record_sets)} record sets, {len(seeds)} seeds, {len(out_dirs)} output dirs")
    make_engine = make_engine or (lambda m, lr: TorchEngine(m, lr, train_cfg.weight_decay))
    group, started = LoRIGroup(model, lori_cfg, seeds), time.time()
    metas = [{"seed": s, "rank": lori_cfg.rank, "alpha": lori_cfg.alpha, "mode": lori_cfg.mode, "fused": len(seeds),
              **train_cfg.fused_losses(len(seeds)),
              "sparsity": lori_cfg.sparsity, "mask_scope": lori_cfg.mask_scope, "rows": len(r)}
             for s, r in zip(seeds, record_sets)]
    masks, masked = None, None
    for phase in lori_phases(train_cfg, lori_cfg):
        if phase.name == "sparse":
            masks = group.extract_masks(lori_cfg.sparsity, lori_cfg.mask_scope)
            masked = group.masked(masks)
            masked.reset_()
        streams = [data.batches(r, tokenizer, train_cfg.batch_size, max_length, phase.steps, seed=s)
                   for r, s in zip(record_sets, seeds)]
        fused = (concat_batches(step, tokenizer.pad_token_id) for step in zip(*streams))
        losses = train_loop(make_engine(group.model, phase.lr), fused, phase.steps, masked=masked,
                            loss_fn=routed_loss(group, train_cfg.disentangle, train_cfg.merge_aware,
                                                train_cfg.merge_aware_dropout, train_cfg.merge_aware_updates),
                            desc=f"LoRI {phase.name} x{len(group)}",
                            max_grad_norm=train_cfg.max_grad_norm, n_adapters=len(group))
        for t, meta in enumerate(metas):
            mine = [step[t] for step in losses]
            meta[f"{phase.name}_loss_first"], meta[f"{phase.name}_loss_last"] = (mine[0],
                                                                                 sum(mine[-10:]) / len(mine[-10:]))
    if masked is not None:
        masked.remove()
    seconds = round(time.time() - started, 2)
    for t, meta in enumerate(metas):
        if masks is not None:
            meta["parameters"] = lori.parameter_counts(adapter_masks(masks, t), group.a_shapes())
        meta["seconds"] = seconds
        group.save_adapter(t, out_dirs[t], adapter_masks(masks, t) if masks else None, meta, base_model_name_or_path)
    group.detach()
    return metas
