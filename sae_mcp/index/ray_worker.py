"""The worker side of `sae-mcp index --ray`: what runs where the model is (the driver is ray_driver.py).

    IndexWorker(settings, device, threads)    one per GPU (or CPU slot); the driver wraps it with ray.remote.
                                              It holds the model and SAEs once (Engine.from_settings, the same
                                              Settings as a single process) and an ExampleSource for the names.
      .describe(key)         the index file and meta, corpus, compute dtype, default batch size: what the driver
                             needs to open the index without loading a model
      .walk(key, start, budget, every)      the corpus' windows from `start` for `budget` document tokens: a cursor
                             every `every` windows (candidate shard boundaries) and where it ends
      .scan_chunk(job, state)               scan part of a shard with scan.scan, from a checkpoint row, until
                             `job.seconds` have passed (at a resumable point) or the shard's end -> (row, windows)
      .progress()            (shard row, its tokens so far) of the chunk running now (a second actor thread)

Everything here is importable and testable without Ray: walk and windows_at are plain functions.

A cursor lets a worker start a shard deep in the corpus without tokenizing what comes before it: documents before
the cursor's are read and dropped, and window numbering starts from the cursor, so each window's global index
(hence each token's global position window * context_size + offset) is what one pass over the corpus gives it.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sae_mcp.engine.corpus import CorpusSource, Window, iter_documents, iter_windows, tokenized_documents
from sae_mcp.engine.hub import Hub
from sae_mcp.index import scan as scan_mod
from sae_mcp.index.scan import ScanRequest, batch_windows_for, bos_id, compute_dtype, scan
from sae_mcp.index.state import ScanState
from sae_mcp.index.store import StoredScan
from sae_mcp.settings import Settings


@dataclass(frozen=True)
class Cursor:
    """A place in the window stream a scan can start from."""

    window: int  # a window's global index
    document: int  # its document's index in the corpus (-1: past the corpus' end)
    doc_window: int  # the global index of that document's first window
    tokens: int  # document tokens in the walk's windows before this one (counted from the walk's start)


@dataclass(frozen=True)
class Walk:
    """The windows one scan of `budget` tokens from `start` reads: cursors at the start, every `every` windows,
    and at the end (one past the last window read)."""

    cursors: tuple[Cursor, ...]
    exhausted: bool  # the corpus ended before the budget

    def every(self, k: int) -> "Walk":
        """Every k-th start cursor (a walk every `every` windows -> one every k * `every`), and the end."""
        return Walk((*self.cursors[:-1][::k], self.cursors[-1]), self.exhausted)

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [c.window for c in self.cursors[:-1]]

    @property
    def start(self) -> int:
        return self.cursors[0].window

    @property
    def end(self) -> int:
        return self.cursors[-1].window

    @property
    def tokens(self) -> int:
        return self.cursors[-1].tokens

    def at(self, window: int) -> Cursor:
        """The last cursor at or before `window`, a window this walk covers (a resume point need not be a cursor of
        this walk). The end cursor is never one: past the corpus' end it names no document."""
        i = bisect.bisect_right(self._starts, window) - 1
        return self.cursors[max(i, 0)]


def _doc_lengths(src: CorpusSource, tokenizer, hub: Hub | None) -> Iterator[tuple[int, int]]:
    """(document index, its token count) in corpus order, tokenized as iter_windows tokenizes them."""
    return ((d, len(ids)) for d, ids in tokenized_documents(iter_documents(src, hub), tokenizer))


def walk(src: CorpusSource, tokenizer, context_size: int, bos: int | None, start: int, budget: int, every: int,
         hub: Hub | None = None) -> Walk:
    """The windows a scan from window `start` reads for `budget` document tokens, as scan._buffers takes them (it
    stops before the first window once the budget is reached) and corpus.iter_windows cuts them."""
    step = context_size - (1 if bos is not None else 0)
    cursors: list[Cursor] = []
    w = seen = 0
    for d, n in _doc_lengths(src, tokenizer, hub):
        first = w
        for j in range(0, n, step):  # the document's windows
            if w >= start:
                if seen >= budget:
                    return Walk((*cursors, Cursor(w, d, first, seen)), exhausted=False)
                if (w - start) % every == 0:
                    cursors.append(Cursor(w, d, first, seen))
                seen += min(step, n - j)
            w += 1
    end = Cursor(max(w, start), -1, max(w, start), seen)
    return Walk((*cursors, end), exhausted=seen < budget)


def windows_at(src: CorpusSource, tokenizer, context_size: int, bos: int | None, cursor: Cursor, first: int,
               hub: Hub | None = None) -> Iterator[Window]:
    """corpus.iter_windows(..., skip_windows=first), starting from a cursor at or before `first`: documents before
    the cursor's are dropped untokenized."""
    return iter_windows(src, tokenizer, context_size, bos, first, hub, from_document=(cursor.document,
                                                                                     cursor.doc_window))


