"""Max-activating examples: the engine's corpus scans and the SQLite feature index, behind one object.

    ExampleSource(engine, settings)            built once per server (services), or by `sae-mcp index`
      .build_index(sae, max_tokens, ...)        the one-pass index of every feature (resumes, reuses)
      .top_examples(sae, feature, View(k, context, intervals, per_interval), max_scan_tokens)
                                                from the index; else an on-demand scan of the feature, cached
      .cached_top_examples(sae, feature, ...)   the same from the index or an already cached scan; never scans
      .feature_row(sae, feature)                the raw scan row holding the feature (index, else its scan, run now)
      .feature_summary(sae, feature)            index only: max activation, density, histogram (None if absent)
      .max_activation(sae, feature)             (value, 'index' | 'scan'), for steering calibration
      .densities(sae)                           [d_sae] firing density from the index (None if absent)

The corpus is --corpus, else the SAE's metadata.dataset_path. The index file is keyed by model, SAE weights (the
SAE's store key: its source, plus the weights' hash for a local folder) and corpus, so an SAE re-trained into the
same folder never gets the old weights' examples, densities or max activations. On-demand single-feature scans
live in the same file as rows 'feature:<f>', over the same window stream, so their tokens and windows are shared
with the index. What an answer shows of a row (identical contexts merged, interval bands) is view.py's.

A row written before interval samples (index format 1) still answers, without intervals (a warning says so), and
is rescanned from the start whenever a scan of it is asked for (build_index, or an on-demand scan): samples cannot
be added to a scan that has already passed the tokens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, overload

import numpy as np
import torch

from sae_mcp.engine.admission import call_abandoned
from sae_mcp.engine.corpus import CorpusSource, iter_windows, resolve_corpus, window_context
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import Busy, Cancelled, InvalidInput, SaeMcpError
from sae_mcp.index.samples import SAMPLE_BINS, SAMPLES_PER_BIN
from sae_mcp.index.scan import KEEP, ScanRequest, bos_id, compute_dtype, scan
from sae_mcp.index.state import ScanState, hist_edges
from sae_mcp.index.store import IndexStore, StoredScan, index_path, meta_for
from sae_mcp.index.view import (
    DEFAULT_PER_INTERVAL,
    MAX_INTERVALS,
    MAX_PER_INTERVAL,
    View,
    show,
    shown_activation,
)
from sae_mcp.results import rounded
from sae_mcp.results.corpus import FeatureSummary, Histogram, IndexReport, TopExamples
from sae_mcp.settings import Settings

log = logging.getLogger(__name__)

INDEX = "index"  # the scan row holding every feature; on-demand scans are rows 'feature:<f>'
DEFAULT_SCAN_TOKENS = 50_000
MAX_SCAN_TOKENS = 1_000_000  # ceiling of an on-demand scan (a tool call); the CLI index has none
DEFAULT_CONTEXT = 10
MAX_CONTEXT = 127
ROW_POLL_S = 0.05  # seconds between checks that a call waiting for another call's scan of its row was abandoned
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
    return Histogram(edges=[float(f"{edges[i]:.3g}") for i in range(a, b, g)] + [float(f"{edges[b]:.3g}")],
                     counts=counts)


def resumable(prev: StoredScan | None) -> bool:
    """Whether a stored row can be resumed: it has interval samples, in this version's layout [F, SB, S]."""
    layout = (SAMPLE_BINS, SAMPLES_PER_BIN)
    return prev is not None and prev.samp_pos is not None and tuple(prev.samp_pos.shape[1:]) == layout


def resume_state(prev: StoredScan | None, device) -> ScanState | None:
    """A stored scan row -> the running state on the device (None: start afresh, also for a row without
    samples: see resumable)."""
    if prev is None or prev.samp_pos is None or prev.samp_vals is None or not resumable(prev):
        return None

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.copy()).to(device)

    return ScanState(
        top_vals=dev(prev.top_vals), top_pos=dev(prev.top_pos), n_fired=dev(prev.n_fired), hist=dev(prev.hist),
        samp_pos=dev(prev.samp_pos), samp_vals=dev(prev.samp_vals), tokens=prev.tokens, windows=prev.windows,
    )


