"""Attacks on `sae-mcp serve --transport http` and `sae-mcp dashboard`, each named after what it tries.

Most run the real ASGI app in-process (starlette TestClient against mcp_http_app / dashboard_app over the tiny
engine), built as the CLI builds it for a given --host/--port, so a non-loopback bind is tested without binding a
public interface. One test starts the real CLI on stories260K; the port tests time the CLI failing before the
model loads.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import anyio
import pytest
from starlette.testclient import TestClient

from sae_mcp.errors import InvalidInput
from sae_mcp.server.http import dashboard_app, mcp_http_app, page_routes
from sae_mcp.server.security import (
    MAX_PAGE_LOGINS,
    HttpPolicy,
    RedactTokens,
    SecurityMiddleware,
    check_policy,
    is_loopback,
)
from sae_mcp.server.sessions import SessionLimiter
from sae_mcp.services import Services

from helpers.models import STORIES_HF, only_sae
from helpers.servers import free_port, services_at, serving_pages

TOKEN = "test-token-0123456789abcdef"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
BEARER = {"authorization": f"Bearer {TOKEN}"}


def client_for(app, policy: HttpPolicy) -> TestClient:
    """A TestClient that sends the Host a real client of this bind would send (127.0.0.1:PORT)."""
    return TestClient(app, base_url=f"http://127.0.0.1:{policy.port}")


def as_client(app):
    """Lets a test pose as several client addresses: `x-test-client: 10.0.0.7` becomes the ASGI peer address."""

    async def shim(scope, receive, send):
        if scope["type"] == "http":
            peer = dict(scope["headers"]).get(b"x-test-client")
            if peer:
                scope = {**scope, "client": (peer.decode(), 1)}
        await app(scope, receive, send)

    return shim


def initialize(client: TestClient, **headers):
    return client.post("/mcp", json=INIT, headers={**MCP_HEADERS, **headers})


@pytest.fixture
def key(tiny_engine) -> str:
    return only_sae(tiny_engine).key


# ------------------------------------------------------------------------------------------------ the token


def test_no_token_or_a_wrong_token_gets_401_on_mcp_and_on_every_page(tiny_server, key):
    policy = HttpPolicy(token=TOKEN)
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        for headers in ({}, {"authorization": "Bearer wrong-token-0123456789"}, {"authorization": f"Basic {TOKEN}"}):
            r = initialize(c, **headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "mcp-session-id" not in r.headers and r.json()["error"]["message"].startswith("this server needs")
            for path in ("/", f"/features/{key}/2", f"/features/{key}/2?token=wrong-token-0123456789"):
                page = c.get(path, headers=headers, follow_redirects=False)
                assert page.status_code == 401 and "Bearer" in page.headers["www-authenticate"], path


def test_the_right_bearer_token_initializes_mcp_and_opens_the_pages(tiny_server, key):
    policy = HttpPolicy(token=TOKEN)
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        r = initialize(c, **BEARER)
        assert r.status_code == 200 and r.headers["mcp-session-id"] and '"serverInfo"' in r.text
        sid = {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        tools = c.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                       headers={**MCP_HEADERS, **BEARER, **sid})
        assert tools.status_code == 200 and "get_feature_acts" in tools.text
        assert c.get("/", headers=BEARER).status_code == 200
        page = c.get(f"/features/{key}/2", headers=BEARER)
        assert page.status_code == 200 and f"Feature 2 · {key}" in page.text


def test_a_token_in_a_page_url_becomes_a_strict_httponly_cookie_that_opens_pages_but_not_mcp(tiny_server, key):
    policy = HttpPolicy(token=TOKEN)
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        login = c.get(f"/features/{key}/2?token={TOKEN}&x=1", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == f"/features/{key}/2?x=1"  # token dropped
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        jar = {"cookie": cookie.split(";")[0]}
        c.cookies.clear()  # only the explicit header below is sent
        assert c.get(f"/features/{key}/2", headers=jar).status_code == 200
        assert c.get("/", headers=jar).status_code == 200
        assert initialize(c, **jar).status_code == 401  # a browser's ambient cookie never reaches the tools
        assert c.get(f"/mcp?token={TOKEN}", headers=MCP_HEADERS).status_code == 401
        behind_tls = c.get(f"/?token={TOKEN}", headers={"x-forwarded-proto": "https"}, follow_redirects=False)
        assert behind_tls.status_code == 303 and "; Secure" in behind_tls.headers["set-cookie"]


def page_login(c: TestClient, policy: HttpPolicy, path: str = "/") -> dict[str, str]:
    """Log in with ?token= as a browser would -> the cookie header it would send from then on."""
    login = c.get(f"{path}?token={TOKEN}", follow_redirects=False)
    assert login.status_code == 303, login.text
    name, _, value = login.headers["set-cookie"].split(";")[0].partition("=")
    assert name == policy.cookie_name and value
    c.cookies.clear()  # only the explicit header is sent
    return {"cookie": f"{name}={value}"}


def pages_app(services: Services, policy: HttpPolicy, clock=time.monotonic) -> SecurityMiddleware:
    """The pages behind the checks, as dashboard_app builds them, with the page logins' clock given."""
    from starlette.applications import Starlette

    return SecurityMiddleware(Starlette(routes=page_routes(services)), policy, clock=clock)


