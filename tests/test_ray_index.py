"""`sae-mcp index --ray`: the state merge against one scan (synthetic, no Ray), the walk and cursors against
corpus.iter_windows, shard plans; then, on a local Ray cluster with 2 CPU workers and the real stories260K model,
the sharded index against a single process's, byte for byte: after a clean build, after a worker killed mid-shard,
and after the driver was interrupted and rerun. Ray tests skip with a reason when ray (the extra) is absent."""

from __future__ import annotations

import itertools
import logging
import sqlite3
from pathlib import Path

import pytest
import torch

from sae_mcp.index import ray_driver as ray_index
from sae_mcp.index.merge import merge_all, merge_states
from sae_mcp.index.ray_worker import Cursor, FailAfter, Walk, walk, windows_at
from sae_mcp.index.shards import Shard, batch_for, plan_shards, reuse_shards
from sae_mcp.index.state import ScanState, update_state
from sae_mcp.index.store import StoredScan

from helpers.models import STORIES_CORPUS, STORIES_HF, STORIES_HOOK
from helpers.servers import stories_settings_at

TOKENS = 20_000  # 196 windows (documents end mid-window)
BATCH = 2  # windows a batch: buffers (the shards' unit) of 32 * 2 = 64 windows, so 4 buffers, 2 shards of 2
FIELDS = ("top_vals", "top_pos", "n_fired", "hist", "samp_pos", "samp_vals")


# ------------------------------------------------------------------------------------- merge (unit, no Ray)


def synthetic_scan(vals: torch.Tensor, pos: torch.Tensor, rows: range, batch: int, k: int) -> ScanState:
    """update_state over rows[...] in batches of `batch` (what one worker's scan does with a shard)."""
    state = ScanState.empty(vals.shape[1], k, "cpu")
    for b0 in range(rows.start, rows.stop, batch):
        b1 = min(b0 + batch, rows.stop)
        with torch.inference_mode():
            state = update_state(state, vals[b0:b1].clone(), pos[b0:b1])
    state.tokens = len(rows)
    return state


def assert_same_state(a: ScanState, b: ScanState) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.tokens == b.tokens


@pytest.mark.parametrize("fire", [0.75, 0.04], ids=["dense-topk-path", "sparse-sort-path"])
def test_merged_shard_states_equal_one_scan_exactly_in_any_grouping(fire):
    """Ties everywhere (5 values over 4 decades, so several sample bins hold more than S entries); shards scanned
    with other batch sizes than the single scan; merged in two groupings and two orders."""
    torch.manual_seed(0)
    n_tok, f, k = 900, 11, 6
    levels = torch.tensor([0.002, 0.5, 1.0, 3.0, 40.0])
    vals = levels[torch.randint(0, 5, (n_tok, f))] * (torch.rand(n_tok, f) < fire)
    pos = torch.arange(n_tok) * 3 + 7  # global positions need not be contiguous
    whole = synthetic_scan(vals, pos, range(n_tok), 37, k)
    a, b, c = (synthetic_scan(vals, pos, r, bs, k) for r, bs in
               ((range(0, 250), 23), (range(250, 610), 50), (range(610, n_tok), 41)))
    assert_same_state(merge_all([a, b, c]), whole)
    assert_same_state(merge_states(c, merge_states(b, a)), whole)  # commutative and associative
    assert_same_state(merge_states(ScanState.empty(f, k, "cpu"), whole), whole)  # empty is the identity


def test_merge_refuses_states_of_different_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        merge_states(ScanState.empty(4, 3, "cpu"), ScanState.empty(5, 3, "cpu"))


# ------------------------------------------------------------------------------------- walk and plans


@pytest.mark.parametrize("start,budget", [(0, TOKENS), (70, 9_000), (0, 10**9)], ids=["fresh", "resumed", "all"])
def test_walk_cursors_and_windows_at_follow_iter_windows(stories_loaded, start, budget):
    """The walk reads the windows scan._buffers takes (stop once the budget is reached), and from each cursor
    windows_at gives what iter_windows gives after skipping, numbering included."""
    from sae_mcp.engine.corpus import iter_windows, resolve_corpus

    tok, src = stories_loaded.model.tokenizer, resolve_corpus(str(STORIES_CORPUS))
    w = walk(src, tok, 128, 1, start, budget, 64)
    taken, seen = [], 0
    for win in iter_windows(src, tok, 128, 1, skip_windows=start):
        if seen >= budget:
            break
        taken.append(win)
        seen += len(win.ids) - 1
    assert (w.start, w.end, w.tokens, w.exhausted) == (start, start + len(taken), seen, seen < budget)
    assert [c.window for c in w.cursors[:-1]] == [x.index for x in taken[::64]]
    for c in w.cursors[:-1]:
        assert c.tokens == sum(len(x.ids) - 1 for x in taken[: c.window - start])
        first = min(c.window + 5, w.end - 1)
        got = list(itertools.islice(windows_at(src, tok, 128, 1, c, first), 40))
        assert got == list(itertools.islice(iter_windows(src, tok, 128, 1, skip_windows=first), 40))
        assert w.at(first) == c


