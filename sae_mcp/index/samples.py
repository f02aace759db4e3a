"""Interval samples: for every feature and every activation band, a few uniformly sampled firing positions, kept
by the one-pass scan (scan.py) beside its top-K, merged across batches and resumed from checkpoints like it.

The 64 log-spaced histogram bins are grouped by FINE_PER_BIN = 2 into SAMPLE_BINS = 32 sample bins (a quarter
decade each: activations within a factor 1.78). In each, the S = SAMPLES_PER_BIN firing entries with the smallest
key pos_hash(position) are kept:
    samp_pos  [F, SB, S] int64    global token positions, ascending by key; MAX_POS marks an empty slot
    samp_vals [F, SB, S] float32  their activations (0 in empty slots)
Memory: SB * S * (8 + 4) = 32 * 4 * 12 = 1536 bytes per feature (a 24576-feature SAE: 38 MB), beside the top-K
state's 50 * 12 + 64 * 8 + 8 = 1120 bytes per feature.

Why the bottom-S by a fixed hash: pos_hash is a bijection of 32-bit positions (xorshift-multiply rounds), so the
S smallest keys of a set of positions are a uniform sample of it without replacement; it is deterministic (the
same whatever the batching, and across a resume); and the bottom-S of a union lies inside the union of the
parts' bottom-S, so batches merge exactly (the same argument as the top-K's), and so do sample bins: a band made
of whole sample bins gets an exact uniform sample of its tokens from its bins' kept entries (their first S by key).
"""

from __future__ import annotations

import torch

MAX_POS = 2**32 - 1  # global token positions stay below this (scan.py checks); the empty slot's position
EMPTY_KEY = 2**32  # an empty slot's key: above every pos_hash value
SAMPLE_BINS = 32
SAMPLES_PER_BIN = 4
FINE_SHIFT = 1
FINE_PER_BIN = 1 << FINE_SHIFT  # histogram bins (state.HIST_BINS = 64) per sample bin: 2
_M32 = 0xFFFFFFFF


def pos_hash(pos: torch.Tensor) -> torch.Tensor:
    """[...] int64 positions in [0, 2^32) -> [...] int64 keys in [0, 2^32), a bijection. Both multipliers are odd
    and below 2^31, so x * c < 2^63 never overflows int64 (the low 32 bits are the mod-2^32 product)."""
    x = pos ^ (pos >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x046CA68B) & _M32
    return x ^ (x >> 16)


def slot_key(pos: torch.Tensor) -> torch.Tensor:
    """The key of stored slots: pos_hash, EMPTY_KEY for an empty slot (MAX_POS)."""
    return torch.where(pos == MAX_POS, torch.full_like(pos, EMPTY_KEY), pos_hash(pos))


def empty_samples(n_features: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(samp_pos [F, SB, S] int64 all empty, samp_vals [F, SB, S] float32 zeros)."""
    shape = (n_features, SAMPLE_BINS, SAMPLES_PER_BIN)
    return (torch.full(shape, MAX_POS, dtype=torch.long, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device))


def fold_samples(samp_pos: torch.Tensor, samp_vals: torch.Tensor, rows: torch.Tensor, cells: torch.Tensor,
                 vals: torch.Tensor, pos: torch.Tensor) -> None:
    """Fold one batch's firing entries into the kept samples, IN PLACE (a copy of a 24576-feature state per batch
    would move 38 MB for the few slots that change). rows, cells, vals: [nnz] each (token row, histogram cell
    feature * 64 + bin, activation) of every firing entry; pos [N]: each row's global position, never folded before.

    Only an entry whose key is below its bin's S-th kept key can enter: once the scan is warm that is ~S / count
    of them. The touched bins' kept samples and their new entries are sorted together, and each bin's first S
    rewrite its slots (slots past them were empty and stay so). Measured (1 thread, synthetic 8128 tokens x 4096
    features at L0 64, 6 batches from a cold state, where nearly every entry enters): ~30 ms a batch, against
    ~120 ms for the whole update_state; the first version took ~100 ms. What helped: hashing per row, thresholds
    per bin, empty slots left out of the sort, a stable sort, bincount instead of unique, index_select gathers."""
    f, nsb, s = samp_pos.shape
    flat_p, flat_v = samp_pos.view(-1), samp_vals.view(-1)  # [F*SB*S] views: writes land in place
    g = cells >> FINE_SHIFT  # [nnz] sample-bin group of each entry: feature * SB + bin // 2 (int64 // is ~8x slower)
    h = at(pos_hash(pos), rows)  # [nnz] (hashed per row: ~64x fewer hashes at L0 64)
    last = flat_p[s - 1 :: s]  # [F*SB] each group's S-th slot
    thr = at(slot_key(last), g) if last.numel() < g.numel() else slot_key(at(last, g))  # [nnz], fewer hashes
    idx = (h < thr).nonzero().squeeze(1)  # [m] entries below their group's S-th key
    if idx.numel() == 0:
        return
    g, h, p, v = at(g, idx), at(h, idx), at(pos, at(rows, idx)), at(vals, idx).float()  # [m] each
    ug, cnt = _groups(g, f * nsb)  # [U] touched groups (ascending), new entries of each
    slots = ((ug * s)[:, None] + torch.arange(s, device=g.device)).reshape(-1)  # [U*S] their flat slots
    real = (at(flat_p, slots) != MAX_POS).nonzero().squeeze(1)  # [r] slots holding a sample (the first ones)
    slots = at(slots, real)
    op, ov = at(flat_p, slots), at(flat_v, slots)  # [r]
    n_g = cnt + torch.bincount(real // s, minlength=ug.numel())  # [U] entries per touched group
    ag = torch.cat([at(ug, real // s), g])  # [r + m]
    order = ((ag << 33) | torch.cat([pos_hash(op), h])).argsort(stable=True)  # by group, then key (< 2^32)
    rank = torch.arange(order.numel(), device=g.device) - (torch.cumsum(n_g, 0) - n_g).repeat_interleave(n_g)
    keep = (rank < s).nonzero().squeeze(1)
    src = at(order, keep)
    dest = at(ag, src) * s + at(rank, keep)  # flat slot of each kept entry (distinct)
    new_p, new_v = at(torch.cat([op, p]), src), at(torch.cat([ov, v]), src)
    flat_p.index_copy_(0, dest, new_p)
    flat_v.index_copy_(0, dest, new_v)


def at(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """x[i] for 1-d x and i as index_select: measured 6x faster than advanced indexing on the CPU (1 thread,
    520k int64 from 520k: 1.1 ms against 6.8 ms)."""
    return x.index_select(0, i)


def _groups(g: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of g [m] ascending and their counts: a bincount when the groups are few against m (5x
    faster than unique's sort at 520k entries in 131k groups), else unique."""
    if n_groups <= 4 * g.numel():
        c = torch.bincount(g, minlength=n_groups)
        ug = c.nonzero().squeeze(1)
        return ug, at(c, ug)
    return torch.unique(g, return_counts=True)
