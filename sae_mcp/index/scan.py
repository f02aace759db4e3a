"""One pass over a corpus: for every feature at once, its top-k examples, firing count and activation histogram.

Per batch of windows: forward only up to the SAE's layer, encode, and fold the [tokens, d_sae] activations into
a small running state that lives on the device:
    top_vals  [K, F] float32   the K largest activations seen so far, per feature
    top_pos   [K, F] int64     where: global token position = window_index * context_size + position_in_window
    n_fired   [F]    int64     tokens where the feature fired (activation > 0)
    hist      [F, NB] int64    positive activations in NB log-spaced bins (10^-4 .. 10^4, 8 bins a decade)
    samp_pos, samp_vals [F, SB, S]   interval samples: per feature and per 2 histogram bins, the S firing entries
                                     with the smallest hash(position), a uniform sample (samples.py)
Per feature: K * 12 + NB * 8 + 8 = 1120 bytes of top-K, counts and histogram, + 1536 bytes of samples.
Only this state ever leaves the device (at checkpoints), never the dense token x d_sae matrix.

Exactness: the examples are exactly the K largest activations over the scanned tokens, ties broken by earlier
position. torch.topk picks arbitrarily among equal values, and ties are real here (TinyStories documents share
their first words, so "Once upon a time" gives bit-identical activations in many documents). Each batch's top-K
is made exact by redoing the few features with a tie at the K-th value on an int64 key
    key = float32_bits(value) << 32 | (2^32 - 1 - position)
which orders by value, then by earlier position (float32 bits of non-negative values sort like the values);
the merge with the running state uses the same key. The global top-K is inside the union of the batches' top-K.
Sparse batches (the usual case) skip topk altogether: the firing entries are sorted on that key per feature.

Scanned tokens: every document token of a window; BOS is context, not a document token, and is not scanned
(its activations are outliers at many hooks and it has no document offset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from sae_mcp.engine.corpus import Window, bos_token_id, pad_windows
from sae_mcp.engine.devices import dtype_name
from sae_mcp.engine.fast_encode import can_fuse
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.index.samples import FINE_PER_BIN, MAX_POS, SAMPLE_BINS, at, empty_samples, fold_samples
from sae_mcp.index.store import StoredScan

HIST_LO, HIST_HI, HIST_PER_DECADE = -4, 4, 8
HIST_BINS = (HIST_HI - HIST_LO) * HIST_PER_DECADE  # 64
KEEP = 50  # examples kept per feature (the tool's k ceiling)
assert HIST_BINS == SAMPLE_BINS * FINE_PER_BIN  # MAX_POS (from samples.py): positions stay below it (checked)


def hist_edges() -> list[float]:
    """The NB + 1 bin edges; values below 1e-4 count in the first bin, above 1e4 in the last."""
    return [10 ** (HIST_LO + i / HIST_PER_DECADE) for i in range(HIST_BINS + 1)]


@dataclass
class ScanState:
    """The running per-feature state (device tensors) and how far the scan got."""

    top_vals: torch.Tensor  # [K, F] float32
    top_pos: torch.Tensor  # [K, F] int64
    n_fired: torch.Tensor  # [F] int64
    hist: torch.Tensor  # [F, NB] int64
    samp_pos: torch.Tensor  # [F, SB, S] int64, MAX_POS = empty (updated in place: see samples.fold_samples)
    samp_vals: torch.Tensor  # [F, SB, S] float32
    tokens: int = 0  # document tokens scanned
    windows: int = 0  # windows consumed from the stream (the resume point)
    exhausted: bool = False  # the corpus ended before the token budget

    @classmethod
    def empty(cls, n_features: int, k: int, device) -> "ScanState":
        samp_pos, samp_vals = empty_samples(n_features, device)
        return cls(
            top_vals=torch.zeros(k, n_features, device=device),
            top_pos=torch.full((k, n_features), MAX_POS, dtype=torch.long, device=device),
            n_fired=torch.zeros(n_features, dtype=torch.long, device=device),
            hist=torch.zeros(n_features, HIST_BINS, dtype=torch.long, device=device),
            samp_pos=samp_pos, samp_vals=samp_vals,
        )

    def snapshot(self) -> "ScanState":
        """A copy later batches cannot change (update_state writes every tensor in place): taken once a buffer of
        batches, at its resumable point, so the copy costs little next to the batches (~65 MB at 24576 features)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def stored(self, name: str, target: int, compute_dtype: str | None) -> StoredScan:
        """The state as the row `name` to write (IndexStore.save_scan), its tensors copied to host arrays."""
        return StoredScan(
            name=name, tokens=self.tokens, windows=self.windows, exhausted=self.exhausted, target=target,
            updated=time.time(), top_vals=self.top_vals.cpu().numpy(), top_pos=self.top_pos.cpu().numpy(),
            n_fired=self.n_fired.cpu().numpy(), hist=self.hist.cpu().numpy(), compute_dtype=compute_dtype,
            samp_pos=self.samp_pos.cpu().numpy(), samp_vals=self.samp_vals.cpu().numpy(),
        )


