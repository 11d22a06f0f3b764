"""Model-based clustering (tclora.mbc): the Gram of weight updates against dense inner products, and the
task grouping against scikit-learn's k-means on the same similarity rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tclora import mbc
from tclora.merge.base import LowRank


def _adapter(gen: torch.Generator, rank: int = 2, shapes=((6, 5), (4, 6))) -> dict[str, LowRank]:
    return {f"m{i}": LowRank(torch.randn(o, rank, generator=gen), torch.randn(rank, d, generator=gen))
            for i, (o, d) in enumerate(shapes)}


def test_update_gram_is_the_dense_inner_product_over_modules():
    gen = torch.Generator().manual_seed(0)
    adapters = [_adapter(gen, rank=r) for r in (2, 3, 1)]  # ranks may differ between adapters
    flat = torch.stack([torch.cat([a[m].to(torch.float64).dense().flatten() for m in sorted(a)]) for a in adapters])
    expected = (flat @ flat.T).numpy()
    np.testing.assert_allclose(mbc.update_gram(adapters), expected, rtol=1e-10)
    cos = mbc.cosine_from_gram(mbc.update_gram(adapters))
    norms = flat.norm(dim=1)
    np.testing.assert_allclose(cos, (expected / np.outer(norms, norms)), rtol=1e-10)


def test_cosine_of_an_untrained_adapter_is_zero_and_bad_inputs_are_named():
    gen = torch.Generator().manual_seed(1)
    a, b = _adapter(gen), _adapter(gen)
    zero = {m: LowRank(torch.zeros_like(f.B), f.A) for m, f in a.items()}  # LoRA's B starts at zero
    cos = mbc.cosine_from_gram(mbc.update_gram([a, b, zero]))
    assert cos[2, 2] == 1.0 and cos[0, 2] == 0.0 and cos[2, 1] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        mbc.update_gram([a])
    with pytest.raises(ValueError, match="other modules"):
        mbc.update_gram([a, {"m0": a["m0"]}])
    with pytest.raises(ValueError, match="'m1'.*differ in shape"):
        mbc.update_gram([a, {"m0": a["m0"], "m1": LowRank(torch.ones(3, 2), torch.ones(2, 6))}])


def test_cluster_tasks_groups_like_sklearn_on_similarity_rows_with_stable_ids():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    gen = torch.Generator().manual_seed(2)
    centres = [_adapter(gen) for _ in range(3)]
    # 9 tasks: 3 noisy copies of each of 3 centre adapters, interleaved (task i belongs to centre i % 3)
    tasks = [{m: LowRank(f.B + 0.05 * torch.randn(f.B.shape, generator=gen), f.A) for m, f in centres[i % 3].items()}
             for i in range(9)]
    sim = mbc.cosine_from_gram(mbc.update_gram(tasks))
    labels = mbc.cluster_tasks(sim, 3, seed=0)
    assert labels.tolist() == [0, 1, 2] * 3  # renumbered by first task: the same grouping, the same ids
    reference = KMeans(3, n_init=10, random_state=0).fit_predict(sim)
    assert adjusted_rand_score(reference, labels) == 1.0
    with pytest.raises(ValueError, match=r"cluster\.k=10 .*\(9\)"):
        mbc.cluster_tasks(sim, 10)
    with pytest.raises(ValueError, match=r"only 1 distinct groups"):  # untrained adapters: identical rows
        mbc.cluster_tasks(np.ones((4, 4)), 2)


def test_plot_similarity_writes_a_png(tmp_path):
    sim = np.array([[1.0, 0.2], [0.2, 1.0]])
    path = mbc.plot_similarity(sim, ["a", "b"], [0, 1], tmp_path / "mbc.png")
    assert path.stat().st_size > 0
