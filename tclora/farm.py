"""An adapter farm: the cluster adapters, the router that picks one per input, and the merge to fall back on.

Every run exports one (``<run.dir>/farm``), so the clusters serve as a router for new inputs and not
only in the evaluation (issue 18). The layout, owned here::

    farm.json           base model, embedding model, adapters by cluster id, distance threshold,
                        recommended merge (method, params, directory) or null
    router/             centroids.npy (k, dim) float32 and kmeans.json (k-means label -> cluster id,
                        the embed stage's template view): a copy of the cluster stage's router
    adapters/cluster-<id>/   the PEFT adapters (adapter_config.json, adapter_model.safetensors)
    merged/             the recommended merge (PEFT adapter or merged checkpoint, merge.json), if any
    manifest.json       what it was exported from (content digests): re-export is a no-op

    farm = Farm.load("runs/demo/farm")
    for r in farm.route(["reverse the words: box cup pen"]):
        print(r.adapter, r.distance, r.fallback)
    with farm.arrow(model) as routed:          # or: no embedding model, Arrow routing per token
        routed.generate(...)

Routing embeds the input as the rows the centroids were fitted on were embedded (same model, same
template view; :func:`tclora.cluster.routing_vectors`) and takes the nearest centroid. An input farther
from every centroid than the training rows almost ever are (``threshold``: the ``quantile``, 0.99 by
default, of the training rows' distances to their own centroid) is out of every cluster: it falls back
to the recommended merge, and the route says so.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np

from tclora import artifacts
from tclora.cluster import assign, routing_vectors

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FARM_JSON = "farm.json"
FORMAT_VERSION = 1
# Distances at the threshold count as inside. Rows sharing one template view have one distance, so the
# calibration quantile often *is* the distance of a whole template (demo: 100 training rows), and a
# re-embedded row differs from the cluster stage's float32 value by ~1e-8: without this slack 8% of the
# demo's training rows fell back.
DISTANCE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Route:
    """Where one input goes: the adapter directory to apply, and why."""

    cluster: int  # nearest cluster (also when falling back)
    distance: float  # Euclidean distance of the input's embedding to that cluster's centroid
    fallback: bool  # beyond the farm's threshold: the recommended merge is used instead
    adapter: str | None  # adapter (or merged checkpoint) directory; None: fallback without a merge to use


def calibrate_threshold(distances: np.ndarray, quantile: float = 0.99) -> float:
    """The ``quantile`` of the training rows' Euclidean distances to their own centroid.

    Raises:
        ValueError: ``quantile`` not in (0, 1] or no distances.
    """
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if len(distances) == 0:
        raise ValueError("calibrate_threshold: no training distances")
    return float(np.quantile(np.asarray(distances, dtype=np.float64), quantile))


def export_farm(
    out_dir: str | Path, *, cluster_dir: Path, adapter_dirs: Mapping[int, Path], train_distances: np.ndarray,
    base_model: str, embed_model: str, merge_dir: Path | None = None, recommended: Mapping | None = None,
    quantile: float = 0.99,
) -> Path:
    """Write a farm to ``out_dir`` (atomically, with a manifest); a no-op when it exists for the same inputs.

    Args:
        cluster_dir: a finished cluster stage (``centroids.npy``, ``kmeans.json``).
        adapter_dirs: cluster id -> PEFT adapter directory.
        train_distances: (n,) Euclidean distances of the training rows to their own centroid.
        merge_dir, recommended: the recommended merge's directory and ``{"method", "params", ...}``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    sources = {"cluster": cluster_dir, **{f"adapter-{c}": d for c, d in adapter_dirs.items()}}
    if merge_dir is not None:
        sources["merged"] = merge_dir
    key = {"version": FORMAT_VERSION, "quantile": quantile, "base_model": base_model, "embed_model": embed_model,
           "sources": {name: artifacts.tree_digest(Path(d)) for name, d in sources.items()}}
    if artifacts.is_complete(out_dir, key):
        return out_dir
    threshold = calibrate_threshold(train_distances, quantile)
    with artifacts.stage_dir(out_dir, key) as tmp:
        (tmp / "router").mkdir()
        for name in ("centroids.npy", "kmeans.json"):
            shutil.copy2(Path(cluster_dir) / name, tmp / "router" / name)
        adapters = {}
        for cid, src in sorted(adapter_dirs.items()):
            adapters[str(cid)] = f"adapters/cluster-{cid}"
            shutil.copytree(src, tmp / adapters[str(cid)])
        if merge_dir is not None:
            shutil.copytree(merge_dir, tmp / "merged")
        info = {"format_version": FORMAT_VERSION, "base_model": base_model, "embed_model": embed_model,
                "adapters": adapters, "threshold": threshold, "quantile": quantile,
                "recommended": None if merge_dir is None else {**dict(recommended or {}), "dir": "merged"}}
        artifacts.atomic_write_json(tmp / FARM_JSON, info)
    log.info("farm: %d adapters, routing threshold %.4f (q%.2f of training distances) -> %s", len(adapters),
             threshold, quantile, out_dir)
    return out_dir


