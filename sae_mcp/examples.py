"""Max-activating examples as a service: the engine's corpus scans + the SQLite index, behind one object.

    get_example_source(engine, settings) -> ExampleSource      one per engine (per process)
      .build_index(sae, max_tokens, ...)        the one-pass index of every feature (resumes, reuses)
      .top_examples(sae, feature, k, context)   from the index; else an on-demand scan of the feature, cached
      .cached_top_examples(sae, feature, ...)   the same from the index or an already cached scan; never scans
      .feature_summary(sae, feature)            index only: max activation, density, histogram (None if absent)
      .max_activation(sae, feature)             (value, 'index' | 'scan'), for steering calibration
      .densities(sae)                           [d_sae] firing density from the index (None if absent)

The corpus is --corpus, else the SAE's metadata.dataset_path. The index file is keyed by model, SAE weights
(store/db.sae_store_key: the source, plus the weights' hash for a local folder) and corpus (index_path), so an
SAE re-trained into the same folder never gets the old weights' examples, densities or max activations; on-demand single-feature scans live in the same file as rows 'feature:<f>', over the same
window stream, so their tokens and windows are shared with the index.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
import torch

from sae_mcp.engine.corpus import CorpusSource, iter_windows, resolve_corpus, window_context
from sae_mcp.engine.loading import LoadedSAE
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.scan import HIST_BINS, KEEP, ScanState, bos_id, compute_dtype, hist_edges, scan
from sae_mcp.errors import Cancelled, InvalidInput, SaeMcpError
from sae_mcp.results import r
from sae_mcp.results.corpus import Example, FeatureSummary, Histogram, IndexReport, TopExamples
from sae_mcp.settings import Settings
from sae_mcp.store.db import store_key_of
from sae_mcp.store.index import IndexStore, StoredScan, index_path, meta_for

log = logging.getLogger(__name__)

INDEX = "index"
DEFAULT_SCAN_TOKENS = 50_000
MAX_SCAN_TOKENS = 1_000_000  # ceiling of an on-demand scan (a tool call); the CLI index has none
DEFAULT_CONTEXT = 10
MAX_CONTEXT = 127
CHECKPOINT_S = 30.0  # seconds between checkpoints of a long scan (a 24576-feature state is ~27 MB)
HIST_SHOWN = 16

Progress = Callable[[int, int], None]


def compact_histogram(fine: np.ndarray, max_bins: int = HIST_SHOWN) -> Histogram:
    """[NB] fine counts -> the used range in at most `max_bins` bins (adjacent fine bins summed)."""
    nz = np.nonzero(fine)[0]
    if len(nz) == 0:
        return Histogram(edges=[], counts=[])
    a, b = int(nz[0]), int(nz[-1]) + 1
    g = math.ceil((b - a) / max_bins)
    edges = hist_edges()
    counts = [int(fine[i : min(i + g, b)].sum()) for i in range(a, b, g)]
    return Histogram(edges=[float(f"{edges[i]:.3g}") for i in range(a, b, g)] + [float(f"{edges[b]:.3g}")], counts=counts)


class ExampleSource:
    def __init__(self, engine: Engine, settings: Settings | None = None):
        self.engine = engine
        self.settings = settings or Settings()
        self._stores: dict[str, IndexStore] = {}
        self._loaded: dict[tuple[str, str], StoredScan] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    # -- where things are ---------------------------------------------------------------------------------------

    def corpus(self, s: LoadedSAE) -> CorpusSource:
        """--corpus, else the SAE's training dataset; NotFound/InvalidInput with what to pass otherwise."""
        return resolve_corpus(self.settings.corpus, s.dataset_path)

    def context_size(self, s: LoadedSAE) -> int:
        return window_context(s.context_size, self.engine.model.cfg.n_ctx)

    def _model_key(self) -> str:
        lm = self.engine.loaded_model
        return lm.name if lm.source == "official" else lm.source

    def store(self, s: LoadedSAE, create: bool = True) -> IndexStore | None:
        """The index file of (model, SAE weights, corpus); None when create=False and it does not exist."""
        src = self.corpus(s)
        path = index_path(self.settings.data_dir, self._model_key(), store_key_of(s), src.key)
        with self._guard:
            if str(path) in self._stores:
                return self._stores[str(path)]
            if not create and not path.exists():
                return None
            meta = meta_for(self._model_key(), s.source, src.key, src.fingerprint, self.context_size(s),
                            bos_id(self.engine, s), s.d_sae, s.weights_id)
            st = self._stores[str(path)] = IndexStore(path, meta)
            return st

    def _lock_for(self, path: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((path, name), threading.Lock())

    def _scan_row(self, store: IndexStore, name: str) -> StoredScan | None:
        """A scan row, cached in memory until the file says it changed (a concurrent `sae-mcp index`)."""
        key = (str(store.path), name)
        updated = store.scan_updated(name)
        if updated is None:
            return None
        cached = self._loaded.get(key)
        if cached is None or cached.updated != updated:
            cached = self._loaded[key] = store.load_scan(name)
        return cached

    def _index_row(self, s: LoadedSAE) -> tuple[IndexStore, StoredScan] | None:
        try:
            store = self.store(s, create=False)
        except SaeMcpError as exc:  # no corpus known (or a bad --corpus): simply not indexed
            log.debug("no index for %s: %s", s.key, exc)
            return None
        if store is None:
            return None
        row = self._scan_row(store, INDEX)
        return None if row is None or row.tokens == 0 else (store, row)

    # -- scanning -----------------------------------------------------------------------------------------------

    def _run(self, s: LoadedSAE, name: str, features: list[int] | None, target: int,
             progress: Progress | None, cancel: CancelToken | None, batch_windows: int | None = None
             ) -> tuple[IndexStore, StoredScan, bool]:
        """Scan (or resume, or reuse) the row `name` up to `target` tokens. -> (store, row, reused)."""
        store = self.store(s)
        src = self.corpus(s)
        with self._lock_for(str(store.path), name):
            prev = self._scan_row(store, name)
            if prev is not None and (prev.exhausted or prev.tokens >= target):
                return store, prev, True
            dev = self.engine.device
            dtype = compute_dtype(self.engine, s)
            if prev is not None and prev.tokens and prev.compute_dtype != dtype:  # resumed in another precision
                dtype = "+".join(sorted({prev.compute_dtype or "unknown", dtype}))
            state = None
            if prev is not None:  # resume from the last checkpoint
                state = ScanState(
                    torch.from_numpy(prev.top_vals.copy()).to(dev), torch.from_numpy(prev.top_pos.copy()).to(dev),
                    torch.from_numpy(prev.n_fired.copy()).to(dev), torch.from_numpy(prev.hist.copy()).to(dev),
                    prev.tokens, prev.windows, False,
                )
                log.info("%s: resuming %s at %d tokens (window %d)", s.key, name, prev.tokens, prev.windows)
            ctx, bos = self.context_size(s), bos_id(self.engine, s)
            windows = iter_windows(src, self.engine.model.tokenizer, ctx, bos, skip_windows=prev.windows if prev else 0)
            last_save = [time.monotonic()]

            def save(st: ScanState) -> None:
                store.save_scan(
                    name, tokens=st.tokens, windows=st.windows, exhausted=st.exhausted, target=target,
                    top_vals=st.top_vals.cpu().numpy(), top_pos=st.top_pos.cpu().numpy(),
                    n_fired=st.n_fired.cpu().numpy(), hist=st.hist.cpu().numpy(), compute_dtype=dtype,
                )
                last_save[0] = time.monotonic()

            current: list[ScanState] = []

            def on_batch(batch, st: ScanState) -> None:
                store.put_windows([(w.index, w.document, w.start, w.ids) for w in batch])
                current[:] = [st]
                if time.monotonic() - last_save[0] > CHECKPOINT_S:
                    save(st)

            try:
                st = scan(self.engine, s, windows, context_size=ctx, bos=bos is not None, max_tokens=target,
                          state=state, features=features, batch_windows=batch_windows, progress=progress,
                          cancel=cancel, on_batch=on_batch)
            except Cancelled:
                if current:
                    save(current[0])  # everything up to the last whole batch stays, and a re-run resumes there
                raise
            if st.tokens == 0:
                raise InvalidInput(f"the corpus {src.describe()} has no text to scan")
            save(st)
            return store, self._scan_row(store, name), False

    def build_index(self, sae: str | None, max_tokens: int, progress: Progress | None = None,
                    cancel: CancelToken | None = None, batch_windows: int | None = None) -> IndexReport:
        """The one-pass index of every feature over the first `max_tokens` corpus tokens (resumes, reuses)."""
        if max_tokens < 1:
            raise InvalidInput(f"--tokens {max_tokens}: scan at least one token")
        s = self.engine.sae(sae)
        t0 = time.perf_counter()
        before = self._index_row(s)
        tokens_before = before[1].tokens if before else 0
        store, row, reused = self._run(s, INDEX, None, max_tokens, progress, cancel, batch_windows)
        dt = time.perf_counter() - t0
        return IndexReport(
            path=str(store.path), corpus=self.corpus(s).describe(), sae=s.key, tokens_scanned=row.tokens,
            windows=row.windows, exhausted=row.exhausted, reused=reused, seconds=r(dt, 2),
            tokens_per_second=r((row.tokens - tokens_before) / dt if dt > 0 else 0.0, 1),
        )

    # -- answers ------------------------------------------------------------------------------------------------

    def _summary(self, s: LoadedSAE, row: StoredScan, col: int, feature: int) -> dict:
        vals = row.top_vals[:, col]
        return dict(
            sae=s.key, feature=feature,
            max_activation=r(max(float(vals[0]), 0.0)),
            density=float(f"{row.n_fired[col] / max(row.tokens, 1):.4g}"),
            n_fired=int(row.n_fired[col]), tokens_scanned=int(row.tokens),
            histogram=compact_histogram(row.hist[col]),
            compute_dtype=row.compute_dtype,
        )

    def _check_request(self, s: LoadedSAE, feature: int, k: int, context: int) -> None:
        self.engine.check_feature(s, feature)
        if not 1 <= k <= KEEP:
            raise InvalidInput(f"k={k} is out of range: between 1 and {KEEP} examples")
        if not 0 <= context <= MAX_CONTEXT:
            raise InvalidInput(f"context={context} is out of range: 0..{MAX_CONTEXT} tokens each side")

    def _answer(self, s: LoadedSAE, store: IndexStore, row: StoredScan, col: int, feature: int, source: str,
                k: int, context: int) -> TopExamples:
        ctx = self.context_size(s)
        nbos = 1 if bos_id(self.engine, s) is not None else 0
        vals, pos = row.top_vals[:, col], row.top_pos[:, col]
        chosen = [(float(v), int(p)) for v, p in zip(vals, pos) if v > 0][:k]  # stored sorted: value desc, pos asc
        wins = store.get_windows([p // ctx for _, p in chosen])
        examples = []
        for v, p in chosen:
            w, at = divmod(p, ctx)
            document, start, ids = wins[w]
            lo, hi = max(0, at - context), min(len(ids), at + context + 1)
            tokens = self.engine.str_tokens(torch.tensor(ids[lo:hi]))
            examples.append(Example(
                activation=r(v), token=tokens[at - lo], tokens=tokens, position=at - lo,
                document=document, offset=start + at - nbos,
            ))
        return TopExamples(**self._summary(s, row, col, feature), source=source, corpus=self.corpus(s).describe(),
                           context_size=ctx, examples=examples)

    def top_examples(self, sae: str | None, feature: int, k: int = 10, context: int = DEFAULT_CONTEXT,
                     max_scan_tokens: int = DEFAULT_SCAN_TOKENS, progress: Progress | None = None,
                     cancel: CancelToken | None = None) -> TopExamples:
        s = self.engine.sae(sae)
        self._check_request(s, feature, k, context)
        if not 1 <= max_scan_tokens <= MAX_SCAN_TOKENS:
            raise InvalidInput(f"max_scan_tokens={max_scan_tokens} is out of range: 1..{MAX_SCAN_TOKENS}; "
                               "for more, build an index with `sae-mcp index --tokens N`")
        found = self._index_row(s)
        if found is not None:
            store, row = found
            return self._answer(s, store, row, feature, feature, "index", k, context)
        store, row, _ = self._run(s, f"feature:{feature}", [feature], max_scan_tokens, progress, cancel)
        return self._answer(s, store, row, 0, feature, "scan", k, context)

    def cached_top_examples(self, sae: str | None, feature: int, k: int = 10, context: int = DEFAULT_CONTEXT
                            ) -> TopExamples | None:
        """top_examples from the index, else from an on-demand scan of this feature already cached (whatever
        its budget; `tokens_scanned` says how far it read). None when neither exists: this never scans."""
        s = self.engine.sae(sae)
        self._check_request(s, feature, k, context)
        found = self._index_row(s)
        if found is not None:
            return self._answer(s, found[0], found[1], feature, feature, "index", k, context)
        try:
            store = self.store(s, create=False)
        except SaeMcpError as exc:  # no corpus known: nothing can be cached
            log.debug("no cached scan for %s: %s", s.key, exc)
            return None
        row = None if store is None else self._scan_row(store, f"feature:{feature}")
        if row is None or row.tokens == 0:
            return None
        return self._answer(s, store, row, 0, feature, "scan", k, context)

    def feature_summary(self, sae: str | None, feature: int) -> FeatureSummary | None:
        s = self.engine.sae(sae)
        self.engine.check_feature(s, feature)
        found = self._index_row(s)
        return None if found is None else FeatureSummary(**self._summary(s, found[1], feature, feature))

    def max_activation(self, sae: str | None, feature: int, max_scan_tokens: int = DEFAULT_SCAN_TOKENS
                       ) -> tuple[float, str]:
        s = self.engine.sae(sae)
        self.engine.check_feature(s, feature)
        found = self._index_row(s)
        if found is not None:
            return max(float(found[1].top_vals[0, feature]), 0.0), "index"
        _, row, _ = self._run(s, f"feature:{feature}", [feature], max_scan_tokens, None, None)
        return max(float(row.top_vals[0, 0]), 0.0), "scan"

    def densities(self, sae: str | None) -> torch.Tensor | None:
        s = self.engine.sae(sae)
        found = self._index_row(s)
        if found is None:
            return None
        row = found[1]
        return torch.from_numpy(row.n_fired.astype(np.float64) / max(row.tokens, 1)).float()


_sources: "weakref.WeakKeyDictionary[Engine, dict[Settings | None, ExampleSource]]" = weakref.WeakKeyDictionary()
_sources_lock = threading.Lock()


def get_example_source(engine: Engine, settings: Settings | None = None) -> ExampleSource:
    """The one ExampleSource of this engine and settings (a server has one of each, so: one per process).
    settings=None means the engine's existing source, else one with default settings."""
    with _sources_lock:
        per = _sources.setdefault(engine, {})
        if settings is None and per:
            return next(reversed(per.values()))
        src = per.get(settings)
        if src is None:
            src = per[settings] = ExampleSource(engine, settings)
        return src


__all__ = ["ExampleSource", "get_example_source", "DEFAULT_SCAN_TOKENS", "MAX_SCAN_TOKENS", "KEEP", "HIST_BINS"]
