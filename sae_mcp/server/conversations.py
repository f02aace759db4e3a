"""Which conversation a tool call came in: the MCP face finds it in the request context, and hands the ledger and
the scoring checks a plain session id.

    Conversations()                 one per server (build_server)
      .session_of(context)          (session id, the client's name): one id per client connection (a stdio pipe, an
                                    in-memory client, an MCP HTTP session; on sessionless HTTP, one per client program
                                    and server run), else this server's own (a call without a request, e.g. a test
                                    calling the server directly)
      .id_of(context)               the session id alone, or None when it cannot be told
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

from mcp.server.mcpserver import Context

from sae_mcp.ledger.recording import new_id

log = logging.getLogger(__name__)

MAX_TEXT_KEYS = 10_000  # HTTP sessions remembered: a long-running server must not grow with every one ever opened


def conversation_of(context: Context | None) -> tuple[object | None, str | None]:
    """(what every call of one conversation shares, the client's name) from a tool call's context.

    On the 2026 wire every request gets a Connection (and on a JSON-RPC pipe a TransportContext) of its own, so
    neither says which calls belong together. What lasts as long as the client: an MCP HTTP session's id; on a pipe
    (stdio) the JSON-RPC dispatcher reading it; in process (the SDK's in-memory client) its transport context.
    Sessionless HTTP has none of these, so its calls are grouped by the client program's name and version."""
    request = getattr(context, "_request_context", None) if context is not None else None
    session = getattr(request, "session", None)
    conn = getattr(session, "_connection", None)
    if conn is None:
        return None, None
    info = getattr(getattr(conn, "client_params", None), "client_info", None)
    client = f"{info.name} {info.version}".strip() if info is not None else None
    if getattr(conn, "session_id", None):
        return f"mcp-session:{conn.session_id}", client
    outbound = getattr(session, "_request_outbound", None)
    inner = getattr(outbound, "_inner", outbound)
    transport = getattr(inner, "transport", None)
    if "http" in str(getattr(transport, "kind", "")):
        return (f"http-client:{client}" if client else None), client
    for key in (getattr(inner, "_dispatcher", None), transport):
        if key is not None:
            return key, client
    return None, client


class IdentityMap:
    """object -> value by identity, without keeping the object alive (the transport contexts are frozen
    dataclasses: equal by value, so two clients' would collide as dict keys). Strings are keys by value."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Callable[[], object], str]] = {}  # id -> (a reference to the key, value)
        self._by_text: dict[str, str] = {}

    def get(self, key: object) -> str | None:
        if isinstance(key, str):
            return self._by_text.get(key)
        found = self._by_id.get(id(key))
        return found[1] if found and found[0]() is key else None

    def put(self, key: object, value: str) -> None:
        if isinstance(key, str):  # an HTTP session id or a client's name: the newest MAX_TEXT_KEYS are kept
            self._by_text[key] = value
            if len(self._by_text) > MAX_TEXT_KEYS:
                del self._by_text[next(iter(self._by_text))]  # the oldest (dicts keep insertion order)
            return
        if len(self._by_id) > 1024:  # drop the entries of connections that are gone
            self._by_id = {k: v for k, v in self._by_id.items() if v[0]() is not None}
        ref: Callable[[], object]
        try:
            ref = weakref.ref(key)
        except TypeError:
            ref = (lambda obj: lambda: obj)(key)  # not weakly referable: kept alive (rare; bounded by clients)
        self._by_id[id(key)] = (ref, value)


class Conversations:
    """The session id of each conversation this server answers (the ledger files runs under it)."""

    def __init__(self) -> None:
        self._ids = IdentityMap()  # a conversation's transport (or its HTTP session id) -> session id
        self._own = new_id("s", 10)  # calls made without a connection (tests calling the server directly)
        self._lock = threading.Lock()

    def session_of(self, context: Context | None) -> tuple[str, str | None]:
        """(session id, client name) of the conversation a call came in (the module's docstring says which)."""
        key, client = conversation_of(context)
        if key is None:
            return self._own, client
        with self._lock:
            sid = self._ids.get(key)
            if sid is None:
                sid = new_id("s", 10)
                self._ids.put(key, sid)
        return sid, client

    def id_of(self, context: Context | None) -> str | None:
        """The session id alone; None when it cannot be told (logged): the blind-scoring look-up check then reads
        the conversation a blind set was handed to only."""
        try:
            return self.session_of(context)[0]
        except Exception:
            log.warning("no conversation id for this call", exc_info=True)
            return None