def test_shard_plans_tile_the_walk_and_stored_rows_are_reused_when_they_fit_it():
    cursors = tuple(Cursor(w, 0, 0, t) for w, t in ((10, 0), (74, 900), (138, 1700), (202, 2600), (230, 3000)))
    wk = Walk(cursors, exhausted=False)
    for n in (1, 2, 3, 4, 9):
        shards = plan_shards(wk, n)
        assert len(shards) == min(n, 4) and shards[0].start == 10 and shards[-1].end == 230
        assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
        assert sum(s.target for s in shards) == 3000
    two = plan_shards(wk, 2)
    assert [(s.start, s.end) for s in two] == [(10, 138), (138, 230)]

    # No --batch-windows: the largest batch (<= what memory allows) whose buffers the shards share evenly.
    fine = Walk(tuple(Cursor(32 * i, 0, 0, 3200 * i) for i in range(312)) + (Cursor(9984, -1, 0, 998_400),), False)
    assert batch_for(fine, 2, 64) == 57  # 6 buffers of 57 * 32 windows, 3 a shard (5 of 64 * 32 would split 3:2)
    assert batch_for(fine, 1, 64) == 64 and batch_for(fine, 2, 16) == 16 and batch_for(fine, 400, 64) == 1
    for n in (2, 3, 8):
        sizes = [s.target for s in plan_shards(fine.every(batch_for(fine, n, 64)), n)]
        assert len(sizes) == n and max(sizes) <= 1.1 * sum(sizes) / n

    def row(s: Shard, windows: int) -> StoredScan:
        return StoredScan(s.name, 0, windows, False, s.target, 0.0, None, None, None, None)

    rows = [row(two[1], 150), row(two[0], 138)]
    got = reuse_shards(rows, wk)
    assert [(s.name, s.done, s.resume) for s in got] == [(two[0].name, True, 138), (two[1].name, False, 150)]
    # A shard stopped before its first checkpoint has no row: its range is scanned as a shard of its own.
    got = reuse_shards(rows[:1], wk)
    assert [(s.start, s.end, s.target, s.row is None) for s in got] == [(10, 138, 1700, True), (138, 230, 1300, False)]
    assert got[0].name != got[1].name
    assert reuse_shards(rows, Walk(cursors[:-1] + (Cursor(260, 0, 0, 3300),), False)) is None  # another budget
    assert reuse_shards([row(Shard(0, 10, 74, 901), 10)], wk) is None  # other tokens: another corpus or start


# ------------------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'sae-mcp[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def settings_for(sae_dir, data_dir):

    return stories_settings_at(data_dir, sae_dir, device="cpu")


@pytest.fixture(scope="module")
def single(stories_sae_dir, tmp_path_factory):
    """The single-process index (built as `sae-mcp index` builds it: Engine.from_settings, as the workers do)."""
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.index.source import ExampleSource

    st = settings_for(stories_sae_dir, tmp_path_factory.mktemp("single"))
    return ExampleSource(Engine.from_settings(st), st).build_index(None, TOKENS, batch_windows=BATCH)


def dump(path: str) -> tuple[list, list]:
    """Every scan row (all but its timestamp) and every window, as stored."""
    conn = sqlite3.connect(path)
    cols = "name, n_features, k, tokens, windows, exhausted, target, top_vals, top_pos, n_fired, hist, " \
           "compute_dtype, samp_pos, samp_vals, samp_bins"
    scans = conn.execute(f"SELECT {cols} FROM scans ORDER BY name").fetchall()
    windows = conn.execute("SELECT * FROM windows ORDER BY id").fetchall()
    conn.close()
    return scans, windows


def assert_same_index(ray_report, single_report) -> None:
    scans, windows = dump(ray_report.path)
    want_scans, want_windows = dump(single_report.path)
    assert [s[0] for s in scans] == ["index"]  # the shard rows are gone
    assert scans == want_scans and windows == want_windows
    assert (ray_report.tokens_scanned, ray_report.windows) == (single_report.tokens_scanned, single_report.windows)


def test_two_workers_build_the_single_process_index_byte_for_byte(ray_cluster, stories_sae_dir, single, tmp_path):
    seen = []
    with ray_index.RayIndexer(settings_for(stories_sae_dir, tmp_path), workers=2, checkpoint_s=0.0) as ix:
        rep = ix.build_index(None, TOKENS, batch_windows=BATCH, progress=lambda d, t: seen.append((d, t)))
        assert not rep.reused and ix.build_index(None, TOKENS, batch_windows=BATCH).reused
    assert_same_index(rep, single)
    assert seen[-1] == (TOKENS, TOKENS) and all(d <= TOKENS for d, _ in seen)


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_worker_failing_mid_shard_is_retried_and_the_index_still_equals(ray_cluster, stories_sae_dir, single,
                                                                          tmp_path, how):
    """After 40 batches (past its first checkpoint: a buffer is 32 batches) one worker dies (os._exit) or raises;
    its shard reruns from that checkpoint, on a new worker or the same one, and nothing is counted twice."""
    fault = FailAfter(40, str(tmp_path / "failed-once"), how)
    with ray_index.RayIndexer(settings_for(stories_sae_dir, tmp_path), workers=2, checkpoint_s=0.0,
                              fault=fault) as ix:
        rep = ix.build_index(None, TOKENS, batch_windows=BATCH)
        assert ix.retries == 1
    assert (tmp_path / "failed-once").exists()
    assert_same_index(rep, single)