class Checkpointer:
    """Writes a scan's state to its row: every `every_s` seconds while it runs, and at the end or on cancel
    (everything up to the last whole batch stays, and a re-run resumes there)."""

    def __init__(self, index: IndexStore, name: str, target: int, compute_dtype: str, every_s: float = CHECKPOINT_S):
        self.index, self.name, self.target, self.compute_dtype = index, name, target, compute_dtype
        self.every_s = every_s
        self.last_save = time.monotonic()
        self.latest: ScanState | None = None

    def save(self, st: ScanState) -> None:
        self.index.save_scan(st.stored(self.name, self.target, self.compute_dtype))
        self.last_save = time.monotonic()

    def on_batch(self, batch, st: ScanState, resumable: bool) -> None:
        """After each batch, outside the device lock: its windows first; then, at a resumable state (a whole
        buffer scanned), the last resumable state is kept for a cancel, and saved now and then."""
        self.index.put_windows([(w.index, w.document, w.start, w.ids) for w in batch])
        if not resumable:
            return
        self.latest = st.snapshot()  # the samples are folded in place by later batches
        if time.monotonic() - self.last_save > self.every_s:
            self.save(st)

    def save_latest(self) -> None:
        if self.latest is not None:
            self.save(self.latest)


class ExampleSource:
    def __init__(self, engine: Engine, settings: Settings | None = None, checkpoint_s: float = CHECKPOINT_S):
        self.engine = engine
        self.settings = settings or Settings()
        self.checkpoint_s = checkpoint_s  # seconds between checkpoints of a long scan
        self._indexes: dict[str, IndexStore] = {}  # index file path -> its open store
        self._loaded: dict[tuple[str, str], StoredScan] = {}  # (path, row name) -> the row as last read
        self._locks: dict[tuple[str, str], threading.Lock] = {}  # one scan of a row at a time
        self._guard = threading.Lock()

    # -- where things are ---------------------------------------------------------------------------------------

    def corpus(self, s: LoadedSAE) -> CorpusSource:
        """--corpus, else the SAE's training dataset; NotFound/InvalidInput with what to pass otherwise."""
        return resolve_corpus(self.settings.corpus, s.dataset_path)

    def window_length(self, s: LoadedSAE) -> int:
        return window_context(s.context_size, self.engine.model.cfg.n_ctx)

    def index_location(self, s: LoadedSAE) -> tuple[Path, dict[str, str]]:
        """The index file of (model, SAE weights, corpus) and the meta it holds, without opening it (also what the
        workers of `sae-mcp index --ray` tell the driver that writes it: index/ray_driver.py)."""
        src = self.corpus(s)
        model_key = self.engine.loaded_model.store_key
        meta = meta_for(model_key, s.source, src.key, src.fingerprint, self.window_length(s),
                        bos_id(self.engine, s), s.d_sae, s.weights_id)
        return index_path(self.settings.data_dir, model_key, s.store_key, src.key), meta

    @overload
    def index_store(self, s: LoadedSAE, create: Literal[True] = True) -> IndexStore: ...

    @overload
    def index_store(self, s: LoadedSAE, create: bool) -> IndexStore | None: ...

    def index_store(self, s: LoadedSAE, create: bool = True) -> IndexStore | None:
        """The index file of (model, SAE weights, corpus); None when create=False and it does not exist."""
        path, meta = self.index_location(s)
        with self._guard:
            if str(path) in self._indexes:
                return self._indexes[str(path)]
            if not create and not path.exists():
                return None
            index = self._indexes[str(path)] = IndexStore(path, meta)
            return index

    def _lock_for(self, path: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((path, name), threading.Lock())

    @contextlib.contextmanager
    def _row_lock(self, s: LoadedSAE, index: IndexStore, name: str, cancel: CancelToken | None) -> Iterator[None]:
        """One scan of a row at a time. Another call for the same row waits as for the device: Cancelled once it
        is abandoned, Busy after the engine's busy timeout (the running scan may take minutes)."""
        lock = self._lock_for(str(index.path), name)
        deadline = time.monotonic() + self.engine.limits.busy_timeout_s
        while not lock.acquire(timeout=ROW_POLL_S):
            if (cancel is not None and cancel.cancelled) or call_abandoned():
                raise Cancelled(f"the call was abandoned while it waited for another call's scan of {name} "
                                f"({s.key}); nothing ran")
            if time.monotonic() >= deadline:
                raise Busy(f"another call is scanning {name} of {s.key} (waited {self.engine.limits.busy_timeout_s:.3g}"
                           " s for it): try again later; once it has finished, this call answers from its result")
        try:
            yield
        finally:
            lock.release()

    def _scan_row(self, index: IndexStore, name: str) -> StoredScan | None:
        """A scan row, cached in memory until the file says it changed (a concurrent `sae-mcp index`)."""
        key = (str(index.path), name)
        updated = index.scan_updated(name)
        if updated is None:
            return None
        cached = self._loaded.get(key)
        if cached is None or cached.updated != updated:
            cached = index.load_scan(name)  # (None: deleted meanwhile)
            if cached is not None:
                self._loaded[key] = cached
        return cached

    def _index_row(self, s: LoadedSAE) -> tuple[IndexStore, StoredScan] | None:
        try:
            index = self.index_store(s, create=False)
        except SaeMcpError as exc:  # no corpus known (or a bad --corpus): simply not indexed
            log.debug("no index for %s: %s", s.key, exc)
            return None
        if index is None:
            return None
        row = self._scan_row(index, INDEX)
        return None if row is None or row.tokens == 0 else (index, row)

    # -- scanning -----------------------------------------------------------------------------------------------

    def _scan_dtype(self, s: LoadedSAE, prev: StoredScan | None) -> str:
        dtype = compute_dtype(self.engine, s)
        if prev is not None and prev.tokens and prev.compute_dtype != dtype:  # resumed in another precision
            dtype = "+".join(sorted({prev.compute_dtype or "unknown", dtype}))
        return dtype

    def _run(self, s: LoadedSAE, name: str, features: list[int] | None, target: int,
             progress: Progress | None, cancel: CancelToken | None, batch_windows: int | None = None
             ) -> tuple[IndexStore, StoredScan, bool]:
        """Scan (or resume, or reuse) the row `name` up to `target` tokens. -> (index, row, reused)."""
        index = self.index_store(s)
        src = self.corpus(s)
        with self._row_lock(s, index, name, cancel):
            prev = self._scan_row(index, name)
            if prev is not None and not resumable(prev):
                log.info("%s: %s was stored without interval samples; rescanning it from the start", s.key, name)
                prev = None
            if prev is not None and (prev.exhausted or prev.tokens >= target):
                return index, prev, True
            if prev is not None:
                log.info("%s: resuming %s at %d tokens (window %d)", s.key, name, prev.tokens, prev.windows)
            checkpoint = Checkpointer(index, name, target, self._scan_dtype(s, prev), self.checkpoint_s)
            length, bos = self.window_length(s), bos_id(self.engine, s)
            windows = iter_windows(src, self.engine.corpus_tokenizer, length, bos,
                                   skip_windows=prev.windows if prev else 0, hub=self.engine.hub)
            try:
                request = ScanRequest(context_size=length, bos=bos is not None, max_tokens=target,
                                      features=None if features is None else tuple(features),
                                      batch_windows=batch_windows)
                st = scan(self.engine, s, windows, request, state=resume_state(prev, self.engine.device),
                          progress=progress, cancel=cancel, on_batch=checkpoint.on_batch)
            except Cancelled:
                checkpoint.save_latest()
                raise
            if st.tokens == 0:
                raise InvalidInput(f"the corpus {src.describe()} has no text to scan")
            checkpoint.save(st)
            row = self._scan_row(index, name)
            assert row is not None  # just saved
            return index, row, False

    def build_index(self, sae: str | None, max_tokens: int, progress: Progress | None = None,
                    cancel: CancelToken | None = None, batch_windows: int | None = None) -> IndexReport:
        """The one-pass index of every feature over the first `max_tokens` corpus tokens (resumes, reuses)."""
        if max_tokens < 1:
            raise InvalidInput(f"--tokens {max_tokens}: scan at least one token")
        s = self.engine.sae(sae)
        t0 = time.perf_counter()
        before = self._index_row(s)
        tokens_before = before[1].tokens if before and resumable(before[1]) else 0
        index, row, reused = self._run(s, INDEX, None, max_tokens, progress, cancel, batch_windows)
        dt = time.perf_counter() - t0
        return IndexReport(
            path=str(index.path), corpus=self.corpus(s).describe(), sae=s.key, tokens_scanned=row.tokens,
            windows=row.windows, exhausted=row.exhausted, reused=reused, seconds=rounded(dt, 2),
            tokens_per_second=rounded((row.tokens - tokens_before) / dt if dt > 0 else 0.0, 1),
        )

    # -- answers ------------------------------------------------------------------------------------------------

    def _summary(self, s: LoadedSAE, row: StoredScan, col: int, feature: int) -> dict:
        vals = row.top_vals[:, col]
        return dict(
            sae=s.key, feature=feature,
            max_activation=shown_activation(max(float(vals[0]), 0.0)),
            density=float(f"{row.n_fired[col] / max(row.tokens, 1):.4g}"),
            n_fired=int(row.n_fired[col]), tokens_scanned=int(row.tokens),
            histogram=compact_histogram(row.hist[col]),
            compute_dtype=row.compute_dtype,
        )

    def _check_request(self, s: LoadedSAE, feature: int, view: View) -> None:
        self.engine.check_feature(s, feature)
        if not 1 <= view.k <= KEEP:
            raise InvalidInput(f"k={view.k} is out of range: between 1 and {KEEP} examples")
        if not 0 <= view.context <= MAX_CONTEXT:
            raise InvalidInput(f"context={view.context} is out of range: 0..{MAX_CONTEXT} tokens each side")
        if not 0 <= view.intervals <= MAX_INTERVALS:
            raise InvalidInput(f"intervals={view.intervals} is out of range: 0 (none)..{MAX_INTERVALS} bands")
        if not 1 <= view.per_interval <= MAX_PER_INTERVAL:
            raise InvalidInput(f"per_interval={view.per_interval} is out of range: 1..{MAX_PER_INTERVAL} examples")

    def _answer(self, s: LoadedSAE, index: IndexStore, row: StoredScan, col: int, feature: int,
                source: Literal["index", "scan"],
                view: View, contexts: dict | None = None) -> TopExamples:
        length = self.window_length(s)
        nbos = 1 if bos_id(self.engine, s) is not None else 0
        shown = show(self.engine, index, row, col, length, nbos, view, source, contexts)
        return TopExamples(**self._summary(s, row, col, feature), source=source, corpus=self.corpus(s).describe(),
                           context_size=length, **shown)

    def top_examples(self, sae: str | None, feature: int, view: View, max_scan_tokens: int = DEFAULT_SCAN_TOKENS,
                     progress: Progress | None = None, cancel: CancelToken | None = None) -> TopExamples:
        """What `view` asks of the feature (view.py): the top k (identical shown contexts once, unless
        view.merge=False) and, with intervals=N, up to N activation bands with per_interval sampled examples each;
        from the index, else from an on-demand scan of max_scan_tokens tokens (cached)."""
        s = self.engine.sae(sae)
        self._check_request(s, feature, view)
        if not 1 <= max_scan_tokens <= MAX_SCAN_TOKENS:
            raise InvalidInput(f"max_scan_tokens={max_scan_tokens} is out of range: 1..{MAX_SCAN_TOKENS}; "
                               "for more, build an index with `sae-mcp index --tokens N`")
        found = self._index_row(s)
        if found is not None:
            index, row = found
            return self._answer(s, index, row, feature, feature, "index", view)
        index, row, _ = self._run(s, f"feature:{feature}", [feature], max_scan_tokens, progress, cancel)
        return self._answer(s, index, row, 0, feature, "scan", view)

    def cached_top_examples(self, sae: str | None, feature: int, k: int = 10, context: int = DEFAULT_CONTEXT,
                            intervals: int = 0, per_interval: int = DEFAULT_PER_INTERVAL,
                            contexts: dict | None = None) -> TopExamples | None:
        """top_examples from the index, else from an on-demand scan of this feature already cached (whatever
        its budget; `tokens_scanned` says how far it read). None when neither exists: this never scans. A dict
        given as `contexts` receives each example's window prefix (view.Context, by (document, offset))."""
        s = self.engine.sae(sae)
        view = View(k, context, intervals, per_interval)
        self._check_request(s, feature, view)
        found = self._index_row(s)
        if found is not None:
            return self._answer(s, found[0], found[1], feature, feature, "index", view, contexts)
        try:
            index = self.index_store(s, create=False)
        except SaeMcpError as exc:  # no corpus known: nothing can be cached
            log.debug("no cached scan for %s: %s", s.key, exc)
            return None
        row = None if index is None else self._scan_row(index, f"feature:{feature}")
        if index is None or row is None or row.tokens == 0:
            return None
        return self._answer(s, index, row, 0, feature, "scan", view, contexts)

    def feature_row(self, sae: str | None, feature: int, max_scan_tokens: int = DEFAULT_SCAN_TOKENS,
                    progress: Progress | None = None, cancel: CancelToken | None = None
                    ) -> tuple[IndexStore, StoredScan, int, str]:
        """(index file, scan row, the feature's column in it, 'index' | 'scan'): the index row, else this feature's
        on-demand scan (cached, or run now as top_examples would). For readers of the row itself (scoring)."""
        s = self.engine.sae(sae)
        self.engine.check_feature(s, feature)
        found = self._index_row(s)
        if found is not None:
            return found[0], found[1], feature, "index"
        index, row, _ = self._run(s, f"feature:{feature}", [feature], max_scan_tokens, progress, cancel)
        return index, row, 0, "scan"

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
