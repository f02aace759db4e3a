"""The ledger records every tool call: a session across every tool on stories260K is recorded completely (arguments
as given and as resolved, the environment, digests and copies of the results, failures with their message), results
carry their run_id, labels cite runs, the ledger reads back through MCP, recording never fails a call, --no-ledger
turns it off, and a `sae-mcp serve` killed with -9 mid-session has lost no run whose result it returned."""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from sae_mcp.ledger.bounds import bounded, scrub
from sae_mcp.ledger.recording import digest_of
from sae_mcp.ledger.store import LedgerStore, ledger_path
from sae_mcp.store.explanations import ExplanationStore

from helpers.models import STORIES_HF, only_sae
from helpers.servers import CLI_ENV, server_at, volatile
from helpers.session import PROMPT, record_session, session_calls
from mcp_client import call_many, error_text, read_resource, text_of


@pytest.fixture(scope="module")
def recorded(stories_engine, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("ledger_data")
    server, calls, results, labels = record_session(stories_engine, data_dir)
    return dict(server=server, calls=calls, results=results, labels=labels, data_dir=data_dir,
                store=LedgerStore.for_data_dir(data_dir))


def test_a_session_across_every_tool_is_recorded_completely(recorded):
    store, calls, results = recorded["store"], recorded["calls"], recorded["results"]
    (session,) = store.sessions()  # one client connection
    runs = store.runs(session=session.id)
    assert session.n_runs == len(runs) == len(calls) + 3
    assert [r.tool for r in runs] == [name for name, _ in calls] + ["label_feature"] * 3
    for (name, args), res, run in zip(calls, results, runs):
        assert run.given == scrub(args) and run.env and run.wall_s > 0  # a submit secret is never stored
        if res.is_error:
            assert not run.ok and run.error == " ".join(text_of(res).split()) and "less than or equal" in run.error
            continue
        out = dict(res.structured_content)
        assert out.pop("run_id") == run.id and text_of(res).endswith(f"\nrun_id: {run.id}")  # where the agent sees it
        assert run.ok and run.digest == digest_of(volatile(name), out)
        assert run.result == scrub(out) or name == "build_index"  # whole (build_index's timings: not in the digest)
    by_tool = {r.tool: r.resolved for r in runs if r.ok}
    sae = only_sae(recorded["server"].ledger.engine)
    assert by_tool["get_feature_acts"] == {"prompt": PROMPT, "top_k": 3, "features": [5, 9], "position": None,
                                           "sae": sae.key, "prepend_bos": True}
    steer = [r.resolved for r in runs if r.tool == "steer_generate"]
    assert steer[0]["coefficients"] == [2.0] and steer[0]["scales"] == [1.0, 4.0] and steer[0]["seeds"] == [0]
    assert steer[1]["seeds"] == [0, 1] and steer[1]["calibration"] == "max_activation"
    assert steer[1]["coefficients"][0] > 0 and steer[1]["top_p"] == 0.9 and steer[1]["temperature"] == 1.0
    assert by_tool["ablate_and_test"]["positions"] == list(range(len(results[9].structured_content["tokens"])))
    controls = results[9].structured_content["controls"]["runs"]  # none when the targets do not fire there
    assert by_tool["ablate_and_test"]["control_sets"] == [c["features"] for c in controls]
    assert by_tool["ablate_and_test"]["seed"] == 0
    assert by_tool["top_examples"]["corpus"]["kind"] == "jsonl" and by_tool["top_examples"]["tokens_scanned"] >= 4000
    blind = results[24].structured_content["challenge"]  # score_explanation, no seed given: the drawn one recorded
    assert by_tool["score_explanation"]["seed"] == blind["seed"] and "seed" not in calls[24][1]
    assert not results[25].is_error and by_tool["submit_predictions"]["challenge_id"] == blind["challenge_id"]
    env = store.env(runs[0].env)
    assert env["model"]["weights"]["kind"] == "sha256" and env["model"]["processing"]["fold_ln"] is True
    assert env["saes"][0]["weights_id"] == sae.weights_id and env["saes"][0]["dtype"] == "float32"
    assert {"torch", "sae-lens", "transformer-lens", "sae-mcp"} <= set(env["versions"])


def test_labels_cite_runs_and_an_unknown_run_is_refused(recorded):
    good, unknown, uncited = recorded["labels"]
    assert not good.is_error and not uncited.is_error
    assert "no run 'r00000000' in the ledger" in error_text(unknown)
    engine = recorded["server"].ledger.engine
    cited = [recorded["results"][i].structured_content["run_id"] for i in (9, 8)]  # ablate_and_test, top_examples
    store = ExplanationStore.for_model(recorded["data_dir"], engine.loaded_model.store_key, embedder=None)
    (label,) = [e for e in store.for_feature(only_sae(engine).store_key, 7) if e.source == "label"]
    assert label.description == "Lily's name" and label.evidence_runs == cited
    runs = recorded["store"].runs(tool="label_feature")
    assert runs[0].given["evidence_runs"] == cited and not runs[1].ok  # the refused label is recorded as a failure
    drawn = uncited.structured_content["challenge"]["seed"]  # label_feature(score) without a seed: the drawn one
    assert runs[2].resolved["score"]["seed"] == drawn and "seed" not in runs[2].given["score"]
    assert runs[2].result["submit_secret"] != uncited.structured_content["submit_secret"]  # never stored


def test_the_ledger_reads_back_through_the_tool_and_the_resources(recorded):
    server, results = recorded["server"], recorded["results"]
    ablate_id = results[9].structured_content["run_id"]
    about_7, one, steer, listing = call_many(server, [
        ("ledger", {"feature": 7}), ("ledger", {"run": ablate_id}),
        ("ledger", {"tool": "steer_generate", "limit": 1}), ("ledger", {"session": "current"}),
    ])
    ids = [r["run_id"] for r in about_7.structured_content["runs"]]
    assert ablate_id in ids and results[6].structured_content["run_id"] not in ids  # project_to_vocab(feature=3)
    assert one.structured_content["run"]["resolved"]["features"] == [7, 8]
    assert one.structured_content["run"]["result"]["summary"] == results[9].structured_content["summary"]
    assert [r["tool"] for r in steer.structured_content["runs"]] == ["steer_generate"]
    assert listing.structured_content["runs"] == []  # this connection made no recorded call (ledger is not recorded)
    assert "KL" in text_of(steer) and len(text_of(steer)) < 600
    (scored,) = call_many(server, [("ledger", {"tool": "submit_predictions"})])
    m = results[25].structured_content["metrics"]
    assert f"balanced accuracy {m['balanced_accuracy']:.4g} [{m['interval_95'][0]:.4g}," in text_of(scored)
    sessions = read_resource(server, "ledger://sessions").contents[0].text
    first = recorded["store"].runs()[0].session
    assert first in sessions and "first prompt or query 'Once upon a time, there was" in sessions
    runs = read_resource(server, f"ledger://session/{first[:6]}").contents[0].text.splitlines()
    assert runs[0] == f"session {first}: {len(recorded['calls']) + 3} runs"
    assert any(line.startswith(ablate_id) and "ablate_and_test(" in line and "KL" in line for line in runs)


def test_a_failed_recording_never_fails_the_call(tiny_engine, tmp_path, monkeypatch, caplog):
    server = server_at(tiny_engine, tmp_path)

    def broken(self, run):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(LedgerStore, "record", broken)
    (res,) = call_many(server, [("get_feature_acts", {"prompt": "the cat sat", "top_k": 2})])
    assert not res.is_error and "run_id" not in res.structured_content and "run_id" not in text_of(res)
    assert "could not record the get_feature_acts call" in caplog.text


def test_no_ledger_records_nothing_and_recording_changes_no_result(tiny_engine, tmp_path):
    from sae_mcp.cli import make_parser

    call = ("next_token", {"prompt": "the cat sat", "top_k": 2})
    off = server_at(tiny_engine, tmp_path, record=False)
    res, listed, cited = call_many(off, [call, ("ledger", {}), ("label_feature", {
        "feature": 1, "label": "x", "evidence_runs": ["r00000000"]})])
    assert not res.is_error and "run_id" not in res.structured_content
    assert "records nothing (--no-ledger)" in text_of(listed) and "no run 'r00000000'" in error_text(cited)
    assert not ledger_path(tmp_path).exists()  # reading the ledger or checking evidence creates none
    (rec,) = call_many(server_at(tiny_engine, tmp_path / "on"), [call])
    run_id = rec.structured_content["run_id"]
    assert {k: v for k, v in rec.structured_content.items() if k != "run_id"} == res.structured_content
    assert text_of(rec) == f"{text_of(res)}\nrun_id: {run_id}"
    assert make_parser().parse_args(["serve", "--no-ledger"]).no_ledger
    assert make_parser().parse_args(["call", "model_info", "--no-ledger"]).no_ledger


def test_ledger_run_alone_answers_that_run_only_and_a_missing_session_names_the_resource(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path)
    first, second = call_many(server, [("next_token", {"prompt": "the cat sat", "top_k": 2}),
                                       ("get_feature_acts", {"prompt": "the dog", "top_k": 1})])
    rid, other = first.structured_content["run_id"], second.structured_content["run_id"]
    one, narrowed, missing = call_many(server, [("ledger", {"run": rid}),
                                                ("ledger", {"run": rid, "tool": "get_feature_acts"}),
                                                ("ledger", {"session": "zzzz"})])
    assert one.structured_content["run"]["run_id"] == rid and one.structured_content["runs"] == []
    assert other not in text_of(one) and text_of(one).startswith(f"run {rid} ") and "no run matches" not in text_of(one)
    assert [r["run_id"] for r in narrowed.structured_content["runs"]] == [other]  # a filter still lists
    assert "no session matches 'zzzz'" in error_text(missing) and "ledger://sessions" in error_text(missing)


def test_bounded_copies_cut_long_lists_and_the_digest_ignores_run_id():
    big = {"rows": list(range(100)), "text": "x" * 5000, "nested": [{"a": list(range(40))}]}
    cut = bounded(big)
    assert cut["rows"][:32] == list(range(32)) and cut["rows"][-1] == {"left_out": 68}
    assert len(cut["text"]) < 2100 and cut["nested"][0]["a"][-1] == {"left_out": 8}
    assert digest_of(volatile("t"), {"a": 1, "run_id": "r1"}) == digest_of(volatile("t"), {"a": 1})
    timings = volatile("build_index")
    assert digest_of(timings, {"a": 1, "seconds": 2.0}) == digest_of(timings, {"a": 1, "seconds": 9.0})
    blind = {"challenge": {"challenge_id": "ch_1", "seed": 1, "contexts": ["a"]}, "score": None}
    other_id = {"challenge": {**blind["challenge"], "challenge_id": "ch_2"}, "score": None}
    other_seed = {"challenge": {**blind["challenge"], "seed": 2}, "score": None}
    assert digest_of(volatile("score_explanation"), blind) == digest_of(volatile("score_explanation"), other_id)
    assert digest_of(volatile("score_explanation"), blind) != digest_of(volatile("score_explanation"), other_seed)
    assert blind["challenge"]["challenge_id"] == "ch_1"  # the result itself is left whole


class Lines:
    """`sae-mcp serve` over stdio, spoken to line by line (its pid is what kill -9 needs)."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=CLI_ENV)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))

    def send(self, rid, method: str, params: dict | None = None) -> None:
        msg = {"jsonrpc": "2.0", "method": method, **({"id": rid} if rid is not None else {}),
               **({"params": params} if params is not None else {})}
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict:
        return self.replies.get(timeout=timeout)


def test_kill_9_mid_session_loses_no_run_whose_result_was_returned(stories_sae_dir, tmp_path):
    server = Lines([sys.executable, "-m", "sae_mcp", "serve", "--model", str(STORIES_HF), "--sae",
                    f"res2={stories_sae_dir}", "--device", "cpu", "--data-dir", str(tmp_path)])
    try:
        server.send(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                      "clientInfo": {"name": "kill-test", "version": "0"}})
        assert server.reply(300)["result"]["serverInfo"]["name"] == "sae-mcp"
        server.send(None, "notifications/initialized")
        returned = {}
        for i, (name, args) in enumerate(session_calls()[1:8], start=2):
            server.send(i, "tools/call", {"name": name, "arguments": args})
            out = server.reply(120)["result"]
            if not out.get("isError"):
                returned[out["structuredContent"]["run_id"]] = (name, out["structuredContent"])
        server.send(99, "tools/call", {"name": "steer_generate", "arguments": {
            "prompt": PROMPT, "features": [{"feature": 7, "strength": 2}], "calibration": "absolute",
            "max_new_tokens": 200, "seeds": [0, 1, 2, 3, 4, 5, 6, 7], "strengths": [1, 2, 4, 8]}})
        time.sleep(1.0)  # mid-call: the answer is not out yet
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert server.proc.returncode == -signal.SIGKILL and len(returned) == 7
    store = LedgerStore.for_data_dir(tmp_path)
    assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for rid, (name, out) in returned.items():
        run = store.run(rid)
        body = {k: v for k, v in out.items() if k != "run_id"}
        assert run.tool == name and run.digest == digest_of(volatile(name), body)
    assert len({store.run(rid).session for rid in returned}) == 1  # one stdio client, one session


def test_a_session_is_found_by_a_unique_prefix_and_wildcards_are_plain_text(tmp_path):
    from sae_mcp.errors import NotFound
    from sae_mcp.ledger.store import LedgerStore

    store = LedgerStore(tmp_path / "ledger.sqlite")
    for sid in ("sab12", "sab34", "sxy99"):
        store.put_session(sid, 0.0, None, None)
    assert store.resolve_session("sxy") == "sxy99" and store.resolve_session("sab12") == "sab12"
    with pytest.raises(NotFound, match="several sessions"):
        store.resolve_session("sab")
    for pattern in ("s_y", "s%", "_", "%"):  # SQL LIKE wildcards match nothing unless an id holds them
        with pytest.raises(NotFound, match="no session matches"):
            store.resolve_session(pattern)


def test_the_session_map_keeps_only_the_newest_http_sessions():
    from sae_mcp.server.conversations import MAX_TEXT_KEYS, IdentityMap

    m = IdentityMap()
    for i in range(MAX_TEXT_KEYS + 50):
        m.put(f"http-{i}", f"s{i}")
    assert m.get("http-0") is None and m.get(f"http-{MAX_TEXT_KEYS + 49}") == f"s{MAX_TEXT_KEYS + 49}"
    assert m.get("http-50") == "s50" and len(m._by_text) == MAX_TEXT_KEYS