def test_an_interrupted_driver_resumes_its_shards_to_the_same_index(ray_cluster, stories_sae_dir, single, tmp_path,
                                                                   monkeypatch):
    """One worker, two shards, cancelled right after the first checkpoint: shard 0 has a row, shard 1 none, and no
    'index' row is written. A rerun with 2 workers resumes shard 0 from its row (its progress starts there), scans
    shard 1 afresh, and ends at the single-process index."""
    from sae_mcp.engine.runtime import CancelToken
    from sae_mcp.errors import Cancelled

    cancel, saved = CancelToken(), []
    real_save = ray_index.save_row

    def save_then_cancel(index, name, row):
        real_save(index, name, row)
        saved.append(name)
        cancel.cancel()

    monkeypatch.setattr(ray_index, "save_row", save_then_cancel)
    st = settings_for(stories_sae_dir, tmp_path)
    with ray_index.RayIndexer(st, workers=1, shards=2, checkpoint_s=0.0) as ix, pytest.raises(Cancelled):
        ix.build_index(None, TOKENS, batch_windows=BATCH, cancel=cancel)
    scans, _ = dump(str(tmp_path.joinpath(*Path(single.path).parts[-4:])))  # index/<model>/<sae>/<corpus>
    assert [s[0] for s in scans] == saved and len(saved) == 1 and saved[0].startswith("index/shard-0:0-")
    kept = scans[0][3]
    assert 0 < kept < single.tokens_scanned / 2
    monkeypatch.setattr(ray_index, "save_row", real_save)
    seen = []
    with ray_index.RayIndexer(st, workers=2, checkpoint_s=0.0) as ix:
        rep = ix.build_index(None, TOKENS, batch_windows=BATCH, progress=lambda d, t: seen.append(d))
    assert seen[0] >= kept
    assert_same_index(rep, single)


def test_an_index_row_is_extended_as_a_single_process_extends_it(ray_cluster, stories_sae_dir, tmp_path):
    """A 12k-token index (one process) taken to 20k by Ray equals the same extension by one process: both resume
    at the row's window (mid-buffer of a fresh 20k scan, so it is compared with that extension)."""
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.index.source import ExampleSource

    st_a, st_b = settings_for(stories_sae_dir, tmp_path / "a"), settings_for(stories_sae_dir, tmp_path / "b")
    engine = Engine.from_settings(st_a)
    a, b = ExampleSource(engine, st_a), ExampleSource(engine, st_b)
    for src in (a, b):
        src.build_index(None, 12_000, batch_windows=BATCH)
    want = a.build_index(None, TOKENS, batch_windows=BATCH)
    with ray_index.RayIndexer(st_b, workers=2, checkpoint_s=0.0) as ix:
        got = ix.build_index(None, TOKENS, batch_windows=BATCH)
    assert not got.reused and dump(got.path) == dump(want.path)


def test_cli_index_ray_prints_the_report_and_reuses_on_rerun(ray_cluster, stories_sae_dir, single, tmp_path, capsys):
    import json

    from sae_mcp.cli import main

    argv = ["index", "--model", str(STORIES_HF), "--sae", str(stories_sae_dir), "--corpus", str(STORIES_CORPUS),
            "--data-dir", str(tmp_path), "--tokens", str(TOKENS), "--device", "cpu", "--batch-windows", str(BATCH),
            "--ray", "--workers", "2"]
    assert main(argv) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert report["tokens_scanned"] == single.tokens_scanned and not report["reused"]
    assert f"index {STORIES_HOOK}" in out.err  # the progress bar, on stderr
    assert dump(report["path"]) == dump(single.path)
    assert main(argv) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"]


def test_more_workers_than_the_cluster_can_place_are_refused_at_once(ray_cluster, tmp_path):
    from sae_mcp.errors import SaeMcpError

    with pytest.raises(SaeMcpError, match="3 workers need 3 CPU.*cluster has 2 CPU.*smaller --workers"):
        ray_index.RayIndexer(settings_for(tmp_path / "sae", tmp_path), workers=3)


def test_cli_index_ray_without_ray_says_to_install_it(monkeypatch, tmp_path, capsys):
    from sae_mcp.cli import main

    monkeypatch.setattr(ray_index, "import_ray", lambda: None)
    assert main(["index", "--ray", "--data-dir", str(tmp_path), "--corpus", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --ray needs Ray, an optional extra: pip install 'sae-mcp[ray]'"]
