"""Auto-k, cluster report markdown and projection plot (tclora/cluster_quality.py), template view."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from tclora import cluster as km
from tclora.cluster_quality import choose_k, plot_criterion, plot_projection, report_markdown
from tclora.template_view import TemplateMiner


def unit_blobs(n_per: int, centers: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim))
    labels = np.repeat(np.arange(centers), n_per)
    x = (means[labels] / np.linalg.norm(means[labels], axis=1, keepdims=True)
         + rng.standard_normal((len(labels), dim)) * spread)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("true_k", [3, 6])
def test_choose_k_finds_separated_blobs_and_scores_are_sklearns(true_k):
    x, truth = unit_blobs(40, true_k)
    k, scores = choose_k(x, 2, 8, n_init=3)
    assert k == true_k and sorted(scores) == list(range(2, 9))
    # the score at the true k is scikit-learn's silhouette of the true partition (k-means recovers it)
    assert scores[true_k] == pytest.approx(silhouette_score(x, truth), abs=1e-5)


def test_choose_k_rejects_bad_range():
    x, _ = unit_blobs(5, 2)
    for lo, hi in ((1, 3), (4, 3), (10, 12)):
        with pytest.raises(ValueError, match="k_range"):
            choose_k(x, lo, hi)
    with pytest.raises(ValueError, match=r"distinct rows of the fit sample \(2 of 10\)"):
        choose_k(np.repeat(x[:2], 5, axis=0), 2, 4)  # ten rows, two distinct: no k in [2, 4] is informative
    assert sorted(choose_k(x, 2, 50, n_init=2)[1]) == list(range(2, 10))  # k_max lowered to distinct rows - 1


def test_choose_k_counts_duplicates_once():
    """Four tight groups of three distinct "templates", each repeated 100 times (a template view). Counted
    with their copies, the split into the 12 templates has silhouette 1 (sklearn, below); on distinct rows
    a singleton scores 0 and the four groups win."""
    distinct, groups = unit_blobs(3, 4, spread=0.1)  # (12, 16)
    x = np.repeat(distinct, 100, axis=0)
    assert silhouette_score(x, np.repeat(np.arange(12), 100)) == pytest.approx(1.0)
    k, scores = choose_k(x, 2, 11, n_init=5)
    assert k == 4
    assert scores[4] == pytest.approx(silhouette_score(distinct, groups), abs=1e-5)


def test_report_markdown_and_plots(tmp_path):
    x, truth = unit_blobs(30, 3)
    names = [f"task{t}" for t in truth]
    report = km.cluster_report(truth.tolist(), names, [f"example {i}" for i in range(len(truth))])
    report.update(k=3, k_auto=True)
    md = report_markdown(report, ["cluster_pca.png"])
    assert "NMI 1.000, ARI 1.000" in md and "| 0 | 30 | task0 (30) |" in md and "![cluster_pca](cluster_pca.png)" in md
    assert "k chosen automatically: 3" in md and "- `example 0`" in md
    assert plot_projection(x, truth, tmp_path / "p.png", names).stat().st_size > 0
    assert plot_criterion({2: 0.1, 3: 0.5}, 3, tmp_path / "c.png").stat().st_size > 0


def test_template_view_of_a_small_demo_corpus_is_its_templates():
    from tclora import demo_corpus

    rows = [r["source"] for r in demo_corpus.generate_split("train", 40, 0)]  # 40 rows per family
    expected = {t.replace(" {x}", " ...").replace("{x} ", "... ").replace("{x}", "...")
                for f in demo_corpus.FAMILIES.values() for t in f.templates}
    assert set(TemplateMiner.fit(rows).views(rows)) == {e.replace("... -", "...-") for e in expected}


def test_template_view_masks_payload_keeps_template():
    rng = np.random.default_rng(0)
    words = "arm bag box cup dot fan gem hat jam key".split()
    templates = ["Reverse the words: {x}", "{x} sorted A to Z?", "Count the words: {x}"]
    rows = [templates[i % 3].format(x=" ".join(rng.choice(words, rng.integers(3, 6), replace=False)))
            for i in range(300)]
    miner = TemplateMiner.fit(rows)
    views = set(miner.views(rows))
    assert views == {"Reverse the words: ...", "... sorted A to Z?", "Count the words: ..."}
    # saved by the embed stage, read back by routing: the same masks
    saved = json.loads(json.dumps(miner.to_json()))
    assert TemplateMiner.from_json(saved) == miner
    # held-out rows are routed in the space the centroids were fitted in: through the same view
    from tclora.config import EmbedSection
    from tclora.embed import Embedder

    held_out = rows[:6]
    model = EmbedSection().model
    got = km.routing_vectors(held_out, {"view": saved}, model)
    np.testing.assert_allclose(got, Embedder(model).encode(miner.views(held_out), 64), atol=1e-6)
    assert not np.allclose(got, km.routing_vectors(held_out, {"view": None}, model), atol=1e-3)
    # free text without frequent templates is left as it is
    miner = TemplateMiner.fit(["a b c", "d e f", "g h i"], min_support=0.5)
    assert miner.view("x y z") == "x y z"
    with pytest.raises(ValueError, match="min_cover"):
        TemplateMiner.fit(rows, min_cover=0)
