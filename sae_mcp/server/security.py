"""Who may talk to the HTTP server: the bind rules, a bearer token, Host/Origin checks and the pages' headers.

Threat model (docs/security.md): local processes and network peers that reach the port, and web pages in the
user's browser (DNS rebinding: a page on evil.example re-resolves its name to 127.0.0.1 and reads our answers;
CSRF: a page makes the browser send requests here). Every HTTP request goes through SecurityMiddleware, in this
order, before any route or the MCP SDK sees it:

1. Host must name this server (421 otherwise): the bound host and the localhost forms with the port, plus
   --allow-host. A rebinding page's requests carry its own name, so this alone stops it reading anything.
2. Origin, when present, must be listed with --allow-origin (403 otherwise). Non-browser clients send none.
3. With a token: `Authorization: Bearer TOKEN` (compared in constant time), else 401. Pages also take the token
   once as `?token=` (answered by a redirect that sets an HttpOnly, SameSite=Strict cookie) and then the cookie.
   The cookie is a random page login kept in this process's memory (PageLogins): it expires after
   --page-cookie-minutes, /logout revokes it, a restart revokes them all. It is never accepted on /mcp: MCP
   clients send the header, and a browser's ambient credential must not reach the tools. Browsers do not scope
   cookies by port, so any other local listener the browser visits receives it: its lifetime is what bounds
   such a replay (of the pages and their test box, which runs the model).

The SDK's own DNS-rebinding check only covers /mcp and is only on when --host is literally a localhost form;
http.py turns it off in favour of this one, which covers every route on every bind.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus, urlencode

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sae_mcp.errors import InvalidInput
from sae_mcp.pages.assets import SCRIPT_HASH

log = logging.getLogger("sae_mcp")

LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
TOKEN_RE = re.compile(r"[A-Za-z0-9._~-]{16,}")  # travels unescaped in a header, a URL query and a cookie
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
# One script runs on the pages, the feature page's test box, allowed by its hash (never 'unsafe-inline': an
# injected <script> or on* attribute would not run); it fetches only from this server. Inline CSS (a <style> and
# style attributes: the token shading) is all else they use; nothing loads from anywhere.
CSP = (f"default-src 'none'; script-src '{SCRIPT_HASH}'; connect-src 'self'; style-src 'unsafe-inline'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
SDK_MAX_SESSIONS = 10_000  # the SDK's own global cap on MCP sessions (answered 503 beyond it)
MAX_PAGE_COOKIE_MINUTES = 24 * 60
MAX_PAGE_LOGINS = 64  # live page cookies kept; a login beyond it ends the oldest (only a token holder logs in)
LOGOUT_PATH = "/logout"


@dataclass(frozen=True)
class HttpPolicy:
    """How one HTTP server is exposed: built from the serve/dashboard flags (cli_common.bind_http)."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    allow_hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    max_sessions_per_client: int = 16
    max_sessions: int = 256  # all clients together: ~40 kB each (measured: 10,000 sessions, +400 MB)
    session_idle_minutes: float = 10.0
    page_cookie_minutes: float = 60.0
    mcp_path: str = "/mcp"

    @property
    def cookie_name(self) -> str:
        # Browsers share cookies across ports of one host: two servers on one machine must not clobber each other.
        return f"sae_mcp_auth_{self.port}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_policy(p: HttpPolicy) -> None:
    """Refuse what would expose the tools by mistake; one-line InvalidInput messages (the CLI exits 2)."""
    if not 1 <= p.port <= 65535:
        raise InvalidInput(f"--port {p.port} is not a TCP port: give 1..65535")
    if p.token is not None and not TOKEN_RE.fullmatch(p.token):
        raise InvalidInput(f"the token must be 16 or more of A-Z a-z 0-9 . _ ~ - (make one: {MAKE_TOKEN})")
    if not 1 <= p.max_sessions_per_client <= p.max_sessions <= SDK_MAX_SESSIONS:
        raise InvalidInput(f"give 1 <= --max-sessions-per-client ({p.max_sessions_per_client}) <= --max-sessions "
                           f"({p.max_sessions}) <= {SDK_MAX_SESSIONS} (the SDK's own cap)")
    if not (math.isfinite(p.session_idle_minutes) and p.session_idle_minutes > 0):
        raise InvalidInput(f"--session-idle-minutes {p.session_idle_minutes} must be > 0")
    if not (math.isfinite(p.page_cookie_minutes) and 0 < p.page_cookie_minutes <= MAX_PAGE_COOKIE_MINUTES):
        raise InvalidInput(f"--page-cookie-minutes {p.page_cookie_minutes} must be > 0 and at most "
                           f"{MAX_PAGE_COOKIE_MINUTES} (a day): the cookie's lifetime bounds its replay")
    if p.token is None and not is_loopback(p.host):
        if not p.insecure_no_auth:
            raise InvalidInput(
                f"--host {p.host} is not a loopback address and no token is set: anyone who reaches the port could "
                "run every tool. Pass --token (or set SAE_MCP_TOKEN), or --insecure-no-auth on a trusted network")
        log.warning("!!! INSECURE: serving on %s:%d WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who reaches "
                    "this port can run every tool, write labels and start scans !!!", p.host, p.port)


