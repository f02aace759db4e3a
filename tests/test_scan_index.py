"""The one-pass feature index against a brute-force loop written plainly here (the tutorial's way: every
window through run_with_cache_with_saes, every token's activations kept, then sorted), on the real stories260K
model with a small SAE trained in this session. Plus the exact tie rule, resume, reuse, cancel and keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_mcp.engine.runtime import CancelToken
from sae_mcp.errors import Cancelled
from sae_mcp.index.source import DEFAULT_CONTEXT, ExampleSource
from sae_mcp.index.state import ScanState, update_state
from sae_mcp.index.store import StoredScan
from sae_mcp.index.view import View
from sae_mcp.settings import Settings

from helpers.index import FEATURES, TOKENS, brute_force, plain_top
from helpers.models import STORIES_CORPUS, STORIES_HF, STORIES_HOOK, engine_on, stories_texts
from helpers.servers import stories_settings_at

K = 12


# ------------------------------------------------------------------------------------------- tie rule (unit)


@pytest.mark.parametrize("fire", [0.75, 0.04], ids=["dense-topk-path", "sparse-sort-path"])
def test_update_state_keeps_exactly_the_k_largest_with_ties_by_earlier_position(fire):
    torch.manual_seed(0)
    n_tok, f, k = 300, 7, 5
    # Few distinct values so ties are everywhere; `fire` of the entries non-zero.
    vals = (torch.randint(1, 4, (n_tok, f)).float() * 0.5) * (torch.rand(n_tok, f) < fire)
    state = ScanState.empty(f, k, "cpu")
    for b0 in range(0, n_tok, 37):  # uneven batches
        pos = torch.arange(b0, min(b0 + 37, n_tok))
        with torch.inference_mode():
            state = update_state(state, vals[b0 : b0 + 37].clone(), pos)
    for j in range(f):
        plain = sorted(((float(vals[i, j]), i) for i in range(n_tok)), key=lambda t: (-t[0], t[1]))[:k]
        got = list(zip(state.top_vals[:, j].tolist(), state.top_pos[:, j].tolist()))
        assert got == plain
        assert int(state.n_fired[j]) == int((vals[:, j] > 0).sum())
        # Histogram: 0.5 -> bin (log10(0.5)+4)*8 = 29, 1.0 -> 32, 1.5 -> 33.
        for v, b in ((0.5, 29), (1.0, 32), (1.5, 33)):
            assert int(state.hist[j, b]) == int((vals[:, j] == v).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("chunk", "by_torch"), [(1 << 19, False), (1000, False), (1000, True)],
                         ids=["one-chunk", "chunks", "torch-as-on-a-gpu"])
def test_firing_entries_are_exactly_the_entries_above_zero(dtype, chunk, by_torch, monkeypatch):
    """numpy's compare of the bits, a chunk at a time (chunk edges inside rows), and torch's (the path a GPU
    takes), against the plain `> 0`: +0.0, -0.0, negatives, tiny positives, odd lengths, a strided view; whole or
    handed in blocks of rows as the encode hands them."""
    from sae_mcp.index import firing

    monkeypatch.setattr(firing, "CHUNK", chunk)
    torch.manual_seed(0)
    acts = (torch.randn(301, 67) - 1.5).to(dtype)
    acts[0, 0], acts[0, 1], acts[0, 2], acts[1, 3] = -0.0, 0.0, 1e-30, -1e-30
    for a in (acts, acts[:, :66].contiguous(), acts.relu(), acts[:, 5:9]):
        want = (a.reshape(-1) > 0).nonzero().squeeze(1)
        flat, vals = firing.firing_entries(a, by_torch)
        assert torch.equal(flat, want) and torch.equal(vals, a.reshape(-1)[want])
        found = firing.FiringEntries(a.shape[1], by_torch)
        for r0 in range(0, a.shape[0], 23):  # blocks of rows, the last one short
            found.add(a[r0 : r0 + 23], r0)
        flat, vals = found.entries()
        assert torch.equal(flat, want) and torch.equal(vals, a.reshape(-1)[want])


def test_a_scan_of_nan_activations_is_refused_by_name():
    """NaN activations (broken weights, an overflowing dtype) would read as firing by their bits and land in no
    histogram bin; the update refuses them with a reason instead of an index error, and the state is unchanged."""
    from sae_mcp.index.state import ScanState, update_state

    state = ScanState.empty(8, 3, "cpu")
    acts = torch.zeros(4, 8)
    acts[1, 2], acts[2, 5] = 1.0, float("nan")
    with pytest.raises(ValueError, match="NaN"):
        update_state(state, acts, torch.arange(4))
    assert int(state.n_fired.sum()) == 0 and int(state.hist.sum()) == 0


# ------------------------------------------------------------------------------------------- brute force


@pytest.fixture(scope="module")
def brute(stories_engine):
    return brute_force(stories_engine, TOKENS)


@pytest.fixture
def source(stories_engine, stories_sae_dir, tmp_path):
    return ExampleSource(stories_engine, stories_settings_at(tmp_path, stories_sae_dir))


# ------------------------------------------------------------------------------------------- correctness


def test_index_equals_brute_force_value_location_and_density(stories_engine, source, brute):
    """One window per batch: the same arithmetic as the plain loop, so values and locations (ties included)
    must match exactly. merge_duplicates=False: the raw top-k (test_intervals_index.py checks the merged one)."""
    acts, locs = brute
    rep = source.build_index(None, TOKENS, batch_windows=1)
    assert rep.tokens_scanned == len(locs) and not rep.reused
    for f in FEATURES:
        res = source.top_examples(None, f, View(K, 3, merge=False))
        want = plain_top(acts, locs, f, K)
        assert res.source == "index" and res.tokens_scanned == len(locs)
        assert [(e.document, e.offset) for e in res.examples] == [loc for _, loc in want]
        torch.testing.assert_close(
            torch.tensor([e.activation for e in res.examples]), torch.tensor([v for v, _ in want]), atol=1e-4, rtol=0
        )
        assert res.n_fired == int((acts[:, f] > 0).sum())
        assert res.density == pytest.approx(res.n_fired / len(locs), rel=1e-3)
        assert res.max_activation == pytest.approx(float(acts[:, f].max()), abs=1e-4)


def test_batched_index_matches_brute_force_up_to_float_noise(stories_engine, source, brute):
    """Default batching (64 padded windows): batched matmuls differ from single ones by ~1e-6, so locations
    must match wherever the plain ranking is not a near-tie, and values everywhere."""
    acts, locs = brute
    source.build_index(None, TOKENS)
    dens = source.densities(None)
    torch.testing.assert_close(dens, ((acts > 0).sum(0) / len(locs)).float())
    for f in FEATURES:
        res = source.top_examples(None, f, View(K, 0, merge=False))
        want = plain_top(acts, locs, f, K + 1)
        torch.testing.assert_close(
            torch.tensor([e.activation for e in res.examples]),
            torch.tensor([v for v, _ in want[:K]]),
            atol=1e-4,
            rtol=0,
        )
        for i, e in enumerate(res.examples):
            near = [w for j, w in enumerate(want) if j != i and abs(w[0] - want[i][0]) < 1e-5]
            if not near:
                assert (e.document, e.offset) == want[i][1]
            assert abs(float(acts[locs.index((e.document, e.offset)), f]) - e.activation) < 1e-4


def test_example_tokens_show_the_window_around_the_max_token(stories_engine, source):
    source.build_index(None, 5_000)
    tok = stories_engine.model.tokenizer
    texts = stories_texts(60)
    res = source.top_examples(None, 18, View(5, 4))
    assert res.examples
    for e in res.examples:
        ids = tok(texts[e.document], add_special_tokens=False)["input_ids"]
        start = e.offset - e.offset % 127  # the window holding the max token
        window = [1] + ids[start : start + 127]
        at = e.offset - start + 1
        lo = max(0, at - 4)
        assert e.tokens == stories_engine.str_tokens(torch.tensor(window[lo : at + 5]))
        assert e.position == at - lo


def test_on_demand_scan_of_one_feature_matches_brute_force(stories_engine, source, brute):
    acts, locs = brute
    f = 27
    res = source.top_examples(None, f, View(K, DEFAULT_CONTEXT, merge=False), max_scan_tokens=TOKENS)
    assert res.source == "scan" and res.tokens_scanned == len(locs)
    want = plain_top(acts, locs, f, K)
    torch.testing.assert_close(
        torch.tensor([e.activation for e in res.examples]), torch.tensor([v for v, _ in want]), atol=1e-4, rtol=0
    )
    assert res.n_fired == int((acts[:, f] > 0).sum())
    # Cached: a second call with the same budget scans nothing (no progress reported).
    calls = []
    again = source.top_examples(None, f, View(K, DEFAULT_CONTEXT, merge=False), max_scan_tokens=TOKENS,
                                progress=lambda d, t: calls.append(d))
    assert calls == [] and again == res
    assert source.max_activation(None, f, max_scan_tokens=TOKENS) == (
        pytest.approx(float(acts[:, f].max()), abs=1e-4),
        "scan",
    )
    assert source.feature_summary(None, f) is None and source.densities(None) is None  # index only


# ------------------------------------------------------------------------------------------- resume, keys


def test_rerun_reuses_and_a_larger_budget_resumes_to_the_fresh_result(stories_engine, stories_sae_dir, tmp_path):
    a = ExampleSource(stories_engine, stories_settings_at(tmp_path / "a", stories_sae_dir))
    first = a.build_index(None, 4_000)
    assert not first.reused and a.build_index(None, 4_000).reused
    resumed = a.build_index(None, 9_000)
    assert not resumed.reused and resumed.tokens_scanned >= 9_000
    b = ExampleSource(stories_engine, stories_settings_at(tmp_path / "b", stories_sae_dir))
    fresh = b.build_index(None, 9_000)
    assert fresh.tokens_scanned == resumed.tokens_scanned
    for f in FEATURES[:8]:
        ra, rb = a.top_examples(None, f, View(K, DEFAULT_CONTEXT)), b.top_examples(None, f, View(K, DEFAULT_CONTEXT))
        assert ra.n_fired == rb.n_fired and ra.histogram == rb.histogram
        torch.testing.assert_close(
            torch.tensor([e.activation for e in ra.examples]),
            torch.tensor([e.activation for e in rb.examples]),
            atol=1e-4,
            rtol=0,
        )


def test_cancel_keeps_the_last_whole_buffer_and_a_rerun_resumes_to_the_uninterrupted_index(
        stories_engine, stories_sae_dir, tmp_path, monkeypatch):
    """Batches are scanned longest first within a buffer, so only a whole buffer is a prefix of the corpus: a
    cancel mid-buffer keeps the state at the last buffer's end, and the rerun ends exactly where a run without
    the cancel ends."""
    from sae_mcp.index import scan as scan_mod

    monkeypatch.setattr(scan_mod, "BUFFER_BATCHES", 2)  # buffers of 2 batches x 16 windows
    src = ExampleSource(stories_engine, stories_settings_at(tmp_path / "a", stories_sae_dir))
    cancel = CancelToken()
    seen = []

    def progress(done, total):
        seen.append(done)
        if len(seen) == 3:  # the first batch of the second buffer is in
            cancel.cancel()

    with pytest.raises(Cancelled):
        src.build_index(None, 20_000, progress=progress, cancel=cancel, batch_windows=16)
    row = src.index_store(stories_engine.sae(None)).load_scan("index")
    assert row.tokens == seen[1] and row.windows == 32 and not row.exhausted  # the first buffer, whole
    rep = src.build_index(None, 20_000, batch_windows=16)
    assert not rep.reused and rep.tokens_scanned >= 20_000
    whole = ExampleSource(stories_engine, stories_settings_at(tmp_path / "b", stories_sae_dir))
    assert whole.build_index(None, 20_000, batch_windows=16).tokens_scanned == rep.tokens_scanned
    a = src.index_store(stories_engine.sae(None)).load_scan("index")
    b = whole.index_store(stories_engine.sae(None)).load_scan("index")
    for name in ("top_vals", "top_pos", "n_fired", "hist", "samp_pos", "samp_vals"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_a_different_corpus_makes_a_separate_index(stories_engine, stories_sae_dir, tmp_path):
    txt = tmp_path / "few.txt"
    txt.write_text("\n".join(t.replace("\n", " ") for t in stories_texts(30)) + "\n", encoding="utf-8")
    a = ExampleSource(stories_engine, stories_settings_at(tmp_path / "d", stories_sae_dir))
    b = ExampleSource(stories_engine, stories_settings_at(tmp_path / "d", stories_sae_dir, corpus=str(txt)))
    ra = a.build_index(None, 3_000)
    rb = b.build_index(None, 10**9)
    assert ra.path != rb.path and rb.exhausted and not rb.reused
    assert a.build_index(None, 3_000).reused


def test_cli_index_prints_a_report_and_reuses_on_rerun(stories_sae_dir, tmp_path, capsys):
    from sae_mcp.cli import main

    argv = ["index", "--model", str(STORIES_HF), "--sae", str(stories_sae_dir), "--corpus", str(STORIES_CORPUS),
            "--data-dir", str(tmp_path), "--tokens", "3000", "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv) == 0
    out = capsys.readouterr()
    second = json.loads(out.out.strip().splitlines()[-1])
    assert first["tokens_scanned"] >= 3000 and not first["reused"] and second["reused"]
    assert f"index {STORIES_HOOK}" in out.err  # the progress bar is on stderr
    assert np.isfinite(first["tokens_per_second"])


# ------------------------------------------------------------------------------------------- weights identity


def test_an_sae_retrained_into_the_same_folder_never_gets_the_old_index(tiny_loaded, tmp_path):
    from helpers.models import make_sae_folder

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the cat sat on the mat and Lily saw it", "Tom ran to the park with a red ball",
                                 "one day the little girl played"] * 20) + "\n", encoding="utf-8")
    folder = make_sae_folder(tmp_path / "sae", 32, 128, "blocks.1.hook_resid_pre", seed=0)
    st = Settings(model="tiny", saes=(str(folder),), corpus=str(corpus), data_dir=tmp_path / "data")

    old_engine = engine_on(tiny_loaded, folder)
    old = ExampleSource(old_engine, st)
    old.build_index(None, 10**6)
    old_dens = old.densities(None)
    assert old_dens is not None

    make_sae_folder(folder, 32, 128, "blocks.1.hook_resid_pre", seed=1)  # re-trained: same folder, new weights
    new = ExampleSource(engine_on(tiny_loaded, folder), st)  # a restart
    assert new.engine.sae(None).weights_id != old_engine.sae(None).weights_id
    assert new.densities(None) is None and new.feature_summary(None, 0) is None
    rep = new.build_index(None, 10**6)
    assert not rep.reused
    # The new index holds the new weights' activations: firing counts from a plain forward over the same tokens.
    s = new.engine.sae(None)
    tok = tiny_loaded.model.tokenizer
    fired, n = torch.zeros(128), 0
    for line in corpus.read_text().splitlines():
        ids = [1] + tok(line, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            _, cache = tiny_loaded.model.run_with_cache_with_saes(torch.tensor([ids]), saes=[s.sae])
        acts = cache[f"{s.hook_name}.hook_sae_acts_post"][0, 1:]
        fired += (acts > 0).sum(0)
        n += acts.shape[0]
    torch.testing.assert_close(new.densities(None), (fired / n).float())
    assert not torch.equal(new.densities(None), old_dens)

    make_sae_folder(folder, 32, 128, "blocks.1.hook_resid_pre", seed=0)  # the original weights again
    back = ExampleSource(engine_on(tiny_loaded, folder), st)
    assert back.engine.sae(None).weights_id == old_engine.sae(None).weights_id
    assert back.build_index(None, 10**6).reused
    torch.testing.assert_close(back.densities(None), old_dens)


def zero_row(tokens: int, compute_dtype: str | None = None) -> StoredScan:
    """An 'index' row of 8 features, k 2, all zero, over `tokens` tokens in one window."""
    return StoredScan("index", tokens=tokens, windows=1, exhausted=False, target=tokens, updated=0.0,
                      top_vals=np.zeros((2, 8), np.float32), top_pos=np.zeros((2, 8), np.int64),
                      n_fired=np.zeros(8, np.int64), hist=np.zeros((8, 4), np.int64), compute_dtype=compute_dtype)


def test_a_pretrained_sae_keeps_an_index_written_before_weights_were_recorded(tmp_path):
    from sae_mcp.index.store import IndexStore, meta_for

    pre = meta_for("gpt2-small", "rel/id", "/c.txt", "1-2", 128, 50256, 8, weights_id="rel/id")
    legacy = {k: v for k, v in pre.items() if k != "weights"}
    st = IndexStore(tmp_path / "a.sqlite", legacy)
    st.save_scan(zero_row(tokens=5))
    st.close()
    assert IndexStore(tmp_path / "a.sqlite", pre).load_scan("index").tokens == 5  # kept, meta now records weights
    local = meta_for("gpt2-small", "/sae", "/c.txt", "1-2", 128, 50256, 8, weights_id="0123abcd")
    st = IndexStore(tmp_path / "b.sqlite", {k: v for k, v in local.items() if k != "weights"})
    st.save_scan(zero_row(tokens=5))
    st.close()
    assert IndexStore(tmp_path / "b.sqlite", local).load_scan("index") is None  # unknown weights: emptied


# ------------------------------------------------------------------------------------------- compute dtype


def _tiny_corpus(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the cat sat on the mat and Lily saw it", "Tom ran to the park with a red ball"] * 10)
                      + "\n", encoding="utf-8")
    return corpus


def test_cpu_scans_record_and_report_float32_compute_dtype(tiny_engine, tiny_sae_dir, tmp_path):
    """The index and on-demand scans record the precision they computed in; results report it."""
    st = Settings(model="tiny", saes=(str(tiny_sae_dir),), corpus=str(_tiny_corpus(tmp_path)), data_dir=tmp_path / "d")
    src = ExampleSource(tiny_engine, st)
    scanned = src.top_examples(None, 4, View(2, DEFAULT_CONTEXT), max_scan_tokens=100)
    assert scanned.source == "scan" and scanned.compute_dtype == "float32"
    src.build_index(None, 10**6)
    s = tiny_engine.sae(None)
    assert src.index_store(s).load_scan("index").compute_dtype == "float32"
    assert src.index_store(s).load_scan("feature:4").compute_dtype == "float32"
    assert src.top_examples(None, 4, View(2, DEFAULT_CONTEXT)).compute_dtype == "float32"
    assert src.feature_summary(None, 4).compute_dtype == "float32"


def test_compute_dtype_names_the_cuda_autocast_precision(monkeypatch):
    from types import SimpleNamespace

    from sae_mcp.index import scan as scan_mod

    sae = SimpleNamespace(sae=torch.nn.Linear(2, 2))  # float32 parameters
    cpu = SimpleNamespace(device="cpu", model=SimpleNamespace(cfg=SimpleNamespace(dtype=torch.float32)))
    cuda = SimpleNamespace(device="cuda:0", model=cpu.model)
    assert scan_mod.compute_dtype(cpu, sae) == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert scan_mod.compute_dtype(cuda, sae) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert scan_mod.compute_dtype(cuda, sae) == "float16"
    half = SimpleNamespace(device="cpu", model=SimpleNamespace(cfg=SimpleNamespace(dtype=torch.bfloat16)))
    assert scan_mod.compute_dtype(half, sae) == "bfloat16 (model), float32 (SAE)"


def test_an_index_file_from_before_compute_dtype_opens_and_reports_none(tmp_path):
    import sqlite3

    from sae_mcp.index.store import IndexStore, meta_for

    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE windows (id INTEGER PRIMARY KEY, document INTEGER NOT NULL, start INTEGER NOT NULL,"
        " tokens BLOB NOT NULL);"
        "CREATE TABLE scans (name TEXT PRIMARY KEY, n_features INTEGER NOT NULL, k INTEGER NOT NULL,"
        " tokens INTEGER NOT NULL,"
        " windows INTEGER NOT NULL, exhausted INTEGER NOT NULL, target INTEGER NOT NULL, updated REAL NOT NULL,"
        " top_vals BLOB, top_pos BLOB, n_fired BLOB, hist BLOB);"
    )
    z = lambda shape, dt: np.zeros(shape, dt).tobytes()  # noqa: E731
    con.execute("INSERT INTO scans VALUES ('index', 8, 2, 5, 1, 0, 5, 1.0, ?, ?, ?, ?)",
                (z((2, 8), np.float32), z((2, 8), np.int64), z(8, np.int64), z((8, 4), np.int64)))
    meta = meta_for("m", "s", "/c.txt", "1-2", 128, 1, 8)
    con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
    con.commit()
    con.close()
    st = IndexStore(path, meta)
    row = st.load_scan("index")
    assert row.tokens == 5 and row.compute_dtype is None
    st.save_scan(zero_row(tokens=6, compute_dtype="bfloat16"))
    assert st.load_scan("index").compute_dtype == "bfloat16"


def test_read_ahead_keeps_order_raises_reader_errors_and_stops_when_abandoned():
    import threading
    import time

    from sae_mcp.index.scan import _read_ahead

    assert list(_read_ahead(iter([[1], [2], [3]]))) == [[1], [2], [3]]

    def broken():
        yield [1]
        raise ValueError("corpus line 7 is not JSON")

    got = []
    with pytest.raises(ValueError, match="line 7"):
        for b in _read_ahead(broken()):
            got.append(b)
    assert got == [[1]]

    reads = []

    def endless():
        i = 0
        while True:
            reads.append(i)
            yield [i]
            i += 1

    it = _read_ahead(endless())
    assert next(it) == [0]
    it.close()  # what a `break` out of the scan's loop does
    deadline = time.time() + 60  # a hang guard, not a speed goal: the reader checks for a stop every 0.1 s
    while any(t.name == "scan-read-ahead" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "scan-read-ahead" for t in threading.enumerate())
    assert len(reads) <= 4  # read ahead by a bounded amount, not to the end of an endless corpus


def test_windows_read_while_another_thread_tokenizes_prompts_are_the_corpus_windows(tiny_engine, tmp_path):
    """A fast tokenizer holds padding as state set by each call: transformer-lens' to_tokens (padding=True) on a tool
    thread while a batch of documents is encoded must not pad the documents. Here another thread keeps turning
    padding on in the model's shared tokenizer (what each to_tokens call does first) while the corpus is read
    through the engine's corpus tokenizer, as every scan reads it. With the shared one, 1-8 of 30 passes were
    corrupted."""
    import sys
    import threading

    from sae_mcp.engine.corpus import iter_windows, resolve_corpus

    tok = tiny_engine.model.tokenizer
    assert tiny_engine.corpus_tokenizer is not tok
    words = "the cat sat on the mat and the dog ran to the park".split()
    docs = [" ".join(words[: 1 + i % len(words)] * (1 + i % 5)) for i in range(1600)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    src = resolve_corpus(str(path))
    step = 15  # context 16 with BOS
    want = [(d, s, [1] + ids[s : s + step]) for d, text in enumerate(docs)
            for ids in [tok(text, add_special_tokens=False)["input_ids"]] for s in range(0, len(ids), step)]

    stop = threading.Event()

    def tool_thread():
        while not stop.is_set():
            try:
                tok._tokenizer.enable_padding(pad_id=0, pad_token="<unk>")  # as to_tokens(padding=True) leaves it
            except RuntimeError:  # 'Already borrowed': the tokenizer is encoding on the other thread
                pass

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns every few bytecodes: the race is hit, not waited for
    t = threading.Thread(target=tool_thread, daemon=True)
    t.start()
    try:
        got = [[(w.document, w.start, w.ids) for w in iter_windows(src, tiny_engine.corpus_tokenizer, 16, 1)]
               for _ in range(30)]
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(switch)
        tok._tokenizer.no_padding()  # the shared engine's tokenizer as the next test expects it
    assert sum(g != want for g in got) == 0