def test_a_page_cookie_replayed_after_its_lifetime_is_refused(tiny_engine, tmp_path, key):
    """A local listener that received the cookie (browsers do not scope cookies by port) can replay it only for
    its lifetime: here 30 minutes, on a clock the test moves."""
    now = [1000.0]
    policy = HttpPolicy(token=TOKEN, page_cookie_minutes=30)
    app = pages_app(services_at(tiny_engine, tmp_path), policy, clock=lambda: now[0])
    with client_for(app, policy) as c:
        jar = page_login(c, policy)
        now[0] += 29 * 60
        assert c.get(f"/features/{key}/2", headers=jar).status_code == 200  # in use: not extended by it
        now[0] += 60
        refused = c.get(f"/features/{key}/2", headers=jar)
        assert refused.status_code == 401 and "logged in for 30 minutes" in refused.text
        assert len(app.logins) == 0  # forgotten, not only refused
        assert c.get(f"/features/{key}/2", headers=page_login(c, policy)).status_code == 200  # log in again


def test_a_page_cookie_is_refused_after_logout_and_logout_ends_only_that_login(tiny_server, key):
    policy = HttpPolicy(token=TOKEN)
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        mine, other = page_login(c, policy), page_login(c, policy)
        assert mine != other  # random per login, not a function of the token
        out = c.post("/logout", headers=mine)
        assert out.status_code == 200 and out.text.startswith("logged out")
        cleared = out.headers["set-cookie"]
        assert cleared.startswith(f"{policy.cookie_name}=;") and "Max-Age=0" in cleared and "HttpOnly" in cleared
        assert c.get(f"/features/{key}/2", headers=mine).status_code == 401
        assert c.get(f"/features/{key}/2", headers=other).status_code == 200  # another browser stays logged in
        again = c.get("/logout", headers=mine)  # GET too; nothing left to end
        assert again.status_code == 200 and again.text.startswith("no live page login")
        assert c.get("/logout", headers={"origin": "http://evil.example", **other}).status_code == 403
        assert c.get("/", headers=other).status_code == 200  # a foreign page's logout ended nothing


def test_a_restarted_server_refuses_the_page_cookie_of_the_one_before(tiny_server, key):
    policy = HttpPolicy(token=TOKEN)
    with client_for(mcp_http_app(tiny_server, policy), policy) as before:
        jar = page_login(before, policy)
        assert before.get("/", headers=jar).status_code == 200
    with client_for(mcp_http_app(tiny_server, policy), policy) as after:  # same token, same port: a restart
        refused = after.get("/", headers=jar)
        assert refused.status_code == 401 and "needs the server's token" in refused.text
        assert after.get("/", headers=page_login(after, policy)).status_code == 200


def test_a_flood_of_page_logins_keeps_at_most_max_page_logins(tiny_server):
    """Only a token holder logs in, but each login is kept: the store is bounded, the oldest login ends first."""
    policy = HttpPolicy(token=TOKEN)
    app = mcp_http_app(tiny_server, policy)
    with client_for(app, policy) as c:
        jars = [page_login(c, policy) for _ in range(MAX_PAGE_LOGINS + 5)]
        assert len(app.logins) == MAX_PAGE_LOGINS
        assert c.get("/", headers=jars[0]).status_code == 401 and c.get("/", headers=jars[-1]).status_code == 200


# ----------------------------------------------------------------------------------- DNS rebinding, CSRF

BINDS = [
    HttpPolicy(),  # loopback, no token
    HttpPolicy(host="127.0.0.2"),  # the measured hole: the SDK's check was off for any other loopback address
    HttpPolicy(host="0.0.0.0", token=TOKEN),  # as for --host 0.0.0.0 --token (nothing public is bound here)
    HttpPolicy(host="::", token=TOKEN, port=9001),
]


