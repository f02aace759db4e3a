"""Who may talk to the HTTP server: the bind rules, a bearer token, Host/Origin checks and the pages' headers.

Threat model (README "Security"): local processes and network peers that reach the port, and web pages in the
user's browser (DNS rebinding: a page on evil.example re-resolves its name to 127.0.0.1 and reads our answers;
CSRF: a page makes the browser send requests here). Every HTTP request goes through SecurityMiddleware, in this
order, before any route or the MCP SDK sees it:

1. Host must name this server (421 otherwise): the bound host and the localhost forms with the port, plus
   --allow-host. A rebinding page's requests carry its own name, so this alone stops it reading anything.
2. Origin, when present, must be listed with --allow-origin (403 otherwise). Non-browser clients send none.
3. With a token: `Authorization: Bearer TOKEN` (compared in constant time), else 401. Pages also take the token
   once as `?token=` (answered by a redirect that sets an HttpOnly, SameSite=Strict cookie) and then the cookie.
   The cookie holds an HMAC of the token, not the token, and is never accepted on /mcp: MCP clients send the
   header, and a browser's ambient credential must not reach the tools.

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
import socket
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_plus, urlencode

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sae_mcp.errors import InvalidInput
from sae_mcp.server.pages_assets import SCRIPT_HASH

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
    session_idle_minutes: float = 10.0
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
    if p.max_sessions_per_client < 1 or not (math.isfinite(p.session_idle_minutes) and p.session_idle_minutes > 0):
        raise InvalidInput("--max-sessions-per-client must be >= 1 and --session-idle-minutes > 0")
    if p.token is None and not is_loopback(p.host):
        if not p.insecure_no_auth:
            raise InvalidInput(
                f"--host {p.host} is not a loopback address and no token is set: anyone who reaches the port could "
                "run every tool. Pass --token (or set SAE_MCP_TOKEN), or --insecure-no-auth on a trusted network")
        log.warning("!!! INSECURE: serving on %s:%d WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who reaches "
                    "this port can run every tool, write labels and start scans !!!", p.host, p.port)


def reserve_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, before the model loads, so a bad or taken port fails at once; uvicorn
    listens on this very socket later, so nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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


def cookie_value(token: str) -> str:
    """What the page cookie holds: a keyed hash of the token, so a leaked cookie is not the MCP bearer token."""
    return hmac.new(token.encode(), b"sae-mcp page cookie", hashlib.sha256).hexdigest()


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


def _login_redirect(scope: Scope, query: list[tuple[str, str]], name: str, value: str) -> Response:
    """`?token=` on a page: set the cookie and send the browser to the same URL without the token, so the token
    leaves the address bar and history at once. Behind a TLS proxy that says so, the cookie is Secure too."""
    path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    path = "/" + path.lstrip("/\\")  # '//evil.example' or '/\\evil.example' would send the browser off-site
    rest = urlencode([(k, v) for k, v in query if k != "token"])
    tls = Headers(scope=scope).get("x-forwarded-proto", "").lower() == "https"
    cookie = f"{name}={value}; HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if tls else "")
    return Response(status_code=303, headers={"location": path + (f"?{rest}" if rest else ""), "set-cookie": cookie})


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

    def __init__(self, app: ASGIApp, policy: HttpPolicy):
        self.app, self.policy = app, policy
        self.hosts = HostRule(policy)
        self.origins = {o.strip().lower().rstrip("/") for o in policy.allow_origins}
        self.cookie = cookie_value(policy.token) if policy.token else ""

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
        token = self.policy.token
        if token is None or _same(_bearer(headers), token):
            return None
        if mcp:  # the header only: a browser's cookie must never reach the tools
            return _deny(401, "this server needs Authorization: Bearer TOKEN (its --token / SAE_MCP_TOKEN)", mcp)
        if _same(_cookie(headers, self.policy.cookie_name), self.cookie):
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if _same(dict(query).get("token"), token):
            return _login_redirect(scope, query, self.policy.cookie_name, self.cookie)
        return _deny(401, "this page needs the server's token: open it once as URL?token=TOKEN (a cookie then "
                     "keeps it), or send Authorization: Bearer TOKEN", mcp)


_QUERY_PAIR = re.compile(r"([?&])([^=&\s\"]*)=([^&\s\"]*)")


def _redact(text: str) -> str:
    """Every query value whose key decodes to `token` (as parse_qsl reads it: 'tok%65n' too) -> REDACTED."""
    return _QUERY_PAIR.sub(lambda m: f"{m[1]}{m[2]}=REDACTED" if unquote_plus(m[2]) == "token" else m[0], text)


class RedactTokens(logging.Filter):
    """uvicorn's access log line holds the query string: a `?token=` never reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True
