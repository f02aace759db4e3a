"""Interval samples and merged contexts of a real stories260K index (and of the on-demand one-feature scan) against
the brute-force loop of helpers/index.py (the tutorial's way: every window through run_with_cache_with_saes),
plus an index file from before interval samples (format 1): it opens, answers with a warning, and is rebuilt."""

from __future__ import annotations

import math
import sqlite3

import pytest

from sae_mcp.index.source import DEFAULT_CONTEXT, ExampleSource
from sae_mcp.index.view import View

from helpers.index import FEATURES, TOKENS, brute_force, make_format_1, plain_hash, plain_top
from helpers.models import stories_texts
from helpers.servers import stories_settings_at

LENGTH = 128  # window: BOS + 127 document tokens


@pytest.fixture(scope="module")
def plain(stories_engine):
    """The brute-force pass: acts [N, d_sae], locs [(document, offset)], each token's global position
    (window index * 128 + position in window, windows counted plainly) and each document's token ids."""
    acts, locs = brute_force(stories_engine, TOKENS)
    tok = stories_engine.model.tokenizer
    ids, first_window, w = {}, {}, 0
    for d, text in enumerate(stories_texts()):
        if d > locs[-1][0]:
            break
        ids[d] = tok(text, add_special_tokens=False)["input_ids"]
        first_window[d] = w
        w += math.ceil(len(ids[d]) / (LENGTH - 1))
    gpos = [(first_window[d] + o // (LENGTH - 1)) * LENGTH + o % (LENGTH - 1) + 1 for d, o in locs]
    return acts, locs, gpos, ids


@pytest.fixture(scope="module")
def indexed(stories_engine, stories_sae_dir, tmp_path_factory):
    """One window per batch: the plain loop's arithmetic, so locations match it exactly."""
    src = ExampleSource(stories_engine, stories_settings_at(tmp_path_factory.mktemp("iv"), stories_sae_dir))
    src.build_index(None, TOKENS, batch_windows=1)
    return src


def shown_key(ids, loc, context):
    """What an example shows, computed plainly from the document's tokens: its window's tokens around the max token
    and the max token's place in them."""
    d, o = loc
    start = o - o % (LENGTH - 1)
    window = [1] + ids[d][start : start + LENGTH - 1]
    at = o - start + 1
    lo = max(0, at - context)
    return tuple(window[lo : at + context + 1]), at - lo


def test_the_top_list_shows_each_identical_context_once_with_its_count(plain, indexed):
    acts, locs, _, ids = plain
    k, context, merged_somewhere = 12, 3, 0
    for f in FEATURES:
        res = indexed.top_examples(None, f, View(k, context))
        cands = plain_top(acts, locs, f, 50)  # what the index keeps: the top 50
        firsts, counts = [], {}
        for _, loc in cands:
            key = shown_key(ids, loc, context)
            if key not in counts:
                firsts.append((loc, key))
            counts[key] = counts.get(key, 0) + 1
        want = [(loc[0], loc[1], counts[key]) for loc, key in firsts[:k]]
        assert [(e.document, e.offset, e.count or 1) for e in res.examples] == want, f
        assert (res.merged_duplicates or 0) == sum(c - 1 for *_, c in want)
        assert all(e.count is None or e.count > 1 for e in res.examples)
        few = len(want) < k and len(cands) > len(want)
        assert few == any("distinct contexts" in w for w in res.warnings or []), f
        # merged on the shown tokens only: the warning names the context width, which may be all they share
        assert few == any(f"{context} tokens each side are too few" in w for w in res.warnings or []), f
        merged_somewhere += res.merged_duplicates or 0
    assert merged_somewhere > 0  # TinyStories repeats its openings: the merge was exercised


def check_intervals(res, acts, locs, gpos, f, per_interval):
    """Bands of the result against the brute-force activations of feature f; -> bands whose sample was checked
    exactly against the plain bottom-S by hash (those with no activation within float noise of an edge)."""
    col = acts[:, f].tolist()
    fired = [(a, i) for i, a in enumerate(col) if a > 0]
    assert res.intervals and sum(b.tokens for b in res.intervals) == res.n_fired == len(fired)
    assert [b.upper for b in res.intervals] == sorted((b.upper for b in res.intervals), reverse=True)
    assert res.intervals[0].upper == pytest.approx(max(col), abs=1e-4) and res.intervals[0].quantiles[1] == 1.0
    assert res.intervals[-1].quantiles[0] == 0.0
    exact = 0
    for i, band in enumerate(res.intervals):
        top = i == 0
        inside = [(a, j) for a, j in fired if band.lower <= a and (a <= band.upper if top else a < band.upper)]
        near = [a for a, _ in fired for edge in (band.lower, band.upper) if abs(a - edge) <= 1e-3 * edge]
        assert abs(len(inside) - band.tokens) <= len(near), (f, band)
        assert 1 <= len(band.examples) <= min(per_interval, band.tokens)
        for e in band.examples:
            a = col[locs.index((e.document, e.offset))]
            assert band.lower * (1 - 1e-3) <= a <= band.upper * (1 + 1e-3)
            assert e.activation == pytest.approx(a, rel=1e-3, abs=1e-6)
        if not near and not top:
            want = sorted(inside, key=lambda t: plain_hash(gpos[t[1]]))[:per_interval]
            assert sorted((e.document, e.offset) for e in band.examples) == sorted(locs[j] for _, j in want)
            exact += 1
    return exact


def test_interval_samples_lie_in_their_bands_count_their_tokens_and_are_the_bottom_s_by_hash(plain, indexed):
    acts, locs, gpos, _ = plain
    # The helper's global positions are the scan's: the index's top position of a feature is the plain one's.
    row = indexed.index_store(indexed.engine.sae(None)).load_scan("index")
    for f in FEATURES[:5]:
        if row.n_fired[f]:
            assert gpos[locs.index(plain_top(acts, locs, f, 1)[0][1])] == int(row.top_pos[0, f])
    exact = 0
    for f in FEATURES:
        res = indexed.top_examples(None, f, View(1, DEFAULT_CONTEXT, 8, 4, merge=False))
        if res.n_fired == 0:
            assert res.intervals == [] and any("never fired" in w for w in res.warnings)
            continue
        assert 1 <= len(res.intervals) <= 8
        exact += check_intervals(res, acts, locs, gpos, f, 4)
    assert exact >= 40  # most bands had no activation within float noise of an edge


def test_the_on_demand_scan_of_one_feature_gives_the_same_intervals(plain, stories_engine, stories_sae_dir,
                                                                    tmp_path, indexed):
    acts, locs, gpos, _ = plain
    src = ExampleSource(stories_engine, stories_settings_at(tmp_path, stories_sae_dir))
    for f in (27, 45):
        res = src.top_examples(None, f, View(3, DEFAULT_CONTEXT, 5, 4, merge=False), max_scan_tokens=TOKENS)
        assert res.source == "scan" and res.tokens_scanned == len(locs)
        check_intervals(res, acts, locs, gpos, f, 4)
        ix = indexed.top_examples(None, f, View(3, DEFAULT_CONTEXT, 5, 4, merge=False))
        assert [(b.lower, b.tokens, [(e.document, e.offset) for e in b.examples]) for b in res.intervals] == [
            (b.lower, b.tokens, [(e.document, e.offset) for e in b.examples]) for b in ix.intervals]


def test_an_index_from_before_interval_samples_answers_with_a_warning_and_build_index_rebuilds_it(
        stories_engine, stories_sae_dir, tmp_path):
    first = ExampleSource(stories_engine, stories_settings_at(tmp_path, stories_sae_dir))
    rep = first.build_index(None, 3_000)
    before = first.top_examples(None, 9, View(5, DEFAULT_CONTEXT))
    first.index_store(stories_engine.sae(None)).close()
    make_format_1(rep.path)

    old = ExampleSource(stories_engine, stories_settings_at(tmp_path, stories_sae_dir))  # a restart with the old file
    res = old.top_examples(None, 9, View(5, DEFAULT_CONTEXT, 4))
    assert res.source == "index" and res.intervals is None and res.examples == before.examples
    (warning,) = res.warnings
    assert "before interval samples" in warning and "build_index" in warning
    assert old.top_examples(None, 9, View(5, DEFAULT_CONTEXT)).warnings is None  # no intervals asked: nothing missing

    again = old.build_index(None, 3_000)  # rebuilt from the start, not reused
    assert not again.reused and again.tokens_scanned == rep.tokens_scanned
    res = old.top_examples(None, 9, View(5, DEFAULT_CONTEXT, 4))
    assert res.intervals and res.warnings is None and res.examples == before.examples
    meta = dict(sqlite3.connect(rep.path).execute("SELECT key, value FROM meta").fetchall())
    assert meta["format"] == "2"


def test_an_on_demand_scan_stored_before_samples_answers_with_a_warning_and_is_rescanned(tiny_engine, tiny_sae_dir,
                                                                                          tmp_path):
    from sae_mcp.settings import Settings

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the cat sat on the mat and Lily saw it", "Tom ran to the park with a red ball",
                                 "one day the little girl played with the big dog"] * 8) + "\n", encoding="utf-8")
    st = Settings(model="tiny", saes=(str(tiny_sae_dir),), corpus=str(corpus), data_dir=tmp_path / "d")
    src = ExampleSource(tiny_engine, st)
    first = src.top_examples(None, 4, View(3, DEFAULT_CONTEXT, 3), max_scan_tokens=300)
    assert first.source == "scan" and first.intervals and first.warnings is None
    store = src.index_store(tiny_engine.sae(None))
    store.close()
    make_format_1(store.path)

    old = ExampleSource(tiny_engine, st)
    cached = old.cached_top_examples(None, 4, k=3, intervals=3)  # never scans: answers without intervals
    assert cached.intervals is None and cached.examples == first.examples
    assert "before interval samples" in cached.warnings[0]
    seen = []
    again = old.top_examples(None, 4, View(3, DEFAULT_CONTEXT, 3), max_scan_tokens=300,
                             progress=lambda d, t: seen.append(d))
    assert seen and again == first  # rescanned from the start, with samples: the same answer as the first scan