def reserve_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, before the model loads, so a bad or taken port fails at once; uvicorn
    listens on this very socket later, so nothing can take the port in between.

    The protocol is named (IPPROTO_TCP, not 0): asyncio sets TCP_NODELAY on an accepted connection only when the
    listening socket's proto says TCP (base_events._set_nodelay), and accepted sockets inherit it. With proto 0
    Nagle held back each response's second write until the client's delayed ACK: measured, every request after
    the first on a kept-alive connection took ~43 ms instead of ~0.8 ms for a small page, and an MCP model_info
    call ~45 ms instead of ~3.5 ms (bench/bench_keepalive.py)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        reason = "it is already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise InvalidInput(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _split_port(host: str) -> tuple[str, str | None]:
    """'Name:8765' -> ('name', '8765'); '[::1]:8765' -> ('[::1]', '8765'); 'name' -> ('name', None)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return (f"[{host}]" if ":" in host else host), None  # a bare IPv6 address


class HostRule:
    """Host header values this server answers to: exact NAME:PORT pairs, and --allow-host names given without a
    port, on any port (only the name matters against DNS rebinding; a tunnel or proxy may change the port)."""

    def __init__(self, p: HttpPolicy):
        bound, _ = _split_port(p.host)
        names = {bound, *LOCAL_NAMES}
        self.exact = {f"{n}:{p.port}" for n in names} | (names if p.port == 80 else set())
        self.any_port: set[str] = set()
        for entry in p.allow_hosts:
            name, port = _split_port(entry)
            if port:
                self.exact.add(f"{name}:{port}")
            else:
                self.any_port.add(name)

    def allows(self, host: str | None) -> bool:
        if not host:
            return False
        host = host.strip().lower()
        return host in self.exact or _split_port(host)[0] in self.any_port


class PageLogins:
    """The page cookies one server handed out: random values, not derived from the token, kept in memory only (a
    restart revokes them all), each valid for `lifetime_s` from its login whatever is done with it (a cookie in
    use is not extended: the lifetime bounds a replay), and revoked by /logout. At most MAX_PAGE_LOGINS live; a
    login beyond that ends the oldest. Kept by their SHA-256, so how long a lookup takes says nothing about a
    live value. Used on the event loop only (the middleware), so it needs no lock."""

    def __init__(self, lifetime_s: float, clock: Callable[[], float] = time.monotonic):
        self.lifetime_s, self.clock = lifetime_s, clock
        self._expiry: dict[str, float] = {}  # sha256 of a cookie -> when it expires; oldest login first

    def issue(self) -> str:
        self._expire()
        while len(self._expiry) >= MAX_PAGE_LOGINS:
            del self._expiry[next(iter(self._expiry))]
        value = secrets.token_urlsafe(32)
        self._expiry[_digest(value)] = self.clock() + self.lifetime_s
        return value

    def valid(self, value: str | None) -> bool:
        if not value:
            return False
        expiry = self._expiry.get(_digest(value))
        if expiry is None:
            return False
        if self.clock() >= expiry:
            del self._expiry[_digest(value)]
            return False
        return True

    def revoke(self, value: str | None) -> bool:
        """End this login; whether it was live."""
        return value is not None and value != "" and self._expiry.pop(_digest(value), None) is not None

    def __len__(self) -> int:
        self._expire()
        return len(self._expiry)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, expiry in self._expiry.items() if now >= expiry]:
            del self._expiry[key]


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _bearer(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def _deny(status: int, message: str, mcp: bool) -> Response:
    """A refusal: a JSON-RPC error body on /mcp (what MCP clients parse), plain text on the pages."""
    headers = {"www-authenticate": 'Bearer realm="sae-mcp"'} if status == 401 else None
    if mcp:
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32001, "message": message}})
        return Response(body, status, headers, media_type="application/json")
    return PlainTextResponse(message, status, headers)


def _set_cookie(scope: Scope, name: str, value: str, clear: bool = False) -> str:
    """The Set-Cookie value: HttpOnly, SameSite=Strict, the whole site; Secure behind a TLS proxy that says so. A
    session cookie (no Max-Age: the browser drops it when it closes; the server ends it after its lifetime), or
    with `clear` an expired one, which the browser deletes."""
    tls = Headers(scope=scope).get("x-forwarded-proto", "").lower() == "https"
    return (f"{name}={value}; HttpOnly; SameSite=Strict; Path=/" + ("; Max-Age=0" if clear else "")
            + ("; Secure" if tls else ""))


def _login_redirect(scope: Scope, query: list[tuple[str, str]], name: str, value: str) -> Response:
    """`?token=` on a page: set the cookie and send the browser to the same URL without the token, so the token
    leaves the address bar and history at once."""
    path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    path = "/" + path.lstrip("/\\")  # '//evil.example' or '/\\evil.example' would send the browser off-site
    rest = urlencode([(k, v) for k, v in query if k != "token"])
    location = path + (f"?{rest}" if rest else "")
    return Response(status_code=303, headers={"location": location, "set-cookie": _set_cookie(scope, name, value)})


def _logout(scope: Scope, logins: PageLogins, name: str) -> Response:
    """/logout (any method, no token needed: it can only end the login whose cookie it is sent): the server forgets
    this browser's page login and the browser deletes the cookie. A cross-site page cannot end yours: a
    SameSite=Strict cookie is not sent with its requests."""
    ended = logins.revoke(_cookie(Headers(scope=scope), name))
    message = ("logged out: this browser's page login is ended; open a page as URL?token=TOKEN to log in again"
               if ended else "no live page login came with this request (it had expired or was ended already)")
    return PlainTextResponse(message, 200, {"set-cookie": _set_cookie(scope, name, "", clear=True),
                                            "cache-control": "no-store"})


def secure_send(send: Send) -> Send:
    """Adds the page headers to every response: the CSP (only HTML documents heed it), nosniff, no-referrer."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers += [*PAGE_HEADERS, (b"content-security-policy", CSP.encode())]
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


