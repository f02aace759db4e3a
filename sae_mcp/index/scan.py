"""One pass over a corpus: for every feature at once, its top-k examples, firing count and activation histogram.

Per batch of windows: forward only up to the SAE's layer, encode, and fold the [tokens, d_sae] activations into
the small running state that lives on the device (index/state.py: ScanState, update_state; what it holds, and why
its top-K is exact). Only that state ever leaves the device (at checkpoints), never the dense token x d_sae matrix.
Windows are read ahead on a thread, cut into buffers and batched by length (BUFFER_BATCHES below).

Scanned tokens: every document token of a window; BOS is context, not a document token, and is not scanned
(its activations are outliers at many hooks and it has no document offset).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from sae_mcp.engine.corpus import Window, bos_token_id, pad_windows
from sae_mcp.engine.devices import dtype_name
from sae_mcp.engine.fast_encode import can_fuse
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.index.firing import FiringEntries
from sae_mcp.index.samples import MAX_POS
from sae_mcp.index.state import ScanState, update_state

KEEP = 50  # examples kept per feature (the tool's k ceiling)


def batch_windows_for(engine: Engine, sae: LoadedSAE, context_size: int, n_features: int) -> int:
    """Windows per batch. CPU: ~32M dense activations per batch (128 MB fp32), at most 64 windows.
    CUDA: from free memory, 40% of it, at ~(d_sae * 24 + d_model * 64) bytes a token (acts, masks, top-k
    workspace, worst-case histogram index arrays; the forward's residual stream and MLP). Unmeasured on a GPU."""
    if str(engine.device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(engine.device))
        per_token = n_features * 24 + engine.model.cfg.d_model * 64
        return int(max(1, min(1024, 0.4 * free // (per_token * context_size))))
    return int(max(1, min(64, (1 << 25) // (context_size * max(n_features, 1)))))


def _autocast_dtype(engine: Engine) -> torch.dtype | None:
    """CUDA with fp32 weights: the scan computes in bf16 (fp16 where bf16 is unsupported); elsewhere None (as
    loaded)."""
    if str(engine.device).startswith("cuda") and engine.model.cfg.dtype == torch.float32:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast_for(engine: Engine) -> contextlib.AbstractContextManager:
    """The scan's precision as a context manager: CUDA autocast (see _autocast_dtype), else a no-op."""
    dt = _autocast_dtype(engine)
    return torch.autocast("cuda", dtype=dt) if dt is not None else contextlib.nullcontext()


def compute_dtype(engine: Engine, sae: LoadedSAE) -> str:
    """The precision a scan's activations are computed in, e.g. 'float32', or 'bfloat16' under CUDA autocast
    (the prompt tools compute as loaded, so their activations can differ from a bf16 scan's in the 3rd digit).
    'float32 (model), bfloat16 (SAE)' when the model and the SAE were loaded in different dtypes."""
    auto = _autocast_dtype(engine)
    if auto is not None:
        return dtype_name(auto)
    model_dt = engine.model.cfg.dtype
    sae_dt = next(iter(sae.sae.parameters()), torch.empty(0, dtype=model_dt)).dtype
    if sae_dt == model_dt:
        return dtype_name(model_dt)
    return f"{dtype_name(model_dt)} (model), {dtype_name(sae_dt)} (SAE)"


# Batches are cut from a buffer of this many batches' windows sorted by length, so a batch is padded only to its
# own windows' length: a document's short last window no longer pads a batch of full ones. Measured on TinyStories
# (128-token windows): 19% of the forward's token slots were padding when batches followed corpus order.
BUFFER_BATCHES = 32


def _buffers(windows: Iterable[Window], max_tokens: int, tokens_so_far: int, size: int, bos: bool
             ) -> Iterator[list[Window]]:
    """Windows in corpus order, in buffers of `size`, stopping once the token budget is reached (at a window)."""
    cur: list[Window] = []
    seen = tokens_so_far
    for w in windows:
        if seen >= max_tokens:
            break
        cur.append(w)
        seen += len(w.ids) - (1 if bos else 0)
        if len(cur) == size:
            yield cur
            cur = []
    if cur:
        yield cur


def _read_ahead(buffers: Iterator[list[Window]], depth: int = 1) -> Iterator[list[Window]]:
    """`buffers` read on a background thread, `depth` buffers ahead of the consumer: the next buffer's documents
    are read and tokenized (Rust, without the GIL) while the device scans this one. Same buffers, same order; an
    error while reading is raised here; stopping early (budget reached, cancel) stops the reader at its next
    buffer. Measured on an H200 (gpt2-small shape, 24576 features, one run each): the index at 0.79 of a bare
    forward + encode with it, 0.73 without; what remains is the state update on the device."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:  # into the queue unless the consumer has stopped (then False)
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for buf in buffers:
                if not put(buf):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=reader, name="scan-read-ahead", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _length_batches(buffer: list[Window], batch: int) -> list[list[Window]]:
    """A buffer's windows by length, longest first (the first batch shows the peak memory at once), in batches."""
    ordered = sorted(buffer, key=lambda w: (-len(w.ids), w.index))
    return [ordered[i : i + batch] for i in range(0, len(ordered), batch)]


def encode_buffer(engine: Engine, sae: LoadedSAE, rows: int) -> torch.Tensor | None:
    """The [rows, d_sae] buffer a CPU scan encodes every batch into (rows: the most scanned tokens a batch has), or
    None where it does not pay: on a GPU (its caching allocator reuses the memory of the last batch anyway), under
    autocast, or for an SAE that fast_encode cannot compute in place. Memory: it is as large as one batch's
    activations (at most ~128 MB by batch_windows_for) and lives as long as the scan; measured on the 2-core box,
    a fresh [8128, 4096] fp32 tensor costs ~50 ms of page faults a batch, more than its bias and ReLU."""
    if str(engine.device).startswith("cuda") or _autocast_dtype(engine) is not None or not can_fuse(sae.sae):
        return None
    return torch.empty(rows, sae.d_sae, dtype=sae.sae.dtype, device=engine.device)


def encode_firing(engine: Engine, sae: LoadedSAE, x: torch.Tensor, buf: torch.Tensor | None,
                  fidx: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """x [N, d_in] -> the activations [N, F] (into `buf` when given: see encode_buffer; of the features `fidx`
    when given) and, with a buffer and all features, their firing entries found inside the encode, a block of rows
    at a time while it is in cache (index/firing.py; else None: update_state finds them). Measured on
    stories260K (8128 tokens x 4096, 1 thread, best of 5): the encode alone 56 ms in blocks (67 in one piece); with
    the firing entries found inside it 72 ms, against ~110 for the encode in one piece and then a torch nonzero."""
    if buf is None or fidx is not None:
        acts = engine.encode(sae, x, out=buf)  # [N, d_sae], a view of buf's first N rows when given
        return (acts if fidx is None else acts[:, fidx]), None
    found = FiringEntries(sae.d_sae)
    acts = engine.encode(sae, x, out=buf, on_block=found.add)  # [N, d_sae], a view of buf's first N rows
    return acts, found.entries()


def _scan_batch(engine: Engine, sae: LoadedSAE, state: ScanState, batch: list[Window], context_size: int,
                bos: bool, pad: int, fidx: torch.Tensor | None, buf: torch.Tensor | None = None) -> ScanState:
    """Forward one batch of windows to the SAE's hook, encode its document tokens (into `buf` when given: see
    encode_buffer) and fold them into the state."""
    ids, valid = pad_windows(batch, pad, bos)  # [B, T] each
    T = ids.shape[1]
    if max(w.index for w in batch) * context_size + T >= MAX_POS:
        raise ValueError("scan too long: token positions exceed 2^32; use a smaller --tokens")
    base = torch.tensor([w.index * context_size for w in batch], dtype=torch.long)
    pos = (base[:, None] + torch.arange(T)[None, :]).reshape(-1)  # [B*T]
    keep = valid.reshape(-1).nonzero().squeeze(1)  # [N] scanned rows: no BOS, no padding
    with engine.device_work(), torch.inference_mode(), autocast_for(engine):
        x = engine.forward_to_hook(ids.to(engine.device), sae)  # [B, T, d_in]
        x = x.reshape(len(batch) * T, -1)[keep.to(engine.device)]  # [N, d_in]: only scanned tokens are encoded
        acts, firing = encode_firing(engine, sae, x, buf, fidx)  # [N, F]; its firing entries, or None
        state = update_state(state, acts, pos[keep].to(engine.device), firing)
    state.tokens += int(valid.sum())
    return state


@dataclass(frozen=True)
class ScanRequest:
    """What one scan reads and keeps (the windows, the state it resumes and the callbacks are separate)."""

    context_size: int  # tokens per window: a token's position is window_index * context_size + its offset
    bos: bool  # windows start with BOS (context, not scanned)
    max_tokens: int  # document tokens to stop at, counting those of the resumed state
    features: tuple[int, ...] | None = None  # the features kept, None = all d_sae (the state's F columns)
    k: int = KEEP  # top activations kept per feature
    batch_windows: int | None = None  # windows per forward; None = fitted to the device (batch_windows_for)

    def __post_init__(self) -> None:
        if self.context_size < 1 or self.max_tokens < 0 or self.k < 1:
            raise ValueError(f"scan of context_size={self.context_size}, max_tokens={self.max_tokens}, k={self.k}: "
                             "a window needs a token, k an example, and the budget cannot be negative")
        if self.features is not None and not self.features:
            raise ValueError("features=(): pass None for all features, or at least one")
        if self.batch_windows is not None and self.batch_windows < 1:
            raise ValueError(f"batch_windows={self.batch_windows}: at least one window a batch")


def scan(
    engine: Engine,
    sae: LoadedSAE,
    windows: Iterable[Window],
    request: ScanRequest,
    *,
    state: ScanState | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
    on_batch: Callable[[list[Window], ScanState, bool], None] | None = None,
) -> ScanState:
    """Scan `windows` (from the resume point `state`) until request.max_tokens document tokens or the corpus' end.

    `request.features`: None for all d_sae features, else a subset (the on-demand single-feature scan; the full
    encode still runs, since e.g. a TopK SAE's feature value depends on all the others). Windows are taken in buffers of
    BUFFER_BATCHES batches and scanned longest first (no padding to a stranger's length); the result is the same in
    any order (every statistic is exact and order-free). `on_batch(windows, state, resumable)` runs after each
    batch, outside the device lock: the store writes windows there, and checkpoints only a `resumable` state (the
    last batch of a buffer: everything before state.windows is in, nothing after it). The device lock is taken per
    batch, so other tools can run between batches of a long scan.
    """
    context_size, bos, max_tokens, features = request.context_size, request.bos, request.max_tokens, request.features
    n_features = sae.d_sae if features is None else len(features)
    if state is None:
        state = ScanState.empty(n_features, request.k, engine.device)
    batch_windows = request.batch_windows
    if batch_windows is None:
        batch_windows = batch_windows_for(engine, sae, context_size, n_features)
    pad = windows_pad_id(engine)
    fidx = None if features is None else torch.tensor(features, dtype=torch.long, device=engine.device)
    buf = encode_buffer(engine, sae, batch_windows * context_size)
    ended = True
    for buffer in _read_ahead(_buffers(windows, max_tokens, state.tokens, BUFFER_BATCHES * batch_windows, bos)):
        batches = _length_batches(buffer, batch_windows)
        for i, batch in enumerate(batches):
            if cancel is not None:
                cancel.check()
            state = _scan_batch(engine, sae, state, batch, context_size, bos, pad, fidx, buf)
            resumable = i == len(batches) - 1  # the whole buffer is in: the state is a prefix of the stream
            if resumable:
                state.windows = buffer[-1].index + 1
            if on_batch is not None:
                on_batch(batch, state, resumable)
            if progress is not None:
                progress(min(state.tokens, max_tokens), max_tokens)
        if state.tokens >= max_tokens:
            ended = False
            break
    state.exhausted = ended and state.tokens < max_tokens
    return state


def windows_pad_id(engine: Engine) -> int:
    """The id short windows are right-padded with (pad, else BOS, else EOS, else 0); never attended to."""
    tok = engine.model.tokenizer
    if tok is None:  # a config-only model fed token ids (the bench)
        return 0
    for cand in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def bos_id(engine: Engine, sae: LoadedSAE) -> int | None:
    """The BOS id windows start with (None when the SAE was trained without BOS)."""
    if not sae.prepend_bos:
        return None
    return bos_token_id(engine.model.tokenizer)
