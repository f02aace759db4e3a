"""What an attacker-minded caller found: regexes that pinned the server, crashes without a reason, retries that
duplicated labels, contradictory arguments taken silently, bad configuration found late. Tiny engine, offline."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading

import pytest

from sae_mcp.engine import token_sets
from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.engine.token_sets import BUILTIN_SETS, build_token_sets
from sae_mcp.errors import InvalidInput, LoadError
from sae_mcp.preflight import check_corpus, check_data_dir
from sae_mcp.server.app import build_server
from sae_mcp.settings import Settings
from sae_mcp.store.explanations import ExplanationStore

from helpers.servers import CLI_ENV, server_at
from mcp_client import call_many, call_tool, error_text

# Python's re took 1 s (4 groups) and 10 s (5 groups) on stories260K's 512 tokens; each group multiplies it, so
# REDOS_40 (8 x 5 groups, 488 characters: within the schema's 512) would not finish in any lifetime.
REDOS_4 = "(?:(?:.*)*)*(?:(?:.*)*)*(?:(?:.*)*)*(?:(?:.*)*)*\u0000"
REDOS_5 = "(?:(?:.*)*)*" * 5 + "\u0000"
REDOS_40 = REDOS_5 * 8
HANG_GUARD_S = 120  # not a speed goal: a backtracking engine would not finish REDOS_40 at all


def finishes(fn):
    """fn() on a thread -> its result, or fail when it is still running after HANG_GUARD_S (it hangs)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(HANG_GUARD_S)
    assert not worker.is_alive(), f"still running after {HANG_GUARD_S} s: the pattern pins the server"
    return out[0] if out else None


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    return build_server(tiny_engine, Settings(data_dir=tmp_path_factory.mktemp("robust")))


# --------------------------------------------------------------------------------------------- token-set regexes


@pytest.mark.parametrize("pattern", [REDOS_4, REDOS_40, "(.*){1000}", "(?:.?){500}(?:.?){500}"])
def test_backtracking_patterns_finish_with_a_clear_answer(server, pattern):
    res = finishes(lambda: call_tool(server, "token_set_enrichment", {"regex_sets": {"x": pattern}}))
    if res.is_error:  # REDOS_*: no token holds a NUL; (.*){1000}: every token
        assert "neither empty nor the whole vocabulary" in error_text(res)


def test_sixteen_worst_patterns_over_a_large_vocabulary_stay_linear():
    vocab = [f" word{i} é中!" for i in range(50_000)]

    def sixteen():
        with pytest.raises(InvalidInput, match="neither empty"):
            build_token_sets(vocab, frozenset(), regex_sets={f"p{i}": REDOS_40 for i in range(16)})
        return True

    assert finishes(sixteen)


@pytest.mark.parametrize("pattern, named", [
    ("a{99999999999}", "the repetition {99999999999} is above 1000"),
    ("x{2,5000}", "the repetition {2,5000} is above 1000"),
    (r"(a)\1", r"a backreference (\1)"),
    (r"(?P<w>a)(?P=w)", "a named backreference"),
    ("(?=a)b", "lookahead (?=...)"),
    ("(?!a)b", "negative lookahead"),
    ("(?<=a)b", "lookbehind (?<=...)"),
    ("(?<!a)b", "negative lookbehind"),
    ("a*+", "a possessive quantifier"),
    (r"a\Z", r"\z"),
    ("(", "missing )"),
])
def test_patterns_re2_cannot_run_are_refused_naming_the_construct(server, pattern, named):
    text = error_text(call_tool(server, "token_set_enrichment", {"regex_sets": {"x": pattern}}))
    assert "does not compile" in text and named in text, text


def test_a_time_budget_stops_matching_that_runs_too_long(tiny_engine, monkeypatch):
    monkeypatch.setattr(token_sets, "REGEX_BUDGET_S", -1.0)  # already past: the first look at the clock stops it
    with pytest.raises(InvalidInput, match="took over"):
        LogitWeightStats(tiny_engine).token_sets(regex_sets={"x": "a"})


