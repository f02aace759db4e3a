"""What the tools share beyond the engine: built once by build_server (or a CLI command) and passed explicitly.

    Services(engine, settings)
      .examples        ExampleSource: the corpus index and on-demand scans (top examples, densities, max activations)
      .stats           LogitWeightStats: feature_stats and token_set_enrichment, with their whole-SAE results kept
      .explanations    ExplanationStore: imported explanations and the agent's labels (opened on first use, so a
                       server that never reads them creates no file)
      .fidelity(sae)   each SAE's fidelity on a corpus sample, measured on first use and kept

Each can be given to the constructor instead (tests inject stand-ins this way). Feature cards are gathered from
these by services/cards.py.
"""

from __future__ import annotations

import logging
import threading

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.errors import SaeMcpError
from sae_mcp.results import SaeFidelity
from sae_mcp.services.example_source import ExampleSource
from sae_mcp.services.fidelity import measure_fidelity, sample_tokens
from sae_mcp.settings import Settings
from sae_mcp.store.explanations import ExplanationStore

log = logging.getLogger(__name__)


class Services:
    def __init__(self, engine: Engine, settings: Settings | None = None, *, examples: ExampleSource | None = None,
                 stats: LogitWeightStats | None = None, explanations: ExplanationStore | None = None):
        self.engine = engine
        self.settings = settings or Settings()
        self.examples = examples or ExampleSource(engine, self.settings)
        self.stats = stats or LogitWeightStats(engine)
        self._explanations = explanations
        self._fidelity: dict[str, tuple[SaeFidelity | None, str | None]] = {}  # SAE key -> (measured, why not)
        self._lock = threading.Lock()

    @property
    def explanations(self) -> ExplanationStore:
        with self._lock:
            if self._explanations is None:
                self._explanations = ExplanationStore.for_model(self.settings.data_dir,
                                                                self.engine.loaded_model.store_key)
            return self._explanations

    def fidelity(self, sae_key: str) -> tuple[SaeFidelity | None, str | None]:
        """(the SAE's fidelity, None) measured on its corpus' first windows, or (None, why not); kept."""
        if sae_key not in self._fidelity:
            s = self.engine.sae(sae_key)
            try:
                tokens = sample_tokens(self.examples, self.engine, s)
            except SaeMcpError as exc:
                self._fidelity[sae_key] = (None, f"not measured: {exc}")
                return self._fidelity[sae_key]
            if tokens.shape[0] == 0:
                self._fidelity[sae_key] = (None, "not measured: the corpus has no full-length window")
            else:
                with self.engine.device_work():
                    self._fidelity[sae_key] = (measure_fidelity(self.engine, s, tokens), None)
        return self._fidelity[sae_key]

    def densities(self, sae_key: str) -> torch.Tensor | None:
        """[d_sae] firing densities from the index, or None when there is none or it cannot be read (logged):
        density is an extra column, never a reason for a statistics call to fail."""
        try:
            return self.examples.densities(sae_key)
        except Exception as exc:
            log.warning("densities unavailable for %s: %s", sae_key, exc)
            return None
