"""Every request on stdio gets an answer: malformed JSON-RPC is answered -32700 / -32600 (with the request's id when
it can be read) where the SDK's reader logged it at DEBUG and left the client waiting forever.

Three levels: check_line alone; a minimal MCPServer on our stdio transport in a subprocess (no model, seconds);
the real `sae-mcp serve` on the bundled stories260K model and its layer-3 SAE."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import pytest

from sae_mcp.server.stdio import check_line

from helpers.models import STORIES_HF
from helpers.servers import CLI_ENV

PARSE, INVALID = -32700, -32600


def request(rid, method: str, params=None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode()


def call(rid, tool: str, raw_arguments: bytes) -> bytes:
    """A tools/call whose arguments are given as raw JSON bytes (to hold what json.dumps would never write)."""
    head = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call"})[:-1].encode()
    return head + b', "params": {"name": "' + tool.encode() + b'", "arguments": ' + raw_arguments + b"}}"


def nested(rid, depth: int) -> bytes:
    return request(rid, "ping")[:-1] + b', "params": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


def malformed(tool: str, arg: str) -> list[tuple[bytes, int, object, str]]:
    """(line, expected code, expected id, words in the message): the attacker's cases and their neighbours."""
    return [
        (call(101, tool, b'{"' + arg.encode() + b'": "\\ud800"}'), PARSE, 101, "lone surrogate"),
        (call(102, tool, b'{"' + arg.encode() + b'": "cut \xf0\x9f"}'), PARSE, 102, "invalid UTF-8"),
        (nested(103, 300), PARSE, 103, "nested deeper than the 200 levels"),
        (nested(None, 5000), PARSE, None, "nested deeper"),
        (request(104, "ping", []), INVALID, 104, '"params" must be an object'),
        (b'{"jsonrpc": "1.0", "id": 105, "method": "ping"}', INVALID, 105, '"jsonrpc" must be "2.0"'),
        (b'[' + request(106, "ping") + b']', INVALID, None, "batches"),
        (b"hello", PARSE, None, "invalid JSON"),
        (b'{"jsonrpc": "2.0", "id": 107, "method": "pi', PARSE, None, "invalid JSON"),
        (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}', INVALID, None, '"id" must be a string or an integer'),
        (b'{"jsonrpc": "2.0", "id": 108, "method": 5}', INVALID, 108, '"method" must be a string'),
        (b"42", INVALID, None, "a message is a JSON object"),
    ]


@pytest.mark.parametrize("line, code, rid, words", malformed("echo", "text"))
def test_check_line_answers_each_malformed_line(line, code, rid, words):
    reply = check_line(line)
    assert not isinstance(reply, str) and reply is not None
    assert (reply.error.code, reply.id) == (code, rid) and words in reply.error.message, reply.error.message


def test_check_line_passes_good_lines_unchanged_and_skips_blank_ones():
    good = request(1, "tools/call", {"name": "echo", "arguments": {"text": "\U0001f600 ok"}})
    assert check_line(good) == good.decode()
    assert check_line(request(2, "ping", {"a": "\\ud83d\\ude00"})) is not None  # an escaped pair is whole
    assert check_line(b"   \n") is None


class LineSession:
    """A subprocess speaking newline-delimited JSON-RPC: raw lines in, parsed replies out (every stdout line must
    be JSON-RPC)."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=CLI_ENV)
        self.replies: queue.Queue = queue.Queue()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.replies.put(json.loads(raw))  # not JSON: the test fails on the queue's next get

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def receive(self, n: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            try:
                out.append(self.replies.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                tail = b"".join(self.stderr[-20:]).decode(errors="replace")
                raise AssertionError(f"{len(out)} of {n} replies within {timeout} s; stderr tail:\n{tail}") from None
        return out

    def initialize(self, timeout: float) -> dict:
        self.send(request(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                            "clientInfo": {"name": "test", "version": "0"}}))
        (init,) = self.receive(1, timeout)
        self.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}')
        return init

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def exchange(session: LineSession, cases, after: list[tuple[bytes, object]], timeout: float) -> dict:
    """Send every malformed line, then the good ones; check each malformed line's reply; -> good replies by id."""
    for line, *_ in cases:
        session.send(line)
    for line, _ in after:
        session.send(line)
    replies = session.receive(len(cases) + len(after), timeout)
    errors = sorted(((r["id"] is None, str(r["id"]), r["error"]["code"], r["error"]["message"]) for r in replies
                     if "error" in r and r["id"] not in {rid for _, rid in after}))
    want = sorted((rid is None, str(rid), code) for _, code, rid, _ in cases)
    assert [e[:3] for e in errors] == want, errors
    for _, code, rid, words in cases:
        assert any(e[1] == str(rid) and words in e[3] for e in errors), (rid, words, errors)
    return {r["id"]: r for r in replies if r["id"] in {rid for _, rid in after}}


PROBE_SERVER = """
from mcp.server.mcpserver import MCPServer
from sae_mcp.server.stdio import run_stdio

server = MCPServer("probe")


@server.tool()
def echo(text: str) -> str:
    return text


run_stdio(server)
"""


def test_a_server_on_the_checked_transport_answers_every_malformed_line_and_keeps_serving():
    session = LineSession([sys.executable, "-c", PROBE_SERVER])
    try:
        session.initialize(timeout=60)
        good = [(request(200, "ping"), 200),
                (call(201, "echo", json.dumps({"text": "caf\u00e9 \U0001f600"}).encode()), 201)]
        answered = exchange(session, malformed("echo", "text"), good, timeout=60)
        assert answered[200]["result"] == {}
        assert answered[201]["result"]["content"][0]["text"] == "caf\u00e9 \U0001f600"
    finally:
        session.close()
    assert session.proc.returncode == 0  # EOF on stdin ends the server cleanly


def test_sae_mcp_serve_answers_every_malformed_line_and_keeps_serving(stories_sae_dir, tmp_path):
    session = LineSession([sys.executable, "-m", "sae_mcp", "serve", "--model", str(STORIES_HF), "--sae",
                           str(stories_sae_dir), "--device", "cpu", "--data-dir", str(tmp_path)])
    try:
        init = session.initialize(timeout=300)
        assert init["result"]["serverInfo"]["name"] == "sae-mcp"
        acts = call(201, "get_feature_acts", b'{"prompt": "Once upon a time", "top_k": 2}')
        answered = exchange(session, malformed("get_feature_acts", "prompt"), [(acts, 201)], timeout=120)
        assert answered[201]["result"]["structuredContent"]["tokens"][0] == "<s>"
    finally:
        session.close()
