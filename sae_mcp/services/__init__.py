"""What the tools share beyond the engine: built once by build_server (or a CLI command) and passed explicitly.

    Services(engine, settings, tools=...)
      .tools           the registered tools by name (server.tools.tool_map()): the ledger and its readers read each
                       tool's ledger rule from it (ledger/rule.py)
      .examples        ExampleSource: the corpus index and on-demand scans (top examples, densities, max activations)
      .stats           LogitWeightStats: feature_stats and token_set_enrichment, with their whole-SAE results kept
      .explanations    ExplanationStore: imported explanations and the agent's labels (opened on first use, so a
                       server that never reads them creates no file)
      .fidelity(sae)   each SAE's fidelity on a corpus sample, measured once (on first use, or by
                       prefetch_fidelity() in the background) and kept; never waits for the device
      .fidelity_now(sae)  what is known of it without measuring on the caller's thread (the pages)
      .scores          ScoreStore: explanations' scores and the challenges they came from (the explanation store's
                       file; score_explanation / submit_predictions)
      .ledger          Ledger: records every tool call (unless record=False: `--no-ledger`) and reads them back
      .scorer          ExplanationScorer: hands out blind sets and scores the predictions on them (one per server:
                       checking a challenge is still blind and storing its score is one locked step)
      .circuits        CircuitStore: trace_circuit's graphs kept whole by run id, for the circuit page (the file is
                       created by the first graph kept)

Each can be given to the constructor instead (tests inject stand-ins this way). Feature cards are gathered from
these by cards/data.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import torch

from sae_mcp.circuits.faithfulness import AblationMeans, ablation_means
from sae_mcp.circuits.store import CircuitStore, circuits_path
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.errors import Busy, InvalidInput, SaeMcpError
from sae_mcp.index.fidelity import mean_windows, measure_fidelity, sample_tokens
from sae_mcp.index.source import ExampleSource
from sae_mcp.ledger.recording import Ledger
from sae_mcp.ledger.rule import Recorded
from sae_mcp.results import SaeFidelity
from sae_mcp.scoring.runs import ExplanationScorer
from sae_mcp.scoring.store import ScoreStore
from sae_mcp.settings import Settings
from sae_mcp.store.explanations import ExplanationStore, cited_runs

log = logging.getLogger(__name__)

MEASURING = "being measured: the device was busy; ask model_info again shortly"


class Services:
    def __init__(self, engine: Engine, settings: Settings | None = None, *, tools: Mapping[str, Recorded],
                 examples: ExampleSource | None = None, stats: LogitWeightStats | None = None,
                 explanations: ExplanationStore | None = None, ledger: Ledger | None = None,
                 circuits: CircuitStore | None = None, record: bool = True):
        self.engine = engine
        self.settings = settings or Settings()
        self.tools = tools
        self.examples = examples or ExampleSource(engine, self.settings)
        self.stats = stats or LogitWeightStats(engine)
        self.ledger = ledger or Ledger(engine, self.settings, tools, recording=record,
                                       max_activation=self._max_activation)
        self._explanations = explanations
        self._scorer: ExplanationScorer | None = None
        self._scores: ScoreStore | None = None
        self._circuits = circuits
        self._fidelity: dict[str, tuple[SaeFidelity | None, str | None]] = {}  # SAE key -> (measured, why not)
        self._fidelity_guards: dict[str, threading.Lock] = {}  # SAE key -> one measurement at a time
        self._fidelity_started: set[str] = set()  # SAE keys fidelity_now has sent to a background measurement
        self._means: dict[str, AblationMeans] = {}  # SAE key -> its means for mean ablation, once measured
        self._lock = threading.Lock()

    @property
    def explanations(self) -> ExplanationStore:
        with self._lock:
            if self._explanations is None:
                self._explanations = ExplanationStore.for_model(self.settings.data_dir,
                                                                self.engine.loaded_model.store_key)
            return self._explanations

    @property
    def scores(self) -> ScoreStore:
        """Scores of explanations and their challenges (score_explanation), in the explanation store's file."""
        path = self.explanations.path  # opened first: the labels table the scores refer to exists
        with self._lock:
            if self._scores is None:
                self._scores = ScoreStore(path)
            return self._scores

    @property
    def scorer(self) -> ExplanationScorer:
        """The one scorer of this server's blind sets (score_explanation, submit_predictions, label_feature)."""
        with self._lock:
            if self._scorer is None:
                self._scorer = ExplanationScorer(self)
            return self._scorer

    @property
    def circuits(self) -> CircuitStore:
        """Circuit graphs by run id (<data_dir>/circuits): written by the server after the ledger recorded a
        trace, read by the circuit page; a graph a label cites is kept past the store's bounds."""
        with self._lock:
            if self._circuits is None:
                data_dir = self.settings.data_dir
                self._circuits = CircuitStore(circuits_path(data_dir), cited=lambda: cited_runs(data_dir))
            return self._circuits

    def fidelity(self, sae_key: str) -> tuple[SaeFidelity | None, str | None]:
        """(the SAE's fidelity, None) measured on its corpus' first windows, or (None, why not); kept.

        Never waits for the device (model_info is a cheap call): measured now when the device is free at once,
        else (None, MEASURING) while a background thread measures it as soon as the device allows."""
        if sae_key not in self._fidelity:
            self.engine.sae(sae_key)  # an unknown key is the caller's error, not a note
            if self._measure_fidelity(sae_key, wait=False) == "busy":
                self.prefetch_fidelity([sae_key])
        return self._fidelity.get(sae_key, (None, MEASURING))

    def fidelity_now(self, sae_key: str) -> tuple[SaeFidelity | None, str | None]:
        """What is known of the SAE's fidelity, at once: kept, else (None, MEASURING) while a background thread
        (started here, once) measures it. Never touches the device on the caller's thread: a page load must not
        run the model three times over a corpus sample."""
        if sae_key not in self._fidelity:
            self.engine.sae(sae_key)
            with self._lock:
                start = sae_key not in self._fidelity_started
                self._fidelity_started.add(sae_key)
            if start:
                self.prefetch_fidelity([sae_key])
        return self._fidelity.get(sae_key, (None, MEASURING))

    def prefetch_fidelity(self, sae_keys: list[str] | None = None) -> threading.Thread:
        """Measure the SAEs' fidelity (default: all) on a daemon thread, queueing for the device like any call;
        a server can call this at start so that no agent's model_info pays for it."""
        keys = list(self.engine.saes) if sae_keys is None else sae_keys
        thread = threading.Thread(target=self._measure_all, args=(keys,), name="sae-mcp-fidelity", daemon=True)
        thread.start()
        return thread

    def _measure_all(self, keys: list[str]) -> None:
        for key in keys:
            while self._measure_fidelity(key, wait=True) == "busy":
                time.sleep(1.0)  # the device queue was full (Busy at once): queue again shortly

    def _measure_fidelity(self, sae_key: str, wait: bool) -> str:
        """Measure and keep one SAE's fidelity (or why not): 'kept'; 'busy' when the device was, and 'running'
        when another thread is measuring it (without `wait`), so nothing was kept."""
        with self._lock:
            guard = self._fidelity_guards.setdefault(sae_key, threading.Lock())
        if not guard.acquire(blocking=wait):
            return "running"
        try:
            if sae_key in self._fidelity:
                return "kept"
            s = self.engine.sae(sae_key)
            try:
                tokens = sample_tokens(self.examples, self.engine, s)
            except SaeMcpError as exc:
                self._fidelity[sae_key] = (None, f"not measured: {exc}")
                return "kept"
            if tokens.shape[0] == 0:
                self._fidelity[sae_key] = (None, "not measured: the corpus has no full-length window")
                return "kept"
            try:
                with self.engine.device_work(timeout_s=None if wait else 0.0):
                    self._fidelity[sae_key] = (measure_fidelity(self.engine, s, tokens), None)
            except Busy:
                return "busy"
            return "kept"
        finally:
            guard.release()

    def ablation_means(self, s: LoadedSAE) -> AblationMeans:
        """The SAE's feature and error means over the first ~MEAN_TOKENS document tokens of its corpus, in full
        windows (mean ablation), measured on first use and kept. Raises, saying what to pass instead, when there is no
        corpus."""
        if s.key not in self._means:
            try:
                tokens = sample_tokens(self.examples, self.engine, s, windows=mean_windows(self.engine, s))
            except SaeMcpError as exc:
                raise InvalidInput(f"ablation='mean' needs {s.key}'s corpus for its means, and it cannot be read "
                                   f"({exc}); pass ablation='zero' or a corpus (--corpus)") from exc
            if tokens.shape[0] == 0:
                raise InvalidInput(f"ablation='mean' needs full-length windows of {s.key}'s corpus for its means, "
                                   "and it has none; pass ablation='zero'")
            self._means[s.key] = ablation_means(self.engine, s, tokens)  # takes the device per chunk
        return self._means[s.key]

    def _max_activation(self, sae_key: str, feature: int) -> tuple[float, str] | None:
        """The cached max activation steering calibrated with (the ledger records the exact coefficient); None from
        a stand-in source, which is not asked twice."""
        if not isinstance(self.examples, ExampleSource):
            return None
        return self.examples.max_activation(sae_key, feature)

    def densities(self, sae_key: str) -> torch.Tensor | None:
        """[d_sae] firing densities from the index, or None when there is none or it cannot be read (logged):
        density is an extra column, never a reason for a statistics call to fail."""
        try:
            return self.examples.densities(sae_key)
        except Exception as exc:
            log.warning("densities unavailable for %s: %s", sae_key, exc)
            return None