@contextmanager
def arrow_applied(model, adapter_dirs: Sequence[str | Path], top_k: int = 2, temperature: float = 1.0,
                  seed: int = 0) -> Iterator:
    """``model`` with the adapters mixed per token by **Arrow** routing, for the duration of the block.

    Arrow (Ostapenko et al., 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"):
    in each adapted module, a token's hidden state ``h`` scores adapter ``t`` by ``|<h, v_t>|``, with
    ``v_t`` the top right singular vector of ``B_t A_t``; the ``top_k`` best are mixed with softmax
    weights. No embedding model and no training: PEFT's own implementation
    (``peft.create_arrow_model``), which needs one rank for every adapter.

    Yields the PEFT model to generate with; afterwards the LoRA layers are removed again (``unload``),
    leaving ``model``'s own modules and weights as they were. ``seed`` seeds PEFT's power iteration for
    the prototypes: unseeded, two runs scored Arrow 0.100 and 0.119 on the demo's test split.
    """
    from peft import ArrowConfig, create_arrow_model

    dirs = [str(d) for d in adapter_dirs]
    routed = create_arrow_model(model, dirs, ArrowConfig(top_k=min(top_k, len(dirs)),
                                                         router_temperature=temperature, rng_seed=seed))
    try:
        yield routed
    finally:
        routed.unload()