@pytest.mark.parametrize("policy", BINDS, ids=lambda p: p.host)
def test_dns_rebinding_a_foreign_host_gets_421_on_mcp_and_pages_on_every_bind(tiny_server, key, policy):
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        foreign = ("evil.example", f"evil.example:{policy.port}", "127.0.0.1:1", f"localhost.evil:{policy.port}")
        for host in foreign:
            assert initialize(c, host=host, **BEARER).status_code == 421, host
            for path in ("/", f"/features/{key}/2"):
                assert c.get(path, headers={"host": host, **BEARER}).status_code == 421, (host, path)
        for host in (f"localhost:{policy.port}", f"[::1]:{policy.port}", f"LOCALHOST:{policy.port}"):
            assert c.get("/", headers={"host": host, **BEARER}).status_code == 200, host


@pytest.mark.parametrize("policy", BINDS, ids=lambda p: p.host)
def test_csrf_a_foreign_origin_gets_403_on_mcp_and_pages_on_every_bind(tiny_server, key, policy):
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        for origin in ("http://evil.example", f"http://127.0.0.1:{policy.port}", "null"):
            assert initialize(c, origin=origin, **BEARER).status_code == 403, origin
            for path in ("/", f"/features/{key}/2"):
                assert c.get(path, headers={"origin": origin, **BEARER}).status_code == 403, (origin, path)


def test_allow_host_and_allow_origin_let_a_named_proxy_and_page_in_and_nothing_else(tiny_server):
    policy = HttpPolicy(host="0.0.0.0", token=TOKEN, allow_hosts=("gpu.example", "10.0.0.5:8765"),
                        allow_origins=("https://notebook.example",))
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        for host in ("gpu.example", "gpu.example:443", "10.0.0.5:8765"):
            assert c.get("/", headers={"host": host, **BEARER}).status_code == 200, host
        assert c.get("/", headers={"host": "10.0.0.5:9999", **BEARER}).status_code == 421
        assert c.get("/", headers={"host": "gpu.example"}).status_code == 401  # an allowed name still needs the token
        ok = initialize(c, origin="https://notebook.example", **BEARER)
        assert ok.status_code == 200
        assert initialize(c, origin="https://notebook.example.evil", **BEARER).status_code == 403


def test_a_non_loopback_bind_without_a_token_is_refused_unless_insecure_no_auth_which_warns(caplog):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
        check_policy(HttpPolicy(host=host))
    for host in ("0.0.0.0", "::", "192.168.1.4", "myhost.local"):
        assert not is_loopback(host)
        with pytest.raises(InvalidInput, match="not a loopback address and no token"):
            check_policy(HttpPolicy(host=host))
        check_policy(HttpPolicy(host=host, token=TOKEN))
    with caplog.at_level(logging.WARNING, logger="sae_mcp"):
        check_policy(HttpPolicy(host="0.0.0.0", insecure_no_auth=True))
    assert "WITHOUT AUTHENTICATION" in caplog.text
    for bad in ("short", "has space in it 0123456", "quote\"0123456789abcdef"):
        with pytest.raises(InvalidInput, match="token must be"):
            check_policy(HttpPolicy(token=bad))


# ------------------------------------------------------------------------------------------- session flood


def test_session_flood_from_one_address_gets_429_over_its_cap_and_other_clients_still_get_in(tiny_server):
    policy = HttpPolicy(max_sessions_per_client=3)
    with client_for(as_client(mcp_http_app(tiny_server, policy)), policy) as c:
        opened = [initialize(c, **{"x-test-client": "10.0.0.66"}) for _ in range(3)]
        assert all(r.status_code == 200 for r in opened)
        for _ in range(20):  # the flood: refused at once, nothing is created
            over = initialize(c, **{"x-test-client": "10.0.0.66"})
            assert over.status_code == 429 and "mcp-session-id" not in over.headers
        message = over.json()["error"]["message"]
        assert "too many open MCP sessions from 10.0.0.66" in message and "--max-sessions-per-client" in message
        assert 1 <= int(over.headers["retry-after"]) <= 600
        assert initialize(c, **{"x-test-client": "10.0.0.7"}).status_code == 200  # another client is unaffected
        gone = c.delete("/mcp", headers={"mcp-session-id": opened[0].headers["mcp-session-id"],
                                         "mcp-protocol-version": "2025-06-18", "x-test-client": "10.0.0.66"})
        assert gone.status_code == 200
        assert initialize(c, **{"x-test-client": "10.0.0.66"}).status_code == 200  # the closed one made room


