"""The ledger stays bounded whatever a client sends: a rejected call's arguments are cut as results are (an
accepted call keeps what replay needs), listings read no large column, a size cap deletes the oldest runs no label
cites (`sae-mcp ledger prune` does it on demand, by size or age), and a submit secret is never written."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
from mcp.types import CallToolResult, TextContent

from sae_mcp.ledger.bounds import BOUNDED_STR, MAX_ERROR_CHARS, MAX_REJECTED_CHARS, SECRET_MARK
from sae_mcp.ledger.recording import digest_of
from sae_mcp.ledger.store import LedgerStore, ledger_path
from sae_mcp.ledger.summary import summary_of
from sae_mcp.server.tools import tool_map

from helpers.servers import cli, server_at, volatile
from mcp_client import call_many, error_text, text_of

pytestmark = pytest.mark.usefixtures("lexical_only")


def stored(data_dir, column: str) -> list:
    """Every run's `column` as stored, in order (read with plain SQL: what the file holds)."""
    conn = sqlite3.connect(ledger_path(data_dir))
    try:
        return [r[0] for r in conn.execute(f"SELECT {column} FROM runs ORDER BY seq")]
    finally:
        conn.close()


def file_bytes(data_dir) -> bytes:
    """The ledger file and its write-ahead log, as the disk holds them."""
    path = ledger_path(data_dir)
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def fake_result(size: int, **extra) -> CallToolResult:
    """A result of about `size` characters of JSON (a plain call of the recording, no tool behind it)."""
    body = {"rows": [{"i": i, "text": "x" * 90} for i in range(size // 100)], **extra}
    return CallToolResult(content=[TextContent(type="text", text="fake")], structured_content=body)


def record(ledger, tool: str, given: dict, result: CallToolResult | None = None, error: str | None = None) -> str:
    p = ledger.begin(tool, given, "s-test", None, {})
    if error is not None:
        p.fail(error)
    else:
        p.finish(result.structured_content)
    return p.run_id


def test_a_flood_of_rejected_megabyte_labels_stores_cut_arguments(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    big = "spam " * 200_000  # 1 MB: label_feature takes 1,000 characters
    answers = call_many(server, [("get_feature_acts", {"prompt": "the cat sat", "top_k": 2})]
                        + [("label_feature", {"feature": 3, "label": big, "evidence": big}) for _ in range(12)]
                        + [("next_token", {"prompt": "the cat", "unknown_" + "k" * 50_000: big})])
    assert all(a.is_error for a in answers[1:]) and "at most 1000 characters" in error_text(answers[1])
    given = [json.loads(g) for g in stored(tmp_path, "given")]
    assert len(given) == 14 and given[0] == {"prompt": "the cat sat", "top_k": 2}
    for g in given[1:13]:
        assert len(g["label"]) < BOUNDED_STR + 60 and g["label"].endswith("characters left out)")
    sizes = [len(g) + len(r or "") for g, r in zip(stored(tmp_path, "given"), stored(tmp_path, "resolved"))]
    assert max(sizes[1:]) <= 2 * MAX_REJECTED_CHARS  # given and resolved, each within its cap
    assert stored(tmp_path, "args_cut") == [0] + [1] * 13
    assert all(len(e) <= MAX_ERROR_CHARS + 60 for e in stored(tmp_path, "error")[1:])
    assert len(file_bytes(tmp_path)) < 2_000_000  # 25 MB of arguments were sent


def test_an_accepted_call_keeps_its_arguments_whole(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    label, evidence = "cat words " * 100, "feature 3 fires on 'cat' in 9 of 10 prompts; " * 80  # 1,000 and 3,680
    (ok,) = call_many(server, [("label_feature", {"feature": 3, "label": label[:1000], "evidence": evidence})])
    run = server.ledger.store.run(ok.structured_content["run_id"])
    assert run.ok and not run.args_cut and run.given == {"feature": 3, "label": label[:1000], "evidence": evidence}


def test_rejected_arguments_with_many_keys_or_deep_nesting_are_cut_to_the_cap(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    many = {f"k{i}": "v" * 50 for i in range(20_000)}  # 1.1 MB of unknown argument names
    deep: dict = {"x": 1}
    for _ in range(60):
        deep = {"d": deep}
    answers = call_many(server, [("next_token", {"prompt": "the cat", **many}),
                                 ("next_token", {"prompt": "the cat", "deep": deep})])
    assert all(a.is_error for a in answers)
    for g in stored(tmp_path, "given"):
        assert len(g) <= MAX_REJECTED_CHARS
    assert json.loads(stored(tmp_path, "given")[0])["left_out_keys"] > 19_000


def test_a_listing_parses_no_large_column(tiny_engine, tmp_path):
    """The listing reads the summary and the brief arguments written with each run, which come before the large
    columns in a row: with those columns made unreadable, the listing still answers."""
    server = server_at(tiny_engine, tmp_path)
    for i in range(5):
        record(server.ledger, "big_result", {"prompt": "p" * 5000, "top_k": i}, fake_result(50_000))
    columns = [r[1] for r in server.ledger.store.conn.execute("PRAGMA table_info(runs)")]
    assert columns[-3:] == ["given", "resolved", "result"]
    server.ledger.store.conn.execute("UPDATE runs SET given = 'not json', resolved = 'x', result = 'not json'")
    (listed,) = call_many(server, [("ledger", {"limit": 200})])
    runs = listed.structured_content["runs"]
    assert len(runs) == 5 and all(len(r["arguments"]["prompt"]) < 200 for r in runs)
    assert all(r["summary"].startswith('{"rows":[{"i":0') for r in runs)
    lines = text_of(listed).splitlines()
    assert len(lines) == 6 and all(len(line) < 400 for line in lines)


def test_an_old_ledger_gets_the_new_columns_and_its_runs_still_list(tmp_path):
    path = tmp_path / "ledger" / "ledger.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, started REAL NOT NULL, env TEXT, client TEXT);"
        "CREATE TABLE runs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, session TEXT NOT NULL, env TEXT, "
        "time REAL NOT NULL, tool TEXT NOT NULL, given TEXT NOT NULL, resolved TEXT, wall_s REAL NOT NULL, "
        "ok INTEGER NOT NULL, error TEXT, digest TEXT, result TEXT, result_chars INTEGER, "
        "truncated INTEGER NOT NULL DEFAULT 0, sae TEXT, features TEXT);"
        "INSERT INTO sessions VALUES ('s1', 1.0, NULL, NULL);"
        "INSERT INTO runs (id, session, time, tool, given, wall_s, ok, result) VALUES ('r1', 's1', 1.0, "
        "'label_feature', '{\"feature\": 7, \"label\": \"cats\"}', 0.1, 1, '{\"label_id\": 4, \"feature\": 7}');")
    conn.close()
    store = LedgerStore(path)
    (run,) = store.runs(light=True)  # its summary computed from its result, by its tool's rule
    assert summary_of(run, tool_map()) == "label 4 on feature 7" and run.given == {"feature": 7, "label": "cats"}
    assert store.run("r1").result == {"label_id": 4, "feature": 7}


def test_past_the_cap_the_oldest_uncited_runs_are_deleted_and_cited_ones_kept(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    ledger = server.ledger
    ledger.max_bytes = cap = 2_000_000
    first = [record(ledger, "get_feature_acts", {"prompt": f"run {i}"}, fake_result(100_000)) for i in range(3)]
    (label,) = call_many(server, [("label_feature", {"feature": 3, "label": "cats", "evidence_runs": [first[1]]})])
    later = [record(ledger, "get_feature_acts", {"prompt": f"later {i}"}, fake_result(100_000)) for i in range(60)]
    store = ledger.store
    assert store.used_bytes() <= cap + 150_000  # 6 MB were recorded; one run past the cap at most
    assert store.missing([first[1], label.structured_content["run_id"]]) == []  # cited, and the label's record
    assert store.missing([first[0], first[2], later[0]]) == [first[0], first[2], later[0]]  # the oldest, uncited
    assert store.missing(later[-5:]) == [] and 12 <= store.count() <= 20
    assert ledger_path(tmp_path).stat().st_size <= 1.3 * cap  # freed pages are reused: the file stops growing


def test_prune_by_age_and_size_keeps_cited_runs_and_gives_the_space_back(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    ledger = server.ledger
    old = [record(ledger, "get_feature_acts", {"prompt": f"old {i}"}, fake_result(100_000)) for i in range(20)]
    (label,) = call_many(server, [("label_feature", {"feature": 3, "label": "cats", "evidence_runs": [old[0]]})])
    ledger.store.conn.execute("UPDATE runs SET time = ?", (time.time() - 40 * 86400,))  # all 40 days old
    new = [record(ledger, "get_feature_acts", {"prompt": f"new {i}"}, fake_result(100_000)) for i in range(10)]
    size = ledger_path(tmp_path).stat().st_size
    rc, out = cli("ledger", "prune", "--data-dir", str(tmp_path), "--older-than-days", "30")
    assert rc == 0 and "deleted 19 of 31 runs" in out and "kept 1 that labels cite" in out
    store = LedgerStore.for_data_dir(tmp_path)
    assert store.missing([old[0], label.structured_content["run_id"], *new]) == []
    assert ledger_path(tmp_path).stat().st_size < size * 0.6  # vacuumed: 19 of 30 large runs gone
    rc, out = cli("ledger", "prune", "--data-dir", str(tmp_path), "--max-mb", "0.5")
    assert rc == 0 and store.missing([old[0], label.structured_content["run_id"]]) == [] and store.count() <= 6
    assert ledger_path(tmp_path).stat().st_size < 800_000
    with pytest.raises(SystemExit):
        cli("ledger", "prune", "--data-dir", str(tmp_path), "--max-mb", "-1")


def test_a_submit_secret_reaches_neither_the_ledger_nor_its_listing(tiny_engine, tmp_path):
    secret = "s3cr3t-" + "q" * 25
    server = server_at(tiny_engine, tmp_path)
    ledger = server.ledger
    # As arguments: a rejected call (an argument the tool lacks, or a bad value quoted in the error).
    answers = call_many(server, [("next_token", {"prompt": "the cat", "submit_secret": secret}),
                                 ("submit_predictions", {"challenge_id": "ch_x", "predictions": {},
                                                         "submit_secret": secret})])
    assert all(a.is_error for a in answers)
    # In results, whatever tool returns one: at the top, nested, in a volatile tool's result.
    body = {"challenge": {"challenge_id": "ch_1", "seed": 3, "submit_secret": secret}, "score": None}
    blind = record(ledger, "score_explanation", {"feature": 1, "explanation": "cats"},
                   CallToolResult(content=[TextContent(type="text", text="x")], structured_content=dict(body)))
    plain = record(ledger, "get_feature_acts", {"prompt": "the cat"},
                   fake_result(2_000, submit_secret=secret, nested=[{"submit_secret": secret}]))
    big = record(ledger, "get_feature_acts", {"prompt": "the dog"}, fake_result(400_000, submit_secret=secret))
    failed = record(ledger, "submit_predictions", {"submit_secret": secret},
                    error=f"submit_secret: wrong (given '{secret[:20]}...')")
    store = ledger.store
    assert store.run(blind).result["challenge"]["submit_secret"] == SECRET_MARK
    assert store.run(blind).digest == digest_of(volatile("score_explanation"), {**body, "challenge": {
        **body["challenge"], "submit_secret": "another one"}})  # the digest does not depend on the secret
    assert store.run(plain).result["nested"] == [{"submit_secret": SECRET_MARK}]
    assert store.run(big).truncated and store.run(big).result["submit_secret"] == SECRET_MARK
    assert store.run(failed).given == {"submit_secret": SECRET_MARK} and secret[:8] not in store.run(failed).error
    (listed,) = call_many(server, [("ledger", {"limit": 50})])
    assert secret[:8] not in text_of(listed) and secret[:8] not in json.dumps(listed.structured_content)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert secret[:8].encode() not in file_bytes(tmp_path)
