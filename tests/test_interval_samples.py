"""Interval samples (index/samples.py) and what top_examples shows of them (index/view.py), against
plain computations written here: the bottom-S-by-hash samples over every firing entry (across batch splits and a
resume from a stored checkpoint), the quantile bands of a histogram, and identical contexts merged with counts."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sae_mcp.index.samples import MAX_POS, SAMPLE_BINS, SAMPLES_PER_BIN, pos_hash
from sae_mcp.index.source import resume_state
from sae_mcp.index.state import ScanState, update_state
from sae_mcp.index.store import IndexStore
from sae_mcp.index.view import merge_identical, quantile_bands

from helpers.index import plain_hash

S = SAMPLES_PER_BIN


def plain_sample_bin(v: float) -> int:
    """The histogram bin (8 a decade from 1e-4, clamped to 0..63) grouped by 2."""
    return min(63, max(0, math.floor((math.log10(v) + 4) * 8))) // 2


def test_pos_hash_is_the_plain_bijection_on_32_bit_positions():
    g = torch.Generator().manual_seed(0)
    ps = torch.cat([torch.arange(0, 70_000), torch.randint(0, MAX_POS, (20_000,), generator=g),
                    torch.tensor([MAX_POS - 1, 2**31, 2**31 - 1])])
    got = pos_hash(ps)
    assert got.tolist() == [plain_hash(int(p)) for p in ps]
    assert int(got.min()) >= 0 and int(got.max()) < 2**32
    assert torch.unique(got[:70_000]).numel() == 70_000  # distinct positions, distinct keys
    # Consecutive positions spread evenly: the lowest 1/16 of keys hits each residue mod 16 about equally.
    low = torch.arange(0, 70_000)[got[:70_000] < 2**28]
    counts = torch.bincount(low % 16, minlength=16).float()
    assert float(counts.min()) > 0.7 * float(counts.mean())


def _acts(n_tok: int, f: int, fire: float, seed: int) -> torch.Tensor:
    """Activations at fine-bin centres (never near a bin edge), over ~3 decades, `fire` of them non-zero."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.randint(20, 44, (n_tok, f), generator=g).float()  # bins 20..43: 1e-1.5 .. 1e1.5
    vals = 10 ** ((fine + 0.5) / 8 - 4)
    return vals * (torch.rand(n_tok, f, generator=g) < fire)


def _fold(state: ScanState, acts: torch.Tensor, pos: torch.Tensor, sizes: list[int]) -> ScanState:
    at = 0
    for size in sizes:
        with torch.inference_mode():
            state = update_state(state, acts[at : at + size].clone(), pos[at : at + size])
        at += size
    return state


def _checkpoint_roundtrip(state: ScanState, path) -> ScanState:
    """Through the SQLite row and back, as a resumed scan gets it."""
    store = IndexStore(path, {"test": "samples"})
    store.save_scan(state.stored("index", 10**6, None))
    row = IndexStore(path, {"test": "samples"}).load_scan("index")
    return resume_state(row, "cpu")