def test_a_session_flood_from_many_addresses_gets_503_at_the_global_cap_and_a_closed_session_makes_room(
        tiny_server):
    """Any local process can use the whole of 127/8 (1,600 sessions from 127.0.0.3-102 were accepted): all clients
    together hold at most --max-sessions; each address stays under its own cap too."""
    policy = HttpPolicy(max_sessions_per_client=2, max_sessions=5)
    with client_for(as_client(mcp_http_app(tiny_server, policy)), policy) as c:
        opened = [initialize(c, **{"x-test-client": f"127.0.0.{3 + i // 2}"}) for i in range(5)]
        assert [r.status_code for r in opened] == [200] * 5
        refused = [initialize(c, **{"x-test-client": f"127.0.0.{10 + i}"}) for i in range(20)]
        assert {r.status_code for r in refused} == {503} and not any("mcp-session-id" in r.headers for r in refused)
        message = refused[0].json()["error"]["message"]
        assert "holds 5 open MCP sessions" in message and "--max-sessions" in message
        assert 1 <= int(refused[0].headers["retry-after"]) <= 600
        assert initialize(c, **{"x-test-client": "127.0.0.3"}).status_code == 429  # its own cap comes first
        gone = c.delete("/mcp", headers={"mcp-session-id": opened[4].headers["mcp-session-id"],
                                         "mcp-protocol-version": "2025-06-18", "x-test-client": "127.0.0.5"})
        assert gone.status_code == 200
        assert initialize(c, **{"x-test-client": "127.0.0.99"}).status_code == 200
        assert initialize(c, **{"x-test-client": "127.0.0.98"}).status_code == 503


def test_session_and_cookie_limits_out_of_bounds_are_refused_saying_what_to_give():
    for bad in (dict(max_sessions=0), dict(max_sessions_per_client=0), dict(max_sessions=10_001),
                dict(max_sessions_per_client=20, max_sessions=10)):
        with pytest.raises(InvalidInput, match=r"give 1 <= --max-sessions-per-client .* <= 10000"):
            check_policy(HttpPolicy(**bad))
    for minutes in (0, -1, float("nan"), float("inf"), 24 * 60 + 1):
        with pytest.raises(InvalidInput, match="--page-cookie-minutes .* at most 1440"):
            check_policy(HttpPolicy(page_cookie_minutes=minutes))
    with pytest.raises(InvalidInput, match="--session-idle-minutes"):
        check_policy(HttpPolicy(session_idle_minutes=0))
    check_policy(HttpPolicy(max_sessions_per_client=16, max_sessions=16, page_cookie_minutes=24 * 60))


def test_idle_sessions_expire_and_free_their_place_under_the_cap(tiny_server):
    policy = HttpPolicy(max_sessions_per_client=1, session_idle_minutes=0.05)  # 3 s
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        first = initialize(c)
        assert first.status_code == 200
        refused = initialize(c)
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 3
        time.sleep(4.5)
        ping = c.post("/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "ping"},
                      headers={**MCP_HEADERS, "mcp-session-id": first.headers["mcp-session-id"],
                               "mcp-protocol-version": "2025-06-18"})
        assert ping.status_code == 404  # the SDK closed it after the idle expiry
        assert initialize(c).status_code == 200


@pytest.mark.parametrize("wire, admitted, kept", [([], 4, 4), ([(b"mcp-protocol-version", b"2026-07-28")], 12, 0)],
                         ids=["2025-sessions", "2026-sessionless"])
def test_a_burst_of_simultaneous_initializes_cannot_slip_past_the_cap(wire, admitted, kept):
    """Opening requests still being answered count against the cap, so a burst admits exactly `cap`; requests on
    the sessionless 2026 wire open no session and are not capped (that would cap concurrent calls)."""
    release, reached = anyio.Event(), []

    async def slow_sdk(scope, receive, send):
        reached.append(scope)
        await release.wait()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"mcp-session-id", f"s{len(reached)}-{id(scope)}".encode())]})
        await send({"type": "http.response.body", "body": b"{}"})

    limiter = SessionLimiter(slow_sdk, per_client=4, idle_s=600)
    statuses: list[int] = []

    async def one():
        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "path": "/mcp", "method": "POST", "headers": wire, "client": ("10.0.0.9", 1)}
        await limiter(scope, None, send)

    async def burst():
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(one)
            await anyio.wait_all_tasks_blocked()
            release.set()

    anyio.run(burst)
    assert len(reached) == admitted and sorted(statuses) == [200] * admitted + [429] * (12 - admitted)
    assert limiter.open_sessions("10.0.0.9") == kept


