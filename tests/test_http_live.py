"""The HTTP server on a real socket: what only shows on the wire (TCP options, uvicorn's access log).

Each test runs the app as `serve --transport http` does (http.uvicorn_server on a socket from
security.reserve_socket, the access log through http.redacted_access_log) on a thread of this process, and talks
to it with http.client over one kept-alive connection.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sae_mcp.server.http import mcp_http_app, redacted_access_log, uvicorn_server
from sae_mcp.server.security import HttpPolicy, reserve_socket

from helpers.models import only_sae

TOKEN = "test-token-0123456789abcdef"


@contextlib.contextmanager
def serving(app_for, token: str | None = None, access_log: bool = False) -> Iterator[tuple[object, int]]:
    """app_for(policy) served on a fresh loopback port -> (the uvicorn.Server, the port), stopped afterwards."""
    sock = reserve_socket("127.0.0.1", 0)
    policy = HttpPolicy(port=sock.getsockname()[1], token=token)
    server = uvicorn_server(app_for(policy), access_log=access_log)
    with redacted_access_log(token):
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30  # a hang guard, not a measurement
            while not server.started:
                assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
                time.sleep(0.01)
            yield server, policy.port
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


# ------------------------------------------------------------------------------------------- keep-alive


def test_an_accepted_connection_has_tcp_nodelay_so_a_kept_alive_request_is_not_held_by_nagle(tiny_server):
    """With the listening socket made with protocol 0, asyncio never set TCP_NODELAY on accepted connections, and
    every request after the first on a kept-alive connection waited ~44 ms for the client's delayed ACK. The
    option is read on the server's side of the connection, from uvicorn's own transport."""
    with serving(lambda policy: mcp_http_app(tiny_server, policy)) as (server, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for _ in range(3):  # one connection, kept alive
                status, _ = get(conn, "/features/x/?f=1")  # the cheapest route: a redirect, no model work
                assert status == 303
            (protocol,) = server.server_state.connections
            accepted = protocol.transport.get_extra_info("socket")
            assert accepted.getpeername()[1] == conn.sock.getsockname()[1]  # this very connection
            assert accepted.proto == socket.IPPROTO_TCP
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            conn.close()


# ------------------------------------------------------------------------------------------- the access log


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def access_log_of(tiny_server, paths: list[str]) -> tuple[list[str], list[int]]:
    """Request each path once on a real server with --access-log and a token -> (the access log, statuses)."""
    access = logging.getLogger("uvicorn.access")
    lines, level = Lines(), access.level
    access.addHandler(lines)  # uvicorn's access logger may not propagate (its config turns that off)
    access.setLevel(logging.INFO)
    try:
        with serving(lambda policy: mcp_http_app(tiny_server, policy), TOKEN, access_log=True) as (_, port):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            statuses = [get(conn, path)[0] for path in paths]
            conn.close()
            deadline = time.monotonic() + 10  # a hang guard: uvicorn logs once the response is sent
            while len(lines.lines) < len(paths) and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    return lines.lines, statuses


@pytest.fixture
def key(tiny_engine) -> str:
    return only_sae(tiny_engine).key


def test_a_token_in_an_uppercase_query_name_never_reaches_the_access_log(tiny_server, key):
    lines, statuses = access_log_of(tiny_server, [f"/features/{key}/2?TOKEN={TOKEN}", f"/?x=1&Token={TOKEN}"])
    assert statuses == [401, 401] and len(lines) == 2, lines
    assert sum(TOKEN in line for line in lines) == 0 and "TOKEN=REDACTED" in lines[0] and "Token=REDACTED" in lines[1]


def test_a_token_in_a_query_name_with_a_plus_never_reaches_the_access_log(tiny_server, key):
    lines, statuses = access_log_of(tiny_server, [f"/features/{key}/2?token+={TOKEN}", f"/?+token={TOKEN}"])
    assert statuses == [401, 401] and len(lines) == 2, lines
    assert sum(TOKEN in line for line in lines) == 0 and sum("=REDACTED" in line for line in lines) == 2


def test_a_token_in_a_query_name_with_a_nul_never_reaches_the_access_log(tiny_server, key):
    lines, statuses = access_log_of(tiny_server, [f"/features/{key}/2?token%00={TOKEN}", f"/?%00token%00={TOKEN}"])
    assert statuses == [401, 401] and len(lines) == 2, lines
    assert sum(TOKEN in line for line in lines) == 0 and "token%00=REDACTED" in lines[0]


def test_the_token_under_any_other_name_or_encoding_never_reaches_the_access_log(tiny_server):
    """The server knows its token: a value holding it (encoded or not) is redacted whatever its name, the login
    itself too; other values stay readable."""
    encoded = "".join(f"%{ord(ch):02X}" for ch in TOKEN)
    lines, statuses = access_log_of(tiny_server, [f"/?tokn={TOKEN}&q=cat", f"/?x={encoded}", f"/?token={TOKEN}"])
    assert statuses == [401, 401, 303] and len(lines) == 3, lines
    assert sum(TOKEN in line or encoded in line for line in lines) == 0
    assert "tokn=REDACTED&q=cat" in lines[0] and "x=REDACTED" in lines[1] and "token=REDACTED" in lines[2]


def test_a_misspelled_token_name_is_refused_saying_how_to_spell_it(tiny_server, key):
    with serving(lambda policy: mcp_http_app(tiny_server, policy), TOKEN) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        status, body = get(conn, f"/features/{key}/2?TOKEN={TOKEN}")
        conn.close()
    assert status == 401 and b"the name is `token`, in lower case and alone, not 'TOKEN'" in body
