"""Caps on the MCP sessions one client address, and all clients together, may hold open, in front of the SDK's
session manager.

Sessions exist on the 2025 (handshake) wire only; the 2026 wire is sessionless and passes through uncounted.
The SDK's streamable-HTTP manager has a global cap (`max_sessions`, 10,000) and an idle expiry
(`session_idle_timeout`); http.py passes the expiry from --session-idle-minutes. The global cap alone lets one
client that opens sessions and never closes them shut everyone else out with 503 (measured: 10,000 unclosed
initializes in 23 s, +400 MB). This middleware counts each client's sessions from what crosses the wire: the
`mcp-session-id` an opening request is answered with, the requests made on it, DELETE, and 404 (the SDK has
forgotten it). An opening request over the cap gets 429 with Retry-After.

The per-client cap alone let a flood from many addresses through (measured: 1,600 sessions from 127.0.0.3-102,
any local process can use the whole 127/8): all clients together may hold at most `total` (--max-sessions) open
sessions, counted the same way; an opening request beyond it gets 503 with Retry-After (the server is full, not
this client over its share). The per-client cap keeps one address from filling it.

It refuses rather than closing the client's oldest idle session: closing would need the SDK's private session
table, and would let a flood end a working client's session behind the same address (a reverse proxy); a refusal
is visible to whoever caused it, and deterministic.

A session counts until the client DELETEs it, the server answers 404 on it, or it has had no request in flight
for the idle expiry, the rule by which the SDK reaps it. Our idle clock starts when the response has been sent,
just after the SDK's, so a session is never counted as gone before the SDK has closed it.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_HEADER = "mcp-session-id"


@dataclass
class _Session:
    client: str
    in_flight: int = 0
    last_active: float = 0.0


class SessionLimiter:
    """ASGI middleware: at most `per_client` open MCP sessions per client address at `path`, and at most `total`
    from all clients together (module doc)."""

    def __init__(self, app: ASGIApp, per_client: int, idle_s: float, path: str = "/mcp",
                 clock: Callable[[], float] = time.monotonic, total: int = 10_000):
        self.app, self.per_client, self.idle_s, self.path, self.clock = app, per_client, idle_s, path, clock
        self.total = total
        self.sessions: dict[str, _Session] = {}
        self.opening: Counter[str] = Counter()  # opening requests not answered yet: a burst cannot slip past

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        # The TCP peer (uvicorn runs without proxy headers: a forwarded address could be forged to dodge the cap).
        client = (scope.get("client") or ("unknown", 0))[0]
        headers = Headers(scope=scope)
        sid, version = headers.get(SESSION_HEADER), headers.get("mcp-protocol-version")
        # The SDK's own routing: a request naming another protocol version is the sessionless (2026) wire, which
        # opens no session, so only counting it would cap a client's concurrent calls instead of its sessions.
        may_open = version is None or version in HANDSHAKE_PROTOCOL_VERSIONS
        if sid is None and scope["method"] == "POST" and may_open:
            await self._open(client, scope, receive, send)
        elif sid is not None and sid in self.sessions:
            await self._use(sid, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def open_sessions(self, client: str | None = None) -> int:
        """Open sessions (opening ones included) of this client address, or of all clients."""
        self._expire()
        if client is None:
            return len(self.sessions) + sum(self.opening.values())
        return sum(s.client == client for s in self.sessions.values()) + self.opening[client]

    def _expire(self) -> None:
        now = self.clock()
        for sid, s in list(self.sessions.items()):
            if s.in_flight == 0 and now - s.last_active >= self.idle_s:
                del self.sessions[sid]

    async def _open(self, client: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.open_sessions(client) >= self.per_client:
            await self._refusal(client)(scope, receive, send)
            return
        if self.open_sessions() >= self.total:
            await self._refusal(None)(scope, receive, send)
            return
        self.opening[client] += 1
        pending, opened = True, None

        async def watch(message: Message) -> None:
            nonlocal pending, opened
            if message["type"] == "http.response.start" and pending:
                pending = False
                self._unopen(client)
                sid = Headers(raw=message.get("headers", [])).get(SESSION_HEADER)
                if message["status"] < 400 and sid:  # the SDK keeps a session exactly when it answers < 400
                    self.sessions[sid] = _Session(client, in_flight=1)
                    opened = sid
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if pending:
                self._unopen(client)
            if opened is not None:
                self._finish(opened, self.sessions.get(opened), None, "POST")

    def _unopen(self, client: str) -> None:
        self.opening[client] -= 1
        if self.opening[client] <= 0:
            del self.opening[client]

    async def _use(self, sid: str, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.sessions[sid]
        session.in_flight += 1
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._finish(sid, session, status[0] if status else None, scope["method"])

    def _finish(self, sid: str, session: _Session | None, status: int | None, method: str) -> None:
        if session is None:
            return
        session.in_flight -= 1
        session.last_active = self.clock()
        ended = status == 404 or (method == "DELETE" and status is not None and status < 400)
        if ended and self.sessions.get(sid) is session:
            del self.sessions[sid]

    def _refusal(self, client: str | None) -> Response:
        """429 for a client over its own cap; 503 (client None) when all clients together hold `total`."""
        now = self.clock()
        idle = [s.last_active + self.idle_s - now for s in self.sessions.values()
                if client in (None, s.client) and s.in_flight == 0]
        retry = max(1, math.ceil(min(idle) if idle else self.idle_s))
        if client is None:
            status, message = 503, (
                f"the server holds {self.total} open MCP sessions, its cap for all clients together "
                f"(--max-sessions): retry after {retry} s, when the oldest idle one expires, or ask whoever runs it "
                "to raise --max-sessions")
        else:
            status, message = 429, (
                f"too many open MCP sessions from {client} (the cap is {self.per_client}, "
                f"--max-sessions-per-client): end unused ones (an MCP client sends DELETE when it closes) or "
                f"retry after {retry} s, when the oldest idle one expires")
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": message}})
        return Response(body, status, {"retry-after": str(retry)}, media_type="application/json")