@dataclass(frozen=True)
class Chunk:
    """One call's work on a shard: scan windows [first, end) from the shard's checkpoint (or afresh)."""

    key: str  # the SAE
    name: str  # the shard's scan row, e.g. 'index/shard-3:2048-4096'
    cursor: Cursor  # at or before `first`
    first: int  # the first window to scan: the shard's start, or its checkpoint's resume point
    end: int  # one past the shard's last window
    target: int  # the shard's document tokens (its scan stops exactly at `end`)
    batch_windows: int  # the same for every worker, so batches are the ones a single process would make
    seconds: float  # return at the first resumable point after this long (the driver checkpoints it)
    fault: Callable[[int], None] | None = None  # test-only hook, called with the worker's batch count


@dataclass(frozen=True)
class FailAfter:
    """Test-only fault: once the worker has scanned `batches` batches, fail once (the first worker to create
    `marker`): 'exit' ends the process at once, as a crash or an OOM kill would; 'raise' raises."""

    batches: int
    marker: str
    how: str = "exit"

    def __call__(self, done: int) -> None:
        if done < self.batches:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # already failed once: the retry goes through
            return
        if self.how == "exit":
            os._exit(17)
        raise RuntimeError(f"injected failure after {done} batches (test hook)")


class _Pause(Exception):
    """Raised from scan's on_batch at a resumable point once a chunk's time is up: carries that state."""

    def __init__(self, state: ScanState):
        self.state = state


class IndexWorker:
    def __init__(self, settings: Settings, device: str, threads: int):
        from sae_mcp.engine.runtime import Engine
        from sae_mcp.index.source import ExampleSource

        torch.set_num_threads(threads)
        settings = settings.model_copy(update={"device": device})
        with contextlib.redirect_stdout(sys.stderr):  # library chatter; the driver's stdout is its report
            self.engine = Engine.from_settings(settings)
        self.source = ExampleSource(self.engine, settings)
        self._progress = ("", 0)  # (shard row, tokens) of the running chunk
        self._batches = 0  # batches scanned by this process (the test hook counts them)

    def keys(self) -> list[str]:
        return list(self.engine.saes)

    def describe(self, key: str | None) -> dict:
        s = self.engine.sae(key)
        path, meta = self.source.index_location(s)
        length = self.source.window_length(s)
        return dict(key=s.key, path=str(path), meta=meta, corpus=self.source.corpus(s).describe(),
                    compute_dtype=compute_dtype(self.engine, s), host=socket.gethostname(),
                    batch_windows=batch_windows_for(self.engine, s, length, s.d_sae),
                    buffer_batches=scan_mod.BUFFER_BATCHES)  # the worker's: it cuts the buffers

    def walk(self, key: str, start: int, budget: int, every: int) -> Walk:
        s = self.engine.sae(key)
        return walk(self.source.corpus(s), self.engine.corpus_tokenizer, self.source.window_length(s),
                    bos_id(self.engine, s), start, budget, every, self.engine.hub)

    def progress(self) -> tuple[str, int]:
        return self._progress

    def cpu_seconds(self) -> float:
        """This worker process's CPU time (bench/bench_ray.py: work per token, whatever else loads the box)."""
        return time.process_time()

    def scan_chunk(self, job: Chunk, state: StoredScan | None) -> tuple[StoredScan, list]:
        """-> (the shard's state as a row, to checkpoint; the windows scanned, (id, document, start, ids) each)."""
        from sae_mcp.index.source import resume_state

        s = self.engine.sae(job.key)
        length, bos = self.source.window_length(s), bos_id(self.engine, s)
        stream = windows_at(self.source.corpus(s), self.engine.corpus_tokenizer, length, bos, job.cursor, job.first,
                            self.engine.hub)
        rows: list = []
        deadline = time.monotonic() + job.seconds

        def on_batch(batch: list[Window], st: ScanState, resumable: bool) -> None:
            rows.extend((w.index, w.document, w.start, w.ids) for w in batch)
            self._batches += 1
            if job.fault is not None:
                job.fault(self._batches)
            if resumable and st.windows < job.end and time.monotonic() >= deadline:
                raise _Pause(st)  # a whole buffer is in: nothing after st.windows was folded

        def progress(done: int, total: int) -> None:
            self._progress = (job.name, done)

        try:
            request = ScanRequest(context_size=length, bos=bos is not None, max_tokens=job.target,
                                  batch_windows=job.batch_windows)
            st = scan(self.engine, s, itertools.islice(stream, job.end - job.first), request,
                      state=resume_state(state, self.engine.device), progress=progress, on_batch=on_batch)
        except _Pause as pause:
            st = pause.state
        return st.stored(job.name, job.target, compute_dtype(self.engine, s)), rows