def _key(vals: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(value desc, position asc) as one int64 per element; values must be >= 0."""
    bits = vals.float().contiguous().view(torch.int32).long()
    return (bits << 32) | (MAX_POS - pos)


_BITS = {4: torch.int32, 2: torch.int16}  # float width -> the int type its bits are read as
_PER_WORD = {4: 2, 2: 4}  # floats per int64 word


def firing_entries(acts: torch.Tensor) -> torch.Tensor:
    """acts [N, F] -> flat indices [nnz] (ascending) of the entries > 0.

    A float is > 0 exactly when its bits, read as a signed integer, are > 0 (+0.0 is all zero bits, a negative
    float has its sign bit set). So the dense pass runs over int64 words of 2 (fp32) or 4 (bf16/fp16) floats, and
    only the words with a set bit are looked at float by float. Measured (1 thread, [7800, 4096] fp32 at 1.4%
    firing): 43 ms for torch.nonzero on the floats, ~15 ms this way; the dense pass is the scan's largest
    bookkeeping cost on a small model."""
    x = acts.reshape(-1)
    size = x.element_size()
    if size not in _BITS or x.numel() % _PER_WORD[size]:
        return (x > 0).nonzero().squeeze(1)
    per = _PER_WORD[size]
    words = x.view(torch.int64).nonzero().squeeze(1)  # [w] words holding a set bit
    parts = at(x.view(_BITS[size]).view(-1, per), words)  # [w, per] their floats' bits
    hit = (parts > 0).nonzero()  # [nnz, 2]: (word row, float within the word), row-major so ascending
    return at(words, hit[:, 0]) * per + hit[:, 1]


def update_state(state: ScanState, acts: torch.Tensor, pos: torch.Tensor) -> ScanState:
    """Fold one batch into the state, IN PLACE, and return it. acts [N, F] (scanned tokens only), pos [N] int64
    global positions. Every write comes last, after everything that can fail.

    Measured on the 2-core box (1 thread): a dense topk over dim 0 of [8192, 4096] costs as much as the encode
    itself, and so does a bool .sum(0); one nonzero pass costs ~7% of it. So everything is computed from the
    firing entries (SAE activations are sparse: L0 ~ 10-100 of thousands): counts and histogram by bincount and
    index_add_, the per-feature top-K by sorting the few firing entries that can enter it, the interval samples by
    sorting the few that can enter them. Dense activations (random SAEs, a cold state) fall back to topk.

    The top-K pre-filter: only an entry >= its feature's K-th kept value can enter that feature's top-K (an equal
    value passes; the merge's key decides it), and only the features with such an entry are merged: once the
    state is warm, a few percent of the features a batch. Measured at the gpt2-small shape (24576 features, 1270
    tokens a batch, warm state, 1 thread): the merge of every feature's [2K, F] keys took ~150 of the update's
    ~190 ms (topk, gathers and key arithmetic over 2.5M int64), and the histogram's dense bincount + add another
    ~13 ms; both are now proportional to the entries and features that change (see bench/bench_index.py).
    """
    n, f = acts.shape
    k = state.top_vals.shape[0]
    flat = firing_entries(acts)  # [nnz] flat indices of the entries > 0
    vals = at(acts.reshape(-1), flat)  # [nnz]
    rows, cols = flat // f, flat % f  # [nnz] each
    counts = torch.bincount(cols, minlength=f)  # [F] tokens fired in this batch
    b = ((vals.float().log10() - HIST_LO) * HIST_PER_DECADE).floor().clamp_(0, HIST_BINS - 1).long()  # [nnz]
    cells = cols * HIST_BINS + b  # [nnz] histogram cell of each entry

    c_in = (vals.float() >= at(state.top_vals[-1], cols)).nonzero().squeeze(1)  # [m] can enter their top-K
    if c_in.numel() * 8 <= n * f:  # sparse: top-K of each touched feature among its entries that can enter
        touched, cand_v, cand_p = _sparse_candidates(at(rows, c_in), at(cols, c_in), at(vals, c_in), pos, k, f)
    else:  # dense: this batch's exact top-kb of every feature with topk
        touched = None
        cand_v, cand_p = _dense_candidates(acts, pos, k)
    merged = _merge_top(state.top_vals, state.top_pos, cand_v, cand_p, touched)

    state.n_fired.add_(counts)
    state.hist.view(-1).index_add_(0, cells, torch.ones_like(cells))
    if merged is not None:
        top_v, top_p = merged
        if touched is None:
            state.top_vals.copy_(top_v)
            state.top_pos.copy_(top_p)
        else:
            state.top_vals.index_copy_(1, touched, top_v)
            state.top_pos.index_copy_(1, touched, top_p)
    fold_samples(state.samp_pos, state.samp_vals, rows, cells, vals, pos)
    return state


def _merge_top(top_vals: torch.Tensor, top_pos: torch.Tensor, cand_v: torch.Tensor, cand_p: torch.Tensor,
               cols: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running top-K [K, F] merged with a batch's candidates [kb, U] on the (value, position) key: of the
    features `cols` [U] (None: all F) -> their new top-K [K, U]; None when no feature has a candidate."""
    k = top_vals.shape[0]
    if cols is not None and cols.numel() == 0:
        return None
    old_v = top_vals if cols is None else top_vals.index_select(1, cols)  # [K, U]
    old_p = top_pos if cols is None else top_pos.index_select(1, cols)
    all_v = torch.cat([old_v, cand_v])  # [K + kb, U]
    all_p = torch.cat([old_p, cand_p])
    keep = _key(all_v, all_p).topk(k, dim=0).indices  # [K, U], sorted by key desc
    return all_v.gather(0, keep), all_p.gather(0, keep)


def _sparse_candidates(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor, k: int,
                       f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K per feature of the entries (rows, cols, vals [m]) that can enter the running top-K ->
    touched [U] (the features with one, ascending), cand_v, cand_p [K, U] (empty slots: 0.0, MAX_POS)."""
    key = _key(vals, at(pos, rows))
    o1 = key.argsort(descending=True)
    order = at(o1, at(cols, o1).argsort(stable=True))  # by feature, then by (value desc, position asc)
    c = at(cols, order)
    n_c = torch.bincount(cols, minlength=f)  # [F] candidates per feature
    touched = n_c.nonzero().squeeze(1)  # [U]
    column = torch.cumsum(n_c > 0, 0) - 1  # [F] a touched feature's column in [K, U]
    rank = torch.arange(c.numel(), device=vals.device) - at(torch.cumsum(n_c, 0) - n_c, c)
    sel = (rank < k).nonzero().squeeze(1)
    u = touched.numel()
    cell = at(rank, sel) * u + at(column, at(c, sel))  # flat index into [K, U]
    cand_v = torch.zeros(k * u, device=vals.device)
    cand_p = torch.full((k * u,), MAX_POS, dtype=torch.long, device=vals.device)
    cand_v.index_copy_(0, cell, at(at(vals, order), sel).float())
    cand_p.index_copy_(0, cell, at(pos, at(at(rows, order), sel)))
    return touched, cand_v.view(k, u), cand_p.view(k, u)


def _dense_candidates(acts: torch.Tensor, pos: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's exact top-kb per feature with topk (dense activations) -> cand_v, cand_p [kb, F]."""
    n = acts.shape[0]
    kb = min(k, n)
    vv, idx = acts.topk(min(kb + 1, n), dim=0)  # [kb(+1), F]
    if vv.shape[0] > kb:
        # topk chooses arbitrarily among equal values: where the (kb+1)-th equals the kb-th (> 0), the cut
        # went through a tie; redo those few features on the exact (value, position) key.
        tied = (vv[kb] == vv[kb - 1]) & (vv[kb - 1] > 0)
        vv, idx = vv[:kb], idx[:kb]
        if bool(tied.any()):
            tc = tied.nonzero()[:, 0]
            sub = acts[:, tc]  # [N, c]
            ii = _key(sub, pos[:, None].expand_as(sub)).topk(kb, dim=0).indices  # [kb, c]
            idx[:, tc] = ii
            vv[:, tc] = sub.gather(0, ii)
    # A feature firing fewer than kb times gets zeros from topk: they are empty slots (0.0, MAX_POS), as on the
    # sparse path, not zeros at real positions (which would outrank the state's empty slots).
    return vv.float(), pos[idx].masked_fill_(vv <= 0, MAX_POS)


# ---------------------------------------------------------------------------------------------------------------
# Batching and the pass


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
        acts = engine.encode(sae, x, out=buf)  # [N, d_sae], a view of buf's first N rows when given
        if fidx is not None:
            acts = acts[:, fidx]  # [N, F]
        state = update_state(state, acts, pos[keep].to(engine.device))
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