@pytest.mark.parametrize("fire", [0.75, 0.04], ids=["dense-topk-path", "sparse-sort-path"])
def test_samples_are_the_bottom_s_by_hash_of_every_bin_across_batches_and_a_resume(fire, tmp_path):
    n_tok, f = 900, 6
    acts = _acts(n_tok, f, fire, seed=1)
    pos = torch.arange(n_tok) * 131 + 7  # global positions with gaps, as windows leave them
    rng = random.Random(0)
    sizes = []
    while sum(sizes) < n_tok:
        sizes.append(min(rng.randint(1, 120), n_tok - sum(sizes)))
    half = len(sizes) // 2
    state = _fold(ScanState.empty(f, 5, "cpu"), acts, pos, sizes[:half])
    state = _checkpoint_roundtrip(state, tmp_path / "ckpt.sqlite")  # the scan resumes from a checkpoint
    state = _fold(state, acts[sum(sizes[:half]):], pos[sum(sizes[:half]):], sizes[half:])
    in_one = _fold(ScanState.empty(f, 5, "cpu"), acts, pos, [n_tok])

    assert state.samp_pos.shape == (f, SAMPLE_BINS, S)
    for j in range(f):
        for b in range(SAMPLE_BINS):
            entries = sorted((plain_hash(int(pos[i])), int(pos[i]), float(acts[i, j])) for i in range(n_tok)
                             if acts[i, j] > 0 and plain_sample_bin(float(acts[i, j])) == b)[:S]
            want_p = [p for _, p, _ in entries] + [MAX_POS] * (S - len(entries))
            want_v = [v for _, _, v in entries] + [0.0] * (S - len(entries))
            assert state.samp_pos[j, b].tolist() == want_p, (j, b)
            assert state.samp_vals[j, b].tolist() == pytest.approx(want_v, abs=0)
            assert in_one.samp_pos[j, b].tolist() == want_p
    assert torch.equal(state.top_pos, in_one.top_pos) and torch.equal(state.hist, in_one.hist)


def test_quantile_bands_are_whole_sample_bins_by_mid_quantile():
    rng = np.random.default_rng(0)
    for trial in range(200):
        fine = np.zeros(64, np.int64)
        lo = int(rng.integers(0, 60))
        hi = int(rng.integers(lo + 1, 65))
        fine[lo:hi] = rng.integers(0, 50, hi - lo) * (rng.random(hi - lo) < 0.8)
        n = int(rng.integers(1, 9))
        bands = quantile_bands(fine, n, 2)
        coarse = [int(fine[2 * b] + fine[2 * b + 1]) for b in range(32)]
        total = sum(coarse)
        if total == 0:
            assert bands == []
            continue
        used = [b for b in range(32) if coarse[b]]
        assert 1 <= len(bands) <= n
        assert bands[0].lo == used[0] and bands[-1].hi == used[-1] + 1
        assert all(a.hi == b.lo for a, b in zip(bands, bands[1:]))  # contiguous, lowest first
        assert sum(b.tokens for b in bands) == total
        for band in bands:
            assert band.tokens == sum(coarse[band.lo : band.hi]) > 0  # an empty bin joins the band below it
            assert coarse[band.lo] > 0
            assert band.q_lo == pytest.approx(sum(coarse[: band.lo]) / total)
            assert band.q_hi == pytest.approx(sum(coarse[: band.hi]) / total)
            # Every bin's band is floor(n * the quantile of its tokens' middle), capped at n - 1.
            idx = {min(n - 1, math.floor(n * (sum(coarse[:b]) + coarse[b] / 2) / total))
                   for b in range(band.lo, band.hi) if coarse[b]}
            assert len(idx) == 1
        marks = [min(n - 1, math.floor(n * (sum(coarse[: b.lo]) + coarse[b.lo] / 2) / total)) for b in bands]
        assert marks == sorted(set(marks))  # one band per index used


def test_identical_contexts_are_listed_once_with_their_counts():
    rng = random.Random(3)
    for trial in range(100):
        cands = [(float(50 - i), rng.randrange(10**6)) for i in range(rng.randint(0, 50))]
        context_of = {p: rng.choice("abcdefg") if rng.random() < 0.7 else f"u{p}" for _, p in cands}
        limit = rng.randint(1, 12)
        shown, merged = merge_identical(cands, lambda p: (context_of[p],), limit)
        # Plainly: walk the candidates in order, a new context opens a slot; counts over ALL candidates.
        firsts, counts = [], {}
        for v, p in cands:
            c = context_of[p]
            if c not in counts:
                firsts.append((v, p))
            counts[c] = counts.get(c, 0) + 1
        want = [(v, p, counts[context_of[p]]) for v, p in firsts[:limit]]
        assert shown == want
        assert merged == sum(c - 1 for _, _, c in want)
