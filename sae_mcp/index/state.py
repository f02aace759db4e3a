"""The scan's running state (ScanState) and how one batch is folded into it (update_state), on the device.

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
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from sae_mcp.index.firing import firing_entries
from sae_mcp.index.samples import FINE_PER_BIN, MAX_POS, SAMPLE_BINS, at, empty_samples, fold_samples
from sae_mcp.index.store import StoredScan

HIST_LO, HIST_HI, HIST_PER_DECADE = -4, 4, 8
HIST_BINS = (HIST_HI - HIST_LO) * HIST_PER_DECADE  # 64
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


def update_state(state: ScanState, acts: torch.Tensor, pos: torch.Tensor,
                 firing: tuple[torch.Tensor, torch.Tensor] | None = None) -> ScanState:
    """Fold one batch into the state, IN PLACE, and return it. acts [N, F] (scanned tokens only), pos [N] int64
    global positions; `firing`: acts' firing entries (flat indices ascending, values) when the encode found them
    (index/firing.py), else found here. Every write comes last, after everything that can fail.

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
    On stories260K (8128 tokens x 4096 features, ~460k firing entries, 60k tokens in, 1 thread): ~25 ms a batch
    once the entries are found (33 before shifts replaced the int64 division, the merge ranked keys alone and the
    candidates were cut to kb rows), spread over ~40 ops of 0.2-3 ms: the interval samples ~10, the top-K
    candidates and merge ~9, counts and histogram ~4.
    """
    n, f = acts.shape
    k = state.top_vals.shape[0]
    flat, vals = firing_entries(acts) if firing is None else firing  # [nnz] each: flat index, value of entries > 0
    if bool(vals.isnan().any()):
        raise ValueError("the SAE's activations hold NaN: the model or the SAE produced NaN on this corpus (broken "
                         "weights, or a dtype too narrow for its activations: try --dtype float32)")
    if f & (f - 1) == 0:  # a power of two (most SAEs): shifts, ~8x faster than int64 division on this CPU
        rows, cols = flat >> (f.bit_length() - 1), flat & (f - 1)  # [nnz] each
    else:
        rows = flat // f
        cols = flat - rows * f  # (faster than int64 %)
    counts = torch.bincount(cols, minlength=f)  # [F] tokens fired in this batch
    # bin floor((log10 v - LO) * 8) clamped to [0, NB - 1]: clamped first, so truncating toward zero is the floor
    b = vals.float().log10().sub_(HIST_LO).mul_(HIST_PER_DECADE).clamp_(0, HIST_BINS - 1).long()  # [nnz]
    cells = b.add_(cols, alpha=HIST_BINS)  # [nnz] histogram cell of each entry: column * NB + bin

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
    """The running top-K [K, F] merged with candidates [kb, U] on the (value, position) key: of the features `cols`
    [U] (None: all F, and kb rows of all) -> their new top-K [K, U]; None when no feature has a candidate.

    Only the keys are ranked, a feature to a contiguous row, and the kept values and positions are read back out of
    the keys (the key holds both exactly). Measured (1 thread, 3537 of 4096 features, K 50 + kb 26): 7.6 ms with
    topk over dim 0 of the keys and gathers of values and positions, 5.3 ms this way."""
    k = top_vals.shape[0]
    if cols is not None and cols.numel() == 0:
        return None
    old_v = top_vals if cols is None else top_vals.index_select(1, cols)  # [K, U]
    old_p = top_pos if cols is None else top_pos.index_select(1, cols)
    keys = torch.cat([_key(old_v, old_p), _key(cand_v, cand_p)]).t().contiguous()  # [U, K + kb]
    kept = keys.topk(k, dim=1).values.t()  # [K, U], by key desc
    return _unkey(kept)


def _unkey(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_key's inverse: int64 keys -> (float32 values, int64 positions), each the shape of key."""
    vals = (key >> 32).to(torch.int32).view(torch.float32)
    return vals, MAX_POS - (key & 0xFFFFFFFF)


def _sparse_candidates(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, pos: torch.Tensor, k: int,
                       f: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-K per feature of the entries (rows, cols, vals [m]) that can enter the running top-K ->
    touched [U] (the features with one, ascending), cand_v, cand_p [kb, U] (empty slots: 0.0, MAX_POS), kb the most
    candidates a feature has, at most K: the merge's topk runs over K + kb rows, not 2K."""
    key = _key(vals, at(pos, rows))
    o1 = key.argsort(descending=True)
    order = at(o1, at(cols, o1).argsort(stable=True))  # by feature, then by (value desc, position asc)
    c = at(cols, order)
    n_c = torch.bincount(cols, minlength=f)  # [F] candidates per feature
    touched = n_c.nonzero().squeeze(1)  # [U]
    column = torch.cumsum(n_c > 0, 0) - 1  # [F] a touched feature's column in [K, U]
    rank = torch.arange(c.numel(), device=vals.device) - at(torch.cumsum(n_c, 0) - n_c, c)
    sel = (rank < k).nonzero().squeeze(1)
    u, kb = touched.numel(), min(k, int(n_c.max()))
    cell = at(rank, sel) * u + at(column, at(c, sel))  # flat index into [kb, U]
    cand_v = torch.zeros(kb * u, device=vals.device)
    cand_p = torch.full((kb * u,), MAX_POS, dtype=torch.long, device=vals.device)
    cand_v.index_copy_(0, cell, at(at(vals, order), sel).float())
    cand_p.index_copy_(0, cell, at(pos, at(at(rows, order), sel)))
    return touched, cand_v.view(kb, u), cand_p.view(kb, u)


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