def test_builtin_sets_on_re2_are_the_sets_python_re_gave():
    """RE2's \\w and \\s are ASCII; the punctuation set is written with Unicode classes to keep Python's meaning."""
    vocab = [" the", "The", " 1999", "42", " hello", "!", " ?!", "...", "é", " ñandú", "中文", "—", "٣", " ½",
             "x_y", "_", "\u00a0", " \u2003", "\n", "a\nb", "«»", "™", "ǅ", "Ⅻ", "αβ", " ", "", "__init__"]
    for name, pattern in BUILTIN_SETS.items():
        got = [vocab[i] for i in build_token_sets(vocab, frozenset(), regex_sets={name: token_sets.RE2_SYNTAX.get(
            name, pattern)})[0][0].ids]
        assert got == [t for t in vocab if re.search(pattern, t)], name


# ------------------------------------------------------------------------------------------ unexpected exceptions


def test_an_unexpected_exception_is_an_error_with_its_reason_and_the_server_keeps_working(
    server, tiny_engine, monkeypatch, caplog
):
    def boom(self, *a, **k):
        raise ZeroDivisionError("float division by zero\nsecond line")

    monkeypatch.setattr(LogitWeightStats, "feature_stats", boom)
    with caplog.at_level(logging.ERROR, logger="sae_mcp.server.wiring"):
        bad, ok = call_many(server, [("feature_stats", {}), ("next_token", {"prompt": "the cat"})])
    assert error_text(bad) == "internal error in feature_stats: ZeroDivisionError: float division by zero second line"
    assert "Traceback" not in error_text(bad)
    (record,) = [r for r in caplog.records if r.name == "sae_mcp.server.wiring"]
    assert record.exc_info and record.exc_info[0] is ZeroDivisionError  # the traceback goes to the log, once
    assert not ok.is_error and tiny_engine.is_clean()


def test_an_exception_without_a_message_still_names_its_type(server, monkeypatch):
    monkeypatch.setattr(LogitWeightStats, "feature_stats", lambda self, *a, **k: {}[0])
    assert error_text(call_tool(server, "feature_stats", {})) == "internal error in feature_stats: KeyError: 0"
    monkeypatch.setattr(LogitWeightStats, "feature_stats", lambda self, *a, **k: (_ for _ in ()).throw(ValueError()))
    assert error_text(call_tool(server, "feature_stats", {})).endswith("feature_stats: ValueError: (no message)")


# ------------------------------------------------------------------------------------------- small validations


def test_repeated_features_and_an_empty_density_range_say_what_to_change(server):
    rep, dens = call_many(server, [
        ("get_feature_acts", {"prompt": "the cat", "features": [3, 3]}),
        ("feature_stats", {"min_density": 0.5, "max_density": 0.1}),
    ])
    assert "repeat an index; list each feature once" in error_text(rep)
    assert "min_density 0.5 is above max_density 0.1" in error_text(dens) and "swap them" in error_text(dens)


# ----------------------------------------------------------------------------------------- idempotent labels


