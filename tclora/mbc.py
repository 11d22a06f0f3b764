"""Model-based clustering (MBC): group tasks by how alike their short adapters are (Ray-free).

Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs" (mttl, the
``mbc`` task sets), the parameter-level alternative TC-LoRA's text clustering is compared against:
  1. train a short LoRA per task (``cluster.mbc_steps``, through the same train stage);
  2. cluster the tasks by the cosine similarity of their adapters;
  3. train one adapter per cluster as usual.

Similarity is the cosine of the flattened weight updates ``dW_t = s B_t A_t``, concatenated over every
adapted module, computed in factored form (never a (d_out, d_in) matrix): with LoRI the A's are frozen
random projections, so comparing parameters (mttl flattens LoRA's A and B) would compare the B's only
when every adapter shares its A; the update is what LoRA, LoRI-D and LoRI-S adapters all have, whatever
their seeds. Tasks are then grouped as mttl does: k-means (scikit-learn) on the rows of the (T, T)
cosine-similarity matrix, i.e. each task described by its similarity to every task.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from tclora.config import FUSED_LOSS_FIELDS, Config, ConfigError
from tclora.merge.base import LowRank
from tclora.plots import pyplot, save_figure

log = logging.getLogger(__name__)


def short_adapter_config(cfg: Config) -> Config:
    """The config each task's short LoRA trains with: plain LoRA (``lori.mode: lora``) for
    ``cluster.mbc_steps`` steps from one shared initial A (``lori.shared_a``), everything else as the
    run's own adapters. A shared start matters: early on ``dW ~ -lr G A^T A`` (B starts at zero), so two
    tasks with the same gradient G but different random A's would look unrelated. Plain LoRA is never
    fused, so the fused-group losses (``config.FUSED_LOSS_FIELDS``: ``train.disentangle``, ``train.merge_aware``
    with its dropout and updates) are off for them (they shape the run's own adapters only)."""
    return cfg.model_copy(update={"lori": cfg.lori.model_copy(update={"mode": "lora", "shared_a": True}),
                                  "train": cfg.train.model_copy(update={"steps": cfg.cluster.mbc_steps,
                                                                        "sparse_steps": None,
                                                                        **dict.fromkeys(FUSED_LOSS_FIELDS, 0.0),
                                                                        "merge_aware_updates": "all"})})


def update_gram(adapters: Sequence[Mapping[str, LowRank]]) -> np.ndarray:
    """Frobenius inner products of the adapters' weight updates, summed over modules.

    ``G[i, j] = sum_m <B_i A_i, B_j A_j>_F = sum_m sum((B_i^T B_j) * (A_i A_j^T))``: per module the T
    adapters' factors are stacked, so the cost is two (T r, T r) Grams and a block sum, not T^2 dense
    products.

    Args:
        adapters: T adapters as ``{module path: LowRank}`` (:func:`tclora.adapters.load_factors`), all
            adapting the same modules with the same shapes (ranks may differ).

    Returns:
        (T, T) float64, symmetric positive semi-definite.

    Raises:
        ValueError: fewer than 2 adapters, or adapters that differ in modules or shapes (named).
    """
    if len(adapters) < 2:
        raise ValueError(f"update_gram needs at least 2 adapters, got {len(adapters)}")
    modules = sorted(adapters[0])
    for i, adapter in enumerate(adapters[1:], start=1):
        if sorted(adapter) != modules:
            raise ValueError(f"adapter {i} adapts other modules than adapter 0: "
                             f"{sorted(set(adapter) ^ set(modules))[:5]}")
    t = len(adapters)
    gram = torch.zeros(t, t, dtype=torch.float64)
    for module in modules:
        factors = [a[module] for a in adapters]
        shapes = {f.shape for f in factors}
        if len(shapes) != 1:
            raise ValueError(f"module {module!r}: the adapters' updates differ in shape {sorted(shapes)}")
        b = torch.cat([f.B.double() for f in factors], dim=1)  # (d_out, sum r)
        a = torch.cat([f.A.double() for f in factors], dim=0)  # (sum r, d_in)
        products = (b.T @ b) * (a @ a.T)  # (sum r, sum r): entry (p, q) = (B^T B)_pq (A A^T)_pq
        ranks = torch.tensor([f.rank for f in factors])  # owner (sum r, T): one-hot on each component's adapter
        owner = torch.nn.functional.one_hot(torch.repeat_interleave(torch.arange(t), ranks), t).double()
        gram += owner.T @ products @ owner  # block sums: (T, T)
    return gram.numpy()


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """(T, T) cosine similarities from a Gram matrix; an all-zero update (an untrained adapter) has
    similarity 0 to every other and 1 to itself.

    Raises:
        ValueError: ``gram`` is not square.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be (T, T), got {gram.shape}")
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    safe = np.where(norms > 0, norms, 1.0)
    cos = gram / safe[:, None] / safe[None, :]
    np.fill_diagonal(cos, 1.0)
    return np.clip(cos, -1.0, 1.0)


def cluster_tasks(similarity: np.ndarray, k: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Task labels in ``[0, k)``: k-means on the rows of the cosine-similarity matrix (mttl's MBC).

    Labels are renumbered by each cluster's first task, so the same grouping always gets the same ids.

    Args:
        similarity: (T, T) cosine similarities (:func:`cosine_from_gram`).

    Returns:
        (T,) int64 cluster of each task.

    Raises:
        ConfigError: ``k`` not in ``[1, T]``, or k-means found fewer than ``k`` distinct groups.
    """
    from sklearn.cluster import KMeans

    t = similarity.shape[0]
    if not 1 <= k <= t:
        raise ConfigError(f"cluster.k={k} must be between 1 and the number of tasks ({t}) for cluster.by=adapters")
    raw = KMeans(k, n_init=n_init, random_state=seed).fit_predict(similarity)
    if len(set(raw.tolist())) < k:  # e.g. untrained adapters: identical rows of the similarity matrix
        raise ConfigError(f"cluster.k={k}: the tasks' adapters form only {len(set(raw.tolist()))} distinct "
                         "groups; lower cluster.k or raise cluster.mbc_steps")
    first_seen = {label: i for i, label in reversed(list(enumerate(raw.tolist())))}
    order = {label: new for new, label in enumerate(sorted(first_seen, key=first_seen.get))}
    return np.array([order[label] for label in raw.tolist()], dtype=np.int64)


def plot_similarity(similarity: np.ndarray, names: Sequence[str], labels: Sequence[int], path: str | Path) -> Path:
    """Heat map of the task-task cosine similarity, tasks ordered by cluster, cluster ids on the labels."""
    plt = pyplot()
    order = np.argsort(np.asarray(labels), kind="stable")
    t = len(names)
    fig, ax = plt.subplots(figsize=(min(3 + 0.35 * t, 16), min(2.5 + 0.35 * t, 14)))
    im = ax.imshow(similarity[np.ix_(order, order)], cmap="viridis", vmin=-1, vmax=1)
    ticks = [f"{names[i]} [{labels[i]}]" for i in order]
    ax.set_xticks(range(t), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(t), ticks, fontsize=7)
    ax.set_title("MBC: cosine similarity of per-task adapter updates [cluster]", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)