class SecurityMiddleware:
    """ASGI middleware in front of the whole app (MCP and pages): Host, Origin, then the token (module doc)."""

    def __init__(self, app: ASGIApp, policy: HttpPolicy, clock: Callable[[], float] = time.monotonic):
        self.app, self.policy = app, policy
        self.hosts = HostRule(policy)
        self.origins = {o.strip().lower().rstrip("/") for o in policy.allow_origins}
        self.logins = PageLogins(policy.page_cookie_minutes * 60, clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websocket routes exist; refuse rather than reason about them
            await send({"type": "websocket.close", "code": 1008})
            return
        send = secure_send(send)
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        mcp = scope["path"].rstrip("/") == self.policy.mcp_path
        host = headers.get("host")
        if not self.hosts.allows(host):
            return _deny(421, f"this server does not answer to Host {host!r}: open it as http://127.0.0.1:"
                         f"{self.policy.port}/ or start it with --allow-host NAME", mcp)
        origin = headers.get("origin")
        if origin is not None and origin.strip().lower().rstrip("/") not in self.origins:
            return _deny(403, f"requests from Origin {origin!r} are refused: start the server with "
                         "--allow-origin ORIGIN to let that page call it", mcp)
        if scope["path"].rstrip("/") == LOGOUT_PATH:
            return _logout(scope, self.logins, self.policy.cookie_name)
        token = self.policy.token
        if token is None or _same(_bearer(headers), token):
            return None
        if mcp:  # the header only: a browser's cookie must never reach the tools
            return _deny(401, "this server needs Authorization: Bearer TOKEN (its --token / SAE_MCP_TOKEN)", mcp)
        if self.logins.valid(_cookie(headers, self.policy.cookie_name)):
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if _same(dict(query).get("token"), token):
            return _login_redirect(scope, query, self.policy.cookie_name, self.logins.issue())
        misspelled = [k for k, _ in query if k != "token" and _reads_as_token(k)]
        hint = f" (the name is `token`, in lower case and alone, not {misspelled[0]!r})" if misspelled else ""
        minutes = f"{self.policy.page_cookie_minutes:g}"
        return _deny(401, f"this page needs the server's token: open it once as URL?token=TOKEN{hint} (a cookie "
                     f"then keeps you logged in for {minutes} minutes, until /logout or a restart), or send "
                     "Authorization: Bearer TOKEN", mcp)


_QUERY_PAIR = re.compile(r"([?&])([^=&\s\"]*)=([^&\s\"]*)")
REDACTED = "REDACTED"


def _reads_as_token(name: str) -> bool:
    """Whether a decoded query name is `token`, case and everything but letters aside: `TOKEN`, `token ` (from
    `token+`) and `token\x00` do not log a page in (the request is refused) but carry the token all the same.
    `tokens` is another name."""
    return re.sub(r"[^a-z]", "", name.lower()) == "token"


def _names_token(raw_key: str) -> bool:
    """_reads_as_token on a raw (still URL-encoded) query name: `tok%65n`, `TOKEN`, `token+`, `token%00`."""
    return _reads_as_token(unquote_plus(raw_key))


def _redact(text: str, token: str | None = None) -> str:
    """Every query value under a name that reads as `token` -> REDACTED; with the server's token known, also any
    query value holding it once decoded (`?t=...`, `?x=%74est...`) and any plain occurrence of it (a path)."""

    def pair(m: re.Match) -> str:
        hidden = _names_token(m[2]) or (token is not None and token in unquote_plus(m[3]))
        return f"{m[1]}{m[2]}={REDACTED}" if hidden else m[0]

    text = _QUERY_PAIR.sub(pair, text)
    return text.replace(token, REDACTED) if token else text


class RedactTokens(logging.Filter):
    """uvicorn's access log line holds the query string: no token given in the URL reaches a log (_redact)."""

    def __init__(self, token: str | None = None):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a, self.token) if isinstance(a, str) else a for a in record.args)
        return True
