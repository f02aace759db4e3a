"""The scan's state update (state.update_state: in place, the top-K pre-filtered by each feature's K-th kept value
and merged only for the features that changed) against a brute force written plainly here in numpy over every
entry of every batch: top-K by (value desc, position asc), firing counts, histogram, interval samples. Random
batches with ties everywhere, features that never fire, dense and sparse activations, batches out of position order
(a scan sorts a buffer's windows by length), bf16 activations, F a power of two or not, the firing entries found
by update_state or handed in block by block as the encode finds them; the real stories260K activations; and a scan
finding them inside the encode against one finding them after it, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_mcp.index.firing import FiringEntries
from sae_mcp.index.samples import FINE_PER_BIN, MAX_POS, SAMPLES_PER_BIN, pos_hash
from sae_mcp.index.state import HIST_BINS, HIST_LO, HIST_PER_DECADE, ScanState, update_state


def brute(acts: np.ndarray, pos: np.ndarray, k: int) -> dict:
    """acts [N, F] float32 (every batch, stacked), pos [N] -> what the state must hold."""
    n, f = acts.shape
    r, c = np.nonzero(acts > 0)
    v, p = acts[r, c], pos[r]
    top_v, top_p = np.zeros((k, f), np.float32), np.full((k, f), MAX_POS, np.int64)
    order = np.lexsort((p, -v, c))  # by feature, then value desc, then position asc
    c_o = c[order]
    rank = np.arange(len(order)) - np.searchsorted(c_o, c_o)  # rank within its feature
    sel = rank < k
    top_v[rank[sel], c_o[sel]], top_p[rank[sel], c_o[sel]] = v[order][sel], p[order][sel]
    b = np.clip(np.floor((np.log10(v.astype(np.float32)) - HIST_LO) * HIST_PER_DECADE), 0, HIST_BINS - 1).astype(int)
    hist = np.zeros((f, HIST_BINS), np.int64)
    np.add.at(hist, (c, b), 1)
    sb = b // FINE_PER_BIN
    h = pos_hash(torch.from_numpy(p)).numpy()
    order = np.lexsort((h, sb, c))  # by (feature, sample bin), then hash asc
    g = (c * (HIST_BINS // FINE_PER_BIN) + sb)[order]
    rank = np.arange(len(order)) - np.searchsorted(g, g)
    sel = rank < SAMPLES_PER_BIN
    samp = {(int(gg), int(rr)): (int(pp), float(vv)) for gg, rr, pp, vv in zip(g[sel], rank[sel], p[order][sel],
                                                                             v[order][sel])}
    return dict(top_vals=top_v, top_pos=top_p, n_fired=(acts > 0).sum(0), hist=hist, samples=samp)


def check(state: ScanState, ref: dict) -> None:
    np.testing.assert_array_equal(state.top_vals.float().numpy(), ref["top_vals"])
    np.testing.assert_array_equal(state.top_pos.numpy(), ref["top_pos"])
    np.testing.assert_array_equal(state.n_fired.numpy(), ref["n_fired"])
    np.testing.assert_array_equal(state.hist.numpy(), ref["hist"])
    sp, sv = state.samp_pos.reshape(-1, SAMPLES_PER_BIN).numpy(), state.samp_vals.reshape(-1, SAMPLES_PER_BIN).numpy()
    got = {(g, r): (int(sp[g, r]), float(sv[g, r])) for g, r in zip(*np.nonzero(sp != MAX_POS))}
    assert got == ref["samples"]


def fold(batches: list[tuple[torch.Tensor, torch.Tensor]], f: int, k: int, block: int = 0) -> ScanState:
    """The batches folded into an empty state; block > 0: each batch's firing entries handed in as the encode finds
    them (FiringEntries fed `block` rows at a time), else found by update_state."""
    state = ScanState.empty(f, k, "cpu")
    with torch.inference_mode():
        for acts, pos in batches:
            firing = None
            if block:
                found = FiringEntries(f)
                for r0 in range(0, acts.shape[0], block):
                    found.add(acts[r0 : r0 + block], r0)
                firing = found.entries()
            out = update_state(state, acts, pos, firing)
            assert out is state  # in place
    return state


def random_batches(seed: int, n_batches: int, rows: int, f: int, fire: float, distinct: int, dtype=torch.float32):
    """Batches of few distinct values (ties everywhere), a quarter of the features never firing, positions
    disjoint but out of order across batches."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_batches, generator=g)
    silent = torch.randperm(f, generator=g)[: f // 4]
    out = []
    for i in order.tolist():
        v = torch.randint(1, distinct + 1, (rows, f), generator=g).float() * 0.37
        v *= torch.rand(rows, f, generator=g) < fire
        v[:, silent] = 0
        out.append((v.to(dtype).contiguous(), torch.arange(i * rows, (i + 1) * rows) * 3 + 1))
    return out


@pytest.mark.parametrize(("fire", "distinct", "k", "f", "block"),
                         [(0.03, 3, 5, 83, 0), (0.03, 1000, 7, 83, 0), (0.6, 4, 5, 83, 0), (0.3, 50, 12, 83, 0),
                          (0.03, 3, 5, 64, 0), (0.05, 20, 6, 64, 13), (0.05, 20, 6, 83, 13)],
                         ids=["sparse-ties", "sparse-distinct", "dense-ties", "dense-to-sparse", "power-of-two",
                              "encode-found-power-of-two", "encode-found"])
def test_update_state_equals_brute_force_on_random_batches(fire, distinct, k, f, block):
    """F a power of two takes the shifts instead of the division; block: the firing entries handed in."""
    batches = random_batches(0, 9, 61, f, fire, distinct)
    state = fold(batches, f, k, block)
    acts = torch.cat([a for a, _ in batches]).numpy()
    pos = torch.cat([p for _, p in batches]).numpy()
    ref = brute(acts, pos, k)
    assert (ref["n_fired"] == 0).sum() >= f // 4  # features that never fire are in
    check(state, ref)


def test_bf16_activations_fold_like_the_same_values_in_fp32():
    batches = random_batches(1, 5, 40, 64, 0.05, 6, dtype=torch.bfloat16)  # multiples of 0.37 rounded to bf16
    state = fold(batches, 64, 6)
    ref32 = fold([(a.float(), p) for a, p in batches], 64, 6)
    for name in ("top_vals", "top_pos", "n_fired", "hist", "samp_pos", "samp_vals"):
        assert torch.equal(getattr(state, name), getattr(ref32, name)), name


def test_a_snapshot_is_not_changed_by_later_batches():
    batches = random_batches(2, 4, 50, 40, 0.1, 20)
    state = fold(batches[:2], 40, 5)
    snap = state.snapshot()
    before = {n: getattr(snap, n).clone() for n in ("top_vals", "top_pos", "n_fired", "hist", "samp_pos")}
    with torch.inference_mode():
        for acts, pos in batches[2:]:
            update_state(state, acts, pos)
    assert not torch.equal(state.hist, snap.hist)
    for name, t in before.items():
        assert torch.equal(getattr(snap, name), t), name


def test_update_state_equals_brute_force_on_real_stories_activations(stories_engine):
    """The bundled layer-3 SAE's activations on TinyStories windows (bit-identical values recur across documents
    that share their first words), folded in batches as a scan does."""
    from helpers.models import stories_texts

    engine = stories_engine
    (s,) = engine.saes.values()
    tok = engine.model.tokenizer
    windows = []
    for text in stories_texts(40):
        ids = tok(text, add_special_tokens=False)["input_ids"][:63]
        windows.append([1] + ids + [0] * (63 - len(ids)))
    ids = torch.tensor(windows)  # [40, 64]
    with torch.inference_mode():
        acts = engine.encode(s, engine.forward_to_hook(ids, s))[:, 1:].reshape(-1, s.d_sae).contiguous()
    pos = (torch.arange(40)[:, None] * 64 + torch.arange(1, 64)[None]).reshape(-1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    batches = []
    for chunk in perm.split(7):  # batches of windows in shuffled order
        rows = (chunk[:, None] * 63 + torch.arange(63)[None]).reshape(-1)
        batches.append((acts[rows].contiguous(), pos[rows]))
    state = fold(batches, s.d_sae, 10)
    ref = brute(acts.numpy(), pos.numpy(), 10)
    assert (ref["n_fired"] == 0).any() and (ref["n_fired"] > 0).sum() > 100
    check(state, ref)
    check(fold(batches, s.d_sae, 10, block=50), ref)  # the firing entries as the encode hands them


def test_a_scan_finding_the_firing_entries_inside_the_encode_equals_one_finding_them_after(stories_engine,
                                                                                           monkeypatch):
    """The scan's CPU path (the encode in blocks of rows, each block's firing entries found while in cache) against
    the same encode with update_state finding the entries afterwards: every part of the state bit-equal, over
    batches of 8 windows in blocks of 64 rows (the blocked encode against sae-lens': test_fast_encode.py)."""
    from sae_mcp.engine import fast_encode
    from sae_mcp.engine.corpus import iter_windows, resolve_corpus
    from sae_mcp.index import firing
    from sae_mcp.index import scan as scan_mod

    from helpers.models import STORIES_CORPUS

    engine = stories_engine
    (s,) = engine.saes.values()
    windows = []
    for w in iter_windows(resolve_corpus(str(STORIES_CORPUS)), engine.model.tokenizer, 128, 1):
        windows.append(w)
        if len(windows) == 40:
            break

    def run() -> ScanState:
        request = scan_mod.ScanRequest(context_size=128, bos=True, max_tokens=10**6, batch_windows=8)
        return scan_mod.scan(engine, s, iter(windows), request)

    assert fast_encode.can_fuse(s.sae) and s.d_in <= 64  # W_enc [d_in, d_sae] fits in a block of 64 rows
    monkeypatch.setattr(fast_encode, "BLOCK_BYTES", 64 * s.d_sae * 4)
    blocks = []
    monkeypatch.setattr(firing.FiringEntries, "add", lambda self, b, r0, add=firing.FiringEntries.add: (
        blocks.append(b.shape[0]), add(self, b, r0))[1])
    inside = run()
    assert sum(blocks) == inside.tokens and max(blocks) == 64 and len(blocks) > 40  # every row once, in blocks
    monkeypatch.setattr(scan_mod, "encode_firing", lambda engine, sae, x, buf, fidx: (engine.encode(sae, x, buf), None))
    after = run()
    assert inside.tokens == after.tokens > 4000 and int(inside.n_fired.sum()) > 10_000
    for name in ("top_vals", "top_pos", "n_fired", "hist", "samp_pos", "samp_vals"):
        assert torch.equal(getattr(inside, name), getattr(after, name)), name
