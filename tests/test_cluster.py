"""k-means, assignment, small-cluster rule and report (tclora/cluster.py, no Ray)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from tclora import cluster as km


def blobs(n_per: int, centers: int, dim: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim)) * 5
    labels = np.repeat(np.arange(centers), n_per)
    x = means[labels] + rng.standard_normal((len(labels), dim)) * spread
    return x.astype(np.float32), labels


def test_recovers_separated_blobs():
    x, truth = blobs(60, 5, 16, 0.3)
    model = km.fit_kmeans(x, 5, n_init=3, seed=1)
    labels, dists = km.assign(x, model.centroids)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert model.centroids.shape == (5, 16) and model.centroids.dtype == np.float32
    assert labels.dtype == np.int32 and dists.dtype == np.float32
    assert float(dists.sum()) == pytest.approx(model.inertia, rel=1e-4)


def test_inertia_matches_sklearn_on_overlapping_data():
    x, _ = blobs(150, 12, 32, 3.0, seed=3)  # overlapping: local minima exist, restarts matter
    ours = km.fit_kmeans(x, 12, n_init=10, seed=0)
    ref = KMeans(12, n_init=10, random_state=0).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.01


def test_subsampled_restarts_then_refine_on_all_rows():
    x, truth = blobs(500, 4, 8, 0.5)
    model = km.fit_kmeans(x, 4, n_init=2, seed=0, init_size=300)  # restarts on 300 rows, refine on 2000
    labels, dists = km.assign(x, model.centroids)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert model.n_rows == len(x) and float(dists.sum()) == pytest.approx(model.inertia, rel=1e-4)


@pytest.mark.parametrize("n_rows, k, expected", [
    (1_200, 4, 1.0),          # the demo: below min_fit_rows, every row (a 20% sample clustered it wrongly)
    (50_000, 8, 1.0),         # exactly min_fit_rows
    (1_000_000, 8, 0.2),      # large: sample_fraction
    (100_000, 8, 0.5),        # the floor: 50,000 of 100,000 rows
    (10_000_000, 2_000, 0.2), # 50 x k = 100,000 rows < 20%
])
def test_fit_fraction_fits_small_corpora_on_every_row(n_rows, k, expected):
    assert km.fit_fraction(n_rows, k, sample_fraction=0.2, min_fit_rows=50_000) == pytest.approx(expected)


def test_fit_fraction_caps_the_sample_at_max_fit_rows_but_never_below_the_floor():
    assert km.fit_fraction(10_000_000, 64, 0.2, 50_000, max_fit_rows=1_000_000) == pytest.approx(0.1)
    assert km.fit_fraction(4_000_000, 64, 0.2, 50_000, max_fit_rows=1_000_000) == pytest.approx(0.2)  # 800k < cap
    assert km.fit_fraction(10_000_000, 64, 0.2, 50_000, max_fit_rows=10) == pytest.approx(0.005)  # 50 k rows floor


def test_fit_fraction_keeps_50_rows_per_cluster_and_rejects_bad_fractions():
    assert km.fit_fraction(1_000, 40, 0.2, min_fit_rows=10) == 1.0  # 50 rows per cluster: 2,000 > 1,000
    assert km.fit_fraction(100_000, 40, 0.01, min_fit_rows=10) == pytest.approx(0.02)  # 2,000 of 100,000
    with pytest.raises(ValueError, match="sample_fraction"):
        km.fit_fraction(100, 2, 0.0, 10)


def test_assign_is_chunk_invariant_and_nearest():
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((1000, 8)).astype(np.float32), rng.standard_normal((6, 8)).astype(np.float32)
    labels, dists = km.assign(x, c)
    small_labels, small_dists = km.assign(x, c, chunk_rows=7)
    exact = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, exact.argmin(1))
    np.testing.assert_array_equal(labels, small_labels)
    np.testing.assert_allclose(dists, exact.min(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dists, small_dists, rtol=1e-5, atol=1e-5)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="k=5"):
        km.fit_kmeans(np.zeros((3, 2), np.float32), 5)
    with pytest.raises(ValueError, match="shape"):
        km.fit_kmeans(np.zeros(3, np.float32), 1)


def test_duplicate_rows_do_not_break_seeding():
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct points, k=4
    model = km.fit_kmeans(x, 4, n_init=2)
    assert np.isfinite(model.centroids).all() and model.inertia == pytest.approx(0.0, abs=1e-5)


CENTROIDS = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 1.0], [9.0, 0.0]], dtype=np.float32)


def test_small_cluster_merge_goes_to_nearest_large_centroid(caplog):
    with caplog.at_level(logging.WARNING, logger="tclora.cluster"):
        mapping = km.handle_small_clusters([50, 40, 2, 1], CENTROIDS, min_size=5, policy="merge")
    assert mapping == {0: 0, 1: 1, 2: 0, 3: 1}
    assert "cluster 2 has 2 rows" in caplog.text and "merged into 0" in caplog.text


def test_small_cluster_skip_maps_to_minus_one(caplog):
    with caplog.at_level(logging.WARNING, logger="tclora.cluster"):
        mapping = km.handle_small_clusters({0: 50, 1: 40, 2: 2, 3: 0}, CENTROIDS, min_size=5, policy="skip")
    assert mapping == {0: 0, 1: 1, 2: -1, 3: -1}
    assert "skipped" in caplog.text


def test_small_cluster_all_small_keeps_largest():
    assert km.handle_small_clusters([1, 3, 2, 0], CENTROIDS, min_size=10, policy="merge") == {0: 1, 1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="policy"):
        km.handle_small_clusters([1], CENTROIDS[:1], 1, policy="drop")


def test_report_scores_match_sklearn():
    rng = np.random.default_rng(0)
    tasks = rng.choice(["a", "b", "c", "d"], size=300)
    labels = np.where(rng.random(300) < 0.7, np.searchsorted(["a", "b", "c", "d"], tasks), rng.integers(0, 5, 300))
    report = km.cluster_report(labels, list(tasks), [f"text {i}" for i in range(300)])
    assert report["nmi"] == pytest.approx(normalized_mutual_info_score(tasks, labels))
    assert report["ari"] == pytest.approx(adjusted_rand_score(tasks, labels))
    assert report["n_rows"] == 300 and sum(report["sizes"].values()) == 300
    assert all(len(v) == 3 for v in report["examples"].values())


def test_report_without_tasks_and_with_skipped_rows(tmp_path):
    report = km.cluster_report([0, 0, 1, -1, -1], None, ["a", "b", "c", "d", "e"])
    assert report["nmi"] is None and report["ari"] is None
    assert report["skipped_rows"] == 2 and report["n_clusters"] == 2 and report["sizes"]["-1"] == 2
    partial = km.cluster_report([0, 0, 1, 1], ["x", "x", None, "y"])
    assert partial["n_labelled_rows"] == 3 and partial["nmi"] == pytest.approx(1.0)
    png = km.plot_cluster_sizes(report, tmp_path / "sizes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_rows_are_named_not_clustered():
    """A NaN row used to fail seeding inside torch, and assign put it in cluster 0 (issue 14)."""
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    x[17, 2] = np.nan
    x[30, 0] = np.inf
    with pytest.raises(ValueError, match=r"fit_kmeans: x: row 17 holds a non-finite value.*2 such row\(s\).*\[17, 30"):
        km.fit_kmeans(x, 3, n_init=1)
    for chunk_rows in (8, 10_000):  # the first bad row is found in any chunk
        with pytest.raises(ValueError, match=r"assign: x: row 17 "):
            km.assign(x, CENTROIDS[:, :2].repeat(2, 1), chunk_rows=chunk_rows)
    with pytest.raises(ValueError, match=r"centroids: row 1 "):
        km.assign(x[:5], np.array([[0, 0, 0, 0], [np.nan, 0, 0, 0]], np.float32))
    km.assign(x[:10], x[:3])  # finite rows pass
