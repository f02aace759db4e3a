"""Merging scan states of disjoint token ranges (shards of a corpus) into the state one scan of all would hold.

Every part of a ScanState (scan.py) merges exactly, in any grouping and any order:
    top_vals, top_pos [K, F]     the K largest by the scan's key (value desc, then position asc): the top-K of a
                                 union lies in the union of the parts' top-K, and distinct positions give distinct
                                 keys, so the K kept are the same set, sorted the same way, as one scan keeps
    n_fired [F], hist [F, NB]    counts: sums
    samp_pos, samp_vals [F, SB, S]  the S entries with the smallest pos_hash per (feature, sample bin): the bottom-S
                                 of a union lies in the union of the parts' bottom-S (samples.py), kept ascending by
                                 key with empty slots (MAX_POS, 0.0) last, as fold_samples keeps them
    tokens                       a sum; windows: the furthest resume point; exhausted: either part's
This needs the parts' positions to be disjoint (each token scanned once) and global (window_index * context_size +
position in the window), which holds when each shard is a range of windows numbered as in one corpus stream.
ScanState.empty is the merge's identity: its slots are the empty ones every scan starts from.

Cost, once per shard per build: a topk over [2K, F] int64 keys (~3 us a feature) and pos_hash plus a sort over
[F, SB, 2S] (~17 us a feature), measured with every slot full on one CPU thread (bench/bench_ray.py): ~0.5 s for
a 24576-feature SAE, next to minutes or hours of scanning.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from sae_mcp.index.samples import SAMPLES_PER_BIN, slot_key
from sae_mcp.index.state import ScanState, _merge_top


def merge_top(a_vals: torch.Tensor, a_pos: torch.Tensor, b_vals: torch.Tensor, b_pos: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [K, F] top-K states -> the top-K [K, F] of their union on the scan's (value desc, position asc) key,
    by the merge update_state uses."""
    merged = _merge_top(a_vals, a_pos, b_vals, b_pos, None)
    assert merged is not None  # only None for an empty column selection
    return merged


def merge_samples(a_pos: torch.Tensor, a_vals: torch.Tensor, b_pos: torch.Tensor, b_vals: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [F, SB, S] interval-sample states -> the bottom-S by pos_hash of each (feature, bin)'s union, ascending
    by key, empty slots last. Keys of distinct positions are distinct (pos_hash is a bijection); empty slots all
    key EMPTY_KEY and are identical, so a stable sort gives one result whatever the order of a and b."""
    s = a_pos.shape[2]
    assert s == SAMPLES_PER_BIN and b_pos.shape == a_pos.shape, (a_pos.shape, b_pos.shape)
    pos = torch.cat([a_pos, b_pos], dim=2)  # [F, SB, 2S]
    vals = torch.cat([a_vals, b_vals], dim=2)
    order = slot_key(pos).argsort(dim=2, stable=True)[..., :s]  # [F, SB, S]
    return pos.gather(2, order), vals.gather(2, order)


def merge_states(a: ScanState, b: ScanState) -> ScanState:
    """The state of the union of two disjoint scans (associative and commutative: see the module docstring).
    Neither input is changed (update_state folds samples in place; this never does)."""
    if a.top_vals.shape != b.top_vals.shape or a.samp_pos.shape != b.samp_pos.shape:
        raise ValueError(f"cannot merge scan states of different shapes: {tuple(a.top_vals.shape)} "
                         f"and {tuple(b.top_vals.shape)}")
    top_vals, top_pos = merge_top(a.top_vals, a.top_pos, b.top_vals, b.top_pos)
    samp_pos, samp_vals = merge_samples(a.samp_pos, a.samp_vals, b.samp_pos, b.samp_vals)
    return ScanState(
        top_vals=top_vals, top_pos=top_pos, n_fired=a.n_fired + b.n_fired, hist=a.hist + b.hist,
        samp_pos=samp_pos, samp_vals=samp_vals, tokens=a.tokens + b.tokens, windows=max(a.windows, b.windows),
        exhausted=a.exhausted or b.exhausted,
    )


def merge_all(states: Iterable[ScanState]) -> ScanState:
    """Fold any number (>= 1) of disjoint states into one."""
    return functools.reduce(merge_states, states)