# ------------------------------------------------------------------------------------- what the pages send


def test_pages_carry_a_csp_that_runs_only_the_test_box_script_by_hash_nosniff_and_no_referrer(tiny_server, key):
    """The one script (the feature page's test box) runs by its SHA-256; no 'unsafe-inline' script, no handler
    attributes, so an injected <script> or on* attribute would not run; the feature box is a plain GET form."""
    import base64
    import hashlib
    import re

    policy = HttpPolicy()
    with client_for(mcp_http_app(tiny_server, policy), policy) as c:
        for path in ("/", f"/features/{key}/2", f"/features/{key}/99999"):
            page = c.get(path)
            csp = page.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
            script_src = re.search(r"script-src ([^;]*)", csp).group(1).split()
            assert len(script_src) == 1 and script_src[0].startswith("'sha256-"), csp
            assert page.headers["x-content-type-options"] == "nosniff"
            assert page.headers["referrer-policy"] == "no-referrer"
            assert not re.search(r"<[^>]+\son[a-z]+=", page.text), path  # no inline event handlers
            for body in re.findall(r"<script>(.*?)</script>", page.text, re.S):
                digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
                assert script_src[0] == f"'sha256-{digest}'", path
        assert "<script>" in c.get(f"/features/{key}/2").text and "<script" not in c.get("/").text
        assert f"<form action='/features/{key}/' method='get'>" in c.get("/").text
        jump = c.get(f"/features/{key}/?f=5", follow_redirects=False)
        assert jump.status_code == 303 and jump.headers["location"] == f"/features/{key}/5"
        assert c.get(f"/features/{key}/?f=five").status_code == 404


def test_html_injected_through_a_label_stays_escaped_on_the_pages(tiny_engine, tmp_path, key):
    services = services_at(tiny_engine, tmp_path)
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    services.explanations.add_label(only_sae(tiny_engine).store_key, 4, evil, evidence="</li><script>x()</script>")
    policy = HttpPolicy(token=TOKEN)
    with client_for(dashboard_app(services, policy), policy) as c:
        for path in ("/", f"/features/{key}/4"):
            text = c.get(path, headers=BEARER).text
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, path
            assert text.count("<script") == (1 if "features" in path else 0) and "<img" not in text, path
        assert c.get("/").status_code == 401  # the dashboard is behind the same token


def test_the_access_log_never_shows_a_token():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", f"/features/a/1?x=1&token={TOKEN}", "1.1", 303), None)
    RedactTokens().filter(record)
    assert TOKEN not in record.getMessage() and "token=REDACTED" in record.getMessage()
    # parse_qsl decodes keys, so `tok%65n=` logs a page in as well: it is redacted too; other values stay
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", f"/?q=a&tok%65n={TOKEN}&tokens=7", "1.1", 303), None)
    RedactTokens().filter(record)
    assert TOKEN not in record.getMessage() and "q=a&tok%65n=REDACTED&tokens=7" in record.getMessage()


@pytest.mark.parametrize("path", ["//evil.example/x", "/\\evil.example/x", "///evil.example"])
def test_the_token_redirect_never_leaves_this_server(path):
    """`?token=` on a path like //evil.example: the redirect must stay on this host (a Location of
    //evil.example is protocol-relative: the browser would go there, cookie set, token in hand)."""
    policy = HttpPolicy(token=TOKEN)
    sent: list[dict] = []

    async def run():
        async def app(scope, receive, send):  # never reached: the redirect answers first
            raise AssertionError("the app was called")

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
                 "query_string": f"token={TOKEN}".encode(), "client": ("127.0.0.1", 1),
                 "headers": [(b"host", f"127.0.0.1:{policy.port}".encode())]}
        await SecurityMiddleware(app, policy)(scope, receive, send)

    anyio.run(run)
    assert sent[0]["status"] == 303
    location = dict(sent[0]["headers"])[b"location"].decode()
    assert location.startswith("/") and location[1:2] not in ("/", "\\"), location


# ---------------------------------------------------------------------------------------- a real browser