def arrow_weights(routed, tokenizer, sources: Sequence[str], chat_template: bool = False,
                  batch_size: int = 32) -> torch.Tensor:
    """Per source, Arrow's routing weight of each adapter summed over the prompt's tokens and every adapted
    module: ``(len(sources), n_adapters)``, adapters in the order given to :func:`arrow_applied`.

    The prompts are exactly the ids generation starts from (``evaluate.prompt_ids``), right-padded into
    batches of ``batch_size`` (``data.collate``): causal attention leaves a real token's hidden state as it is
    without the padding, and padded positions are masked out of the sums. The weights are recomputed in a
    forward hook with PEFT's formula (``ArrowLoraLinearLayer.forward``: softmax over the top-k of
    ``|h · v_t|``, divided by the router temperature); PEFT keeps no copy. No sources: a ``(0, 0)`` tensor.
    """
    import torch
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    from tclora.data import collate
    from tclora.evaluate import prompt_ids

    mask: torch.Tensor | None = None  # (B, L) of the batch being run, 1 on real tokens
    total: torch.Tensor | None = None  # (B, n_adapters)

    def weights(layer, args, output) -> None:
        nonlocal total
        hidden = args[0].to(layer.prototypes.dtype)  # (B, L, d_in)
        sim = (hidden @ layer.prototypes.T).abs()  # (B, L, n_adapters)
        top, idx = sim.topk(layer.top_k, dim=-1)
        coeff = torch.full_like(sim, float("-inf")).scatter(-1, idx, top).div(layer.temperature).softmax(-1)
        summed = (coeff * mask[..., None]).sum(1)  # (B, n_adapters): real tokens only
        total = summed if total is None else total + summed

    hooks = [m.register_forward_hook(weights) for m in routed.modules() if isinstance(m, ArrowLoraLinearLayer)]
    prompts = [prompt_ids(tokenizer, s, None, chat_template) for s in sources]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        device = next(routed.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = collate([{"input_ids": p, "labels": p} for p in prompts[start : start + batch_size]], pad)
                mask, total = batch["attention_mask"].to(device), None  # (B, L)
                routed(input_ids=batch["input_ids"].to(device), attention_mask=mask)
                out.append(total.float().cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out) if out else torch.zeros(0, 0)


def arrow_choices(routed, tokenizer, sources: Sequence[str], chat_template: bool = False,
                  batch_size: int = 32) -> list[int]:
    """Per source, the adapter Arrow relies on most: the index (in the order given to :func:`arrow_applied`)
    of the largest :func:`arrow_weights` total."""
    if not sources:
        return []
    return arrow_weights(routed, tokenizer, sources, chat_template, batch_size).argmax(1).tolist()


class Farm:
    """A loaded farm: ``route`` inputs to adapters. The embedding model loads on first use."""

    def __init__(self, root: Path, info: dict, centroids: np.ndarray, kmeans_info: dict):
        self.root, self.info, self.centroids, self.kmeans_info = root, info, centroids, kmeans_info
        self.mapping = {int(i): int(j) for i, j in kmeans_info["mapping"].items()}

    @classmethod
    def load(cls, path: str | Path) -> "Farm":
        """Read a farm directory written by :func:`export_farm`.

        Raises:
            FileNotFoundError: ``path`` is not a finished farm (naming it).
        """
        root = Path(path)
        if artifacts.read_manifest(root) is None or not (root / FARM_JSON).is_file():
            raise FileNotFoundError(f"{root}: not an exported tclora farm (no {FARM_JSON} with a manifest)")
        info = json.loads((root / FARM_JSON).read_text())
        centroids = np.load(root / "router" / "centroids.npy", allow_pickle=False)
        return cls(root, info, centroids, json.loads((root / "router" / "kmeans.json").read_text()))

    @property
    def base_model(self) -> str:
        return self.info["base_model"]

    def adapter_dir(self, cluster: int) -> Path:
        """The PEFT adapter directory of ``cluster``."""
        return self.root / self.info["adapters"][str(cluster)]

    @property
    def merged_dir(self) -> Path | None:
        """The recommended merge's directory, None when the run recommended none (an untuned run)."""
        rec = self.info.get("recommended")
        return None if not rec else self.root / rec["dir"]

    @property
    def adapter_dirs(self) -> dict[int, Path]:
        """cluster id -> PEFT adapter directory, by id."""
        return {int(c): self.root / d for c, d in sorted(self.info["adapters"].items(), key=lambda kv: int(kv[0]))}

    def arrow(self, model, top_k: int = 2):
        """:func:`arrow_applied` over this farm's adapters on ``model`` (the farm's base model, loaded)."""
        return arrow_applied(model, list(self.adapter_dirs.values()), top_k)

    def peft_model(self, model):
        """``model`` (the farm's base, loaded) as a PEFT model holding every cluster adapter as
        ``cluster-<id>``, and the recommended merge as ``merged`` when it is a PEFT adapter: what
        :meth:`generate` serves mixed batches from (vLLM: ``--lora-modules cluster-0=<dir> ...``)."""
        from peft import PeftModel

        names = {f"cluster-{c}": path for c, path in self.adapter_dirs.items()}
        if self.merged_dir is not None and (self.merged_dir / "adapter_config.json").is_file():
            names["merged"] = self.merged_dir
        (first, path), *rest = names.items()
        peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
        for name, path in rest:
            peft_model.load_adapter(str(path), adapter_name=name)
        return peft_model.eval()

    def generate(self, peft_model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24,
                 batch_size: int = 32) -> list[tuple[Route, str, str]]:
        """Route ``prompts`` and answer each with its own adapter, in mixed batches (PEFT ``adapter_names``).

        ``peft_model`` comes from :meth:`peft_model`. A row that falls back uses ``merged``; when the
        recommended merge is a dense checkpoint (not an adapter) or there is none, it uses the base
        model (``"__base__"``) and the adapter name says so.

        Returns:
            ``(route, adapter name, answer)`` per prompt, in order.
        """
        from tclora.evaluate import generate_answers

        routes = self.route(prompts)
        loaded = set(peft_model.peft_config)
        names = [("merged" if "merged" in loaded else "__base__") if r.fallback else f"cluster-{r.cluster}"
                 for r in routes]
        answers = generate_answers(peft_model, tokenizer, prompts, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, adapter_names=names)
        return list(zip(routes, names, answers))

    def route(self, texts: Sequence[str], threshold: float | None = None) -> list[Route]:
        """One :class:`Route` per input, in order (``threshold`` overrides the farm's calibrated one)."""
        limit = self.info["threshold"] if threshold is None else threshold
        labels, sq = assign(routing_vectors(texts, self.kmeans_info, self.info["embed_model"]), self.centroids)
        routes = []
        for label, d2 in zip(labels, sq):
            cluster, distance = self.mapping[int(label)], float(np.sqrt(max(float(d2), 0.0)))
            far = distance > limit + DISTANCE_TOLERANCE
            target = (self.merged_dir if far else self.adapter_dir(cluster))
            routes.append(Route(cluster, distance, far, None if target is None else str(target)))
        return routes
