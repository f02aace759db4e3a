"""kill -9 in the middle of writing: the SQLite stores keep every acknowledged write and stay consistent, and a
killed index build resumes from its last checkpoint to the same index an uninterrupted build makes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from helpers.models import STORIES_CORPUS, STORIES_HF
from helpers.servers import CLI_ENV

LABEL_WRITER = """
import sys
from sae_mcp.store.explanations import ExplanationStore
store = ExplanationStore(sys.argv[1], embedder=None)
for i in range(100_000):
    rec = store.add_label("sae-key", i % 50, f"label number {i}", evidence=f"evidence {i}")
    print(rec.id, flush=True)  # acknowledged: add_label returned
"""


def test_labels_acknowledged_before_a_kill_9_are_all_there_and_the_store_is_consistent(tmp_path):
    db = tmp_path / "explanations.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", LABEL_WRITER, str(db)], stdout=subprocess.PIPE, env=CLI_ENV,
                            text=True)
    acknowledged = []
    for line in proc.stdout:  # kill it mid-stream, after a good number of writes
        acknowledged.append(int(line))
        if len(acknowledged) == 400:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.execute("INSERT INTO texts(texts) VALUES ('integrity-check')")  # FTS5's own check: raises when corrupt
    ids = {row[0] for row in con.execute("SELECT id FROM labels")}
    assert set(acknowledged) <= ids
    n_fts = con.execute("SELECT count(*) FROM texts WHERE kind = 'label'").fetchone()[0]
    assert n_fts == len(ids)  # every label has its search row: written in one transaction
    from sae_mcp.store.explanations import ExplanationStore

    found, _ = ExplanationStore(db, embedder=None).search(f"label number {acknowledged[-1]}", ["sae-key"], top_k=5)
    assert found  # the store opens and searches after the crash


def index_command(data_dir: Path, sae_dir: Path, tokens: int) -> list[str]:
    return [sys.executable, "-m", "sae_mcp", "index", "--model", str(STORIES_HF), "--sae", str(sae_dir),
            "--corpus", str(STORIES_CORPUS), "--device", "cpu", "--data-dir", str(data_dir), "--tokens", str(tokens),
            "--batch-windows", "2", "--checkpoint-seconds", "0"]  # buffers of 64 windows: ~7.5k tokens


def index_file(data_dir: Path) -> Path:
    (path,) = data_dir.glob("index/*/*/*.sqlite")
    return path


def scan_state(path: Path) -> tuple:
    con = sqlite3.connect(path)
    row = con.execute("SELECT tokens, windows, top_vals, top_pos, n_fired, hist, samp_pos, samp_vals FROM scans "
                      "WHERE name = 'index'")
    tokens, windows, *blobs = row.fetchone()
    n_windows = con.execute("SELECT count(*) FROM windows").fetchone()[0]
    return tokens, windows, n_windows, [np.frombuffer(b, dtype=np.uint8) for b in blobs]


def test_a_kill_9_during_an_index_build_resumes_to_the_uninterrupted_index(stories_sae_dir, tmp_path):
    tokens = 40_000
    whole = tmp_path / "whole"
    subprocess.run(index_command(whole, stories_sae_dir, tokens), env=CLI_ENV, check=True, capture_output=True,
                   timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(index_command(killed, stories_sae_dir, tokens), env=CLI_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    checkpointed = 0
    while time.monotonic() < deadline and proc.poll() is None:  # kill it once a checkpoint is on disk
        files = list(killed.glob("index/*/*/*.sqlite"))
        if files:
            try:
                row = sqlite3.connect(files[0]).execute("SELECT tokens FROM scans WHERE name = 'index'").fetchone()
                checkpointed = row[0] if row else 0
            except sqlite3.Error:
                checkpointed = 0
        if 0 < checkpointed < tokens // 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed mid-way"
    assert sqlite3.connect(index_file(killed)).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    resumed = subprocess.run(index_command(killed, stories_sae_dir, tokens), env=CLI_ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"reused": false' in resumed.stdout and "resuming index at" in resumed.stderr
    a, b = scan_state(index_file(whole)), scan_state(index_file(killed))
    assert a[:3] == b[:3]  # tokens, windows consumed, windows stored
    for x, y in zip(a[3], b[3]):
        assert np.array_equal(x, y)  # top values, positions, counts, histograms, interval samples byte-identical