def test_a_person_opens_the_dashboard_in_chromium_with_the_token_once_in_the_url(tiny_engine, tmp_path, key):
    """The page URL with ?token= redirects with the cookie set; the browser follows and renders the card, and the
    test box's script reaches its JSON endpoint with that cookie."""
    from helpers.browser import CHROMIUM, NO_CHROMIUM, dump_dom

    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    services = services_at(tiny_engine, tmp_path / "data")
    with serving_pages(services, token=TOKEN) as base:
        opened = dump_dom(f"{base}/features/{key}/6?token={TOKEN}&text=the%20cat%20sat", tmp_path / "p1", 8000)
        assert f"Feature 6 · {key}" in opened
        # the test box's script fetched its JSON with the cookie (same origin: no Origin header to refuse)
        box = opened[opened.index('id="test-out"') : opened.index('id="test-top"')]
        assert box.count("data-act=") == 4, box  # <s> the cat sat
        refused = dump_dom(f"{base}/features/{key}/6", tmp_path / "p2")  # a fresh browser has no cookie
        assert "needs the server's token" in refused and "Feature 6" not in refused


# ------------------------------------------------------------------------------------------------ the CLI

ENV_CLI = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sae_mcp", *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **ENV_CLI, **(env or {})}, stdin=subprocess.DEVNULL)
    return out, time.monotonic() - start


@pytest.mark.parametrize("command", [["serve", "--transport", "http"], ["dashboard"]], ids=["serve", "dashboard"])
def test_a_bad_port_a_port_in_use_or_an_open_bind_fail_with_one_line_before_the_model_loads(
        command, tmp_path):
    # A model folder that does not exist: were it loaded first, the message would be about the model.
    model = ["--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--data-dir", str(tmp_path)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = {
            "not a TCP port": ["--port", "99999"],
            "already in use": ["--port", str(taken.getsockname()[1])],
            "not a loopback address": ["--host", "0.0.0.0", "--port", str(free_port())],
        }
        for needle, flags in cases.items():
            out, seconds = run_cli(*command, *flags, *model, env={"SAE_MCP_TOKEN": ""})
            assert out.returncode == 2, (needle, out.stderr[-1500:])
            assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and needle in out.stderr
            # before the model loads: the model folder does not exist, so a later check would report that instead
            assert out.stdout == "", (needle, seconds)
            print(f"\n{command[0]}, {needle}: exit 2 after {seconds:.1f} s (the interpreter's start included)")


def serve_http(flags: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`sae-mcp serve --transport http` on a free port -> (the process, its base URL). A port found free can be
    taken by another process before the server binds it (other test runs share the machine): the server then
    exits at once saying so, and starts again on another port."""
    for _ in range(5):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "sae_mcp", "serve", "--transport", "http", "--port", str(port),
                                 *flags], env={**os.environ, **ENV_CLI, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while proc.poll() is None:  # it listens once the model is loaded; it exits at once if the port was taken
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return proc, f"http://127.0.0.1:{port}"
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"the server did not listen within 240 s: {proc.communicate()[1][-2000:]!r}")
            time.sleep(0.2)
        stderr = proc.communicate()[1].decode(errors="replace")
        assert "already in use" in stderr, stderr[-2000:]
    raise AssertionError("no free port in five tries")


def test_serve_http_with_a_token_refuses_strangers_and_serves_the_client_that_sends_it(stories_sae_dir, tmp_path):
    import httpx2
    import requests
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    proc, url = serve_http(["--access-log", "--model", str(STORIES_HF), "--sae", f"res2={stories_sae_dir}",
                            "--device", "cpu", "--data-dir", str(tmp_path)], {"SAE_MCP_TOKEN": TOKEN})
    try:
        assert requests.get(f"{url}/", timeout=30).status_code == 401
        assert requests.get(f"{url}/", headers={"host": "evil.example"}, timeout=30).status_code == 421
        login = requests.get(f"{url}/features/res2/3?token={TOKEN}", timeout=30)  # follows the redirect
        assert login.status_code == 200 and "res2" in login.text

        async def session():
            timeout = httpx2.Timeout(30, read=300)  # as docs/security.md tells a client to connect
            async with httpx2.AsyncClient(headers=BEARER, timeout=timeout) as http:
                async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
                    return await client.call_tool("get_feature_acts", {"prompt": "Once upon a time", "top_k": 2})

        assert anyio.run(session).structured_content["tokens"][0] == "<s>"
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
    assert stdout == b""  # stdout carries nothing in HTTP mode, the access log included
    assert b"token=REDACTED" in stderr and TOKEN.encode() not in stderr
