"""An unwritable <data_dir>/ledger/ stops start-up with one line (exit 2) before the model loads: it started with a
traceback and then answered every call without a run id."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sae_mcp.errors import LoadError
from sae_mcp.preflight import check_ledger_dir

from helpers.models import STORIES_HF
from helpers.servers import CLI_ENV


def test_a_ledger_folder_that_cannot_hold_the_ledger_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ledger").write_text("x")  # a file where the folder goes
    with pytest.raises(LoadError, match="the ledger folder .*/a/ledger is a file, not a folder"):
        check_ledger_dir(tmp_path / "a" / "ledger")
    (tmp_path / "b" / "ledger" / "ledger.sqlite").mkdir(parents=True)
    with pytest.raises(LoadError, match="the ledger .*/ledger.sqlite is a folder, not a file"):
        check_ledger_dir(tmp_path / "b" / "ledger")
    (tmp_path / "c" / "ledger").mkdir(parents=True)
    (tmp_path / "c" / "ledger" / "ledger.sqlite").write_bytes(b"not a database" * 10)
    with pytest.raises(LoadError, match="is not a SQLite database; make it a writable folder, move it away"):
        check_ledger_dir(tmp_path / "c" / "ledger")
    check_ledger_dir(tmp_path / "missing" / "ledger")  # made by the first recorded call
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: the cases above need no chmod")
def test_a_read_only_ledger_folder_is_named(tmp_path):
    folder = tmp_path / "ledger"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(LoadError, match="the ledger folder .* is not writable"):
            check_ledger_dir(folder)
    finally:
        folder.chmod(0o700)


def test_serve_with_an_unwritable_ledger_folder_exits_2_with_one_line(tmp_path, stories_sae_dir):
    (tmp_path / "ledger").write_text("x")
    out = subprocess.run([sys.executable, "-m", "sae_mcp", "serve", "--device", "cpu", "--model", str(STORIES_HF),
                          "--sae", str(stories_sae_dir), "--data-dir", str(tmp_path)], capture_output=True, text=True,
                         env=CLI_ENV, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: the ledger folder {tmp_path}/ledger is a file, not a folder; make it a writable folder, move it "
        "away (a new ledger starts), or pass another --data-dir"]