def test_the_same_label_twice_is_recorded_once(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    args = {"feature": 9, "label": "the word park", "evidence": "9/10 top examples"}
    first, again, padded, other = call_many(server, [
        ("label_feature", args), ("label_feature", args),
        ("label_feature", {**args, "label": "  the word park ", "evidence": "9/10 top examples  "}),
        ("label_feature", {**args, "evidence": "10/10 top examples"}),
    ])
    same = [{k: v for k, v in r.structured_content.items() if k != "run_id"} for r in (first, again, padded)]
    assert same[0] == same[1] == same[2]  # each call is its own run in the ledger: only run_id differs
    assert first.structured_content["labels_for_feature"] == 1
    assert other.structured_content["labels_for_feature"] == 2  # new evidence is a new label


def test_a_retry_with_the_idempotency_key_returns_the_first_label(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    args = {"feature": 2, "label": "cats", "idempotency_key": "call-1"}
    first, retry, reused = call_many(server, [
        ("label_feature", args), ("label_feature", args),
        ("label_feature", {**args, "label": "dogs"}),
    ])
    assert {k: v for k, v in retry.structured_content.items() if k != "run_id"} == {
        k: v for k, v in first.structured_content.items() if k != "run_id"}  # run_id: each call's own
    assert "idempotency_key 'call-1' already recorded another label" in error_text(reused)


def test_a_label_committed_before_a_kill_is_not_written_again_by_the_retry(tiny_engine, tmp_path):
    """kill -9 after the commit, before the answer: the store holds the label, the client retries."""
    server = server_at(tiny_engine, tmp_path)
    s = tiny_engine.sae(None)
    store = ExplanationStore.for_model(tmp_path, tiny_engine.loaded_model.store_key, embedder=None)
    committed = store.add_label(s.store_key, 4, "commas", "acts on ','", idempotency_key="k")
    store.close()
    retry = call_tool(server, "label_feature", {"feature": 4, "label": "commas", "evidence": "acts on ','",
                                                "idempotency_key": "k"})
    assert retry.structured_content["label_id"] == committed.id
    assert retry.structured_content["labels_for_feature"] == 1


def test_two_servers_racing_on_one_store_insert_once(tmp_path):
    path = tmp_path / "e.sqlite"
    stores = [ExplanationStore(path, embedder=None) for _ in range(4)]
    ids = []
    threads = [threading.Thread(target=lambda st=st: ids.append(st.add_label("sae", 1, "x", "ev"))) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({e.id for e in ids}) == 1 and stores[0].counts("sae")["labels"] == 1


def test_a_store_written_before_idempotency_keys_gains_the_column_and_keeps_its_labels(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE labels (id INTEGER PRIMARY KEY, sae TEXT NOT NULL, feature INTEGER NOT NULL, "
                       "label TEXT NOT NULL, evidence TEXT, created REAL NOT NULL);"
                       "INSERT INTO labels (sae, feature, label, evidence, created) VALUES ('s', 1, 'old', NULL, 1.0);")
    conn.close()
    store = ExplanationStore(path, embedder=None)
    assert store.add_label("s", 1, "old").id == 1  # the old row answers the same label
    assert store.add_label("s", 1, "new", idempotency_key="k").id == 2


# --------------------------------------------------------------------------------------------- start-up checks


def test_start_up_checks_name_the_problem(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(LoadError, match="is a file, not a folder"):
        check_data_dir(afile)
    with pytest.raises(LoadError, match="not writable"):
        check_data_dir(afile / "sub")  # cannot be created (a root user writes anywhere, so no chmod here)
    check_data_dir(tmp_path / "new" / "dir")
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe is gone
    for name, data, reason in [("junk.jsonl", os.urandom(2000), "not UTF-8"), ("junk.txt", b"\xff\xfe" * 100,
                               "not UTF-8"), ("junk.parquet", b"PAR" * 100, "cannot be read as parquet"),
                               ("bad.jsonl", b"not json\n", "is not JSON"), ("nul.txt", b"a\x00b\n", "NUL bytes"),
                               ("empty.jsonl", b"", "holds no text")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LoadError, match=reason):
            check_corpus(str(tmp_path / name))
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "the cat sat"}\n')
    check_corpus(str(good))
    check_corpus("some/hf-dataset")  # a Hugging Face dataset is left to its reader


@pytest.mark.parametrize("flags, says", [
    (["--data-dir", "{tmp}/afile/sub"], "the data dir {tmp}/afile/sub is not writable"),
    (["--data-dir", "{tmp}/data", "--corpus", "{tmp}/junk.jsonl"], "--corpus {tmp}/junk.jsonl is not UTF-8 text"),
])
def test_serve_with_bad_configuration_exits_2_with_one_line_before_loading_anything(tmp_path, flags, says):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "junk.jsonl").write_bytes(os.urandom(4000))
    args = [f.format(tmp=tmp_path) for f in flags]
    # A model folder that does not exist: were it loaded before the configuration is checked, the one line would be
    # about the model.
    model = ["--model", str(tmp_path / "no-such-model")]
    out = subprocess.run([sys.executable, "-m", "sae_mcp", "serve", "--device", "cpu", *model, *args],
                         capture_output=True, text=True, env=CLI_ENV, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and says.format(tmp=tmp_path) in out.stderr

