"""Feature cards as HTML pages on localhost, so a person can look at what the agent looked at.

    /?q=WORDS&sort=label|density loaded SAEs with their fidelity, features by label or density, explanation search
    /features/{sae}/{feature}    the feature page (pages/routes.py): the card's data, every example token shaded,
                                 examples per activation band, histogram, logit lens, recorded runs, a test box;
                                 ?text=... fills the test box (and its script runs it)
    /features/{sae}/{feature}/acts?text=...   the test box's JSON: get_feature_acts on the text for this feature
    /features/{sae}/?f=N         the front page's box (a plain GET form) -> the feature page
    /circuits/{run_id}           a trace_circuit graph drawn as SVG with its figures (pages/circuit.py), from
                                 the graph kept under the call's ledger run id (circuits/store.py)

The routes are added to the MCP server (custom routes, served next to /mcp when it runs over streamable HTTP)
and make up the standalone `sae-mcp dashboard` app. Cards do device work, so they run on a worker thread.
Whatever is served goes behind security.py's checks (Host, Origin, token, page headers); see mcp_http_app.
"""

from __future__ import annotations

import contextlib
import html
import logging
import socket
from collections.abc import Iterator
from urllib.parse import quote

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from sae_mcp.errors import Busy, InvalidInput, SaeMcpError
from sae_mcp.pages.circuit import circuit_page
from sae_mcp.pages.feature import MAX_TEST_CHARS, try_text
from sae_mcp.pages.routes import feature_page, index_page
from sae_mcp.server.security import HttpPolicy, RedactTokens, SecurityMiddleware
from sae_mcp.server.sessions import SessionLimiter
from sae_mcp.services import Services


def _error_page(message: str, status: int) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>sae-mcp: not found</title></head><body>"
        f"<h1>Not found</h1><p id='error'>{html.escape(message)}</p><p><a href='/'>all features</a></p></body></html>"
    )
    return HTMLResponse(body, status_code=status)


def _json_error(exc: SaeMcpError) -> JSONResponse:
    status = 503 if isinstance(exc, Busy) else 400 if isinstance(exc, InvalidInput) else 404
    return JSONResponse({"error": str(exc)}, status_code=status)


def page_routes(services: Services) -> list[Route]:
    async def front(request: Request) -> HTMLResponse:
        q = request.query_params.get("q", "")
        sort = request.query_params.get("sort", "label")
        return HTMLResponse(await run_in_threadpool(index_page, services, q, sort))

    async def feature(request: Request) -> HTMLResponse:
        sae, raw = request.path_params["sae"], request.path_params["feature"]
        try:
            f = int(raw)
        except ValueError:
            return _error_page(f"feature {raw!r} is not an integer", 404)
        text = request.query_params.get("text", "")[:MAX_TEST_CHARS]
        try:
            return HTMLResponse(await run_in_threadpool(feature_page, services, f, sae, text))
        except SaeMcpError as exc:
            return _error_page(str(exc), 404)

    async def acts(request: Request) -> JSONResponse:
        """The test box: one get_feature_acts call on ?text= (a GET: a same-origin GET carries no Origin header,
        so the page's own script passes the Origin check that keeps other sites' pages out; a cross-site GET, which
        carries none either, is refused by the browser's Sec-Fetch-Site)."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            # another site's page (an <img>, a form) may send a GET without an Origin header; browsers say so here
            return JSONResponse({"error": "the test box answers its own page only"}, status_code=403)
        sae, raw = request.path_params["sae"], request.path_params["feature"]
        try:
            f = int(raw)
        except ValueError:
            return JSONResponse({"error": f"feature {raw!r} is not an integer"}, status_code=404)
        text = request.query_params.get("text", "")
        try:
            return JSONResponse(await run_in_threadpool(try_text, services, f, sae, text))
        except SaeMcpError as exc:
            return _json_error(exc)

    async def open_feature(request: Request) -> Response:
        sae, raw = request.path_params["sae"], request.query_params.get("f", "")
        try:
            f = int(raw)
        except ValueError:
            return _error_page(f"feature {raw!r} is not an integer", 404)
        return RedirectResponse(f"/features/{quote(sae, safe='')}/{f}", status_code=303)

    async def circuit(request: Request) -> HTMLResponse:
        run_id = request.path_params["run_id"]
        try:
            return HTMLResponse(await run_in_threadpool(circuit_page, services, run_id))
        except SaeMcpError as exc:
            return _error_page(str(exc), 404)

    return [
        Route("/", front, methods=["GET"], name="features_index"),
        Route("/features/{sae}/", open_feature, methods=["GET"], name="feature_form"),
        Route("/features/{sae}/{feature}", feature, methods=["GET"], name="feature_card_page"),
        Route("/features/{sae}/{feature}/acts", acts, methods=["GET"], name="feature_test_box"),
        Route("/circuits/{run_id}", circuit, methods=["GET"], name="circuit_page"),
    ]


def register_routes(server: MCPServer, services: Services) -> None:
    """Add the pages to an MCPServer's HTTP app (used when it is served over streamable HTTP or SSE)."""
    for route in page_routes(services):
        server.custom_route(route.path, methods=["GET"], name=route.name)(route.endpoint)


def mcp_http_app(server: MCPServer, policy: HttpPolicy) -> ASGIApp:
    """MCP at /mcp and the pages beside it, as `serve --transport http` runs them: behind the Host/Origin/token
    checks and the session caps (per client and in all), with the SDK's idle expiry set from the policy. The SDK's
    own DNS-rebinding check is turned off on every bind: it covers /mcp only, and only when the host is literally
    a localhost form; SecurityMiddleware checks every route on every bind, so two rules can never disagree."""
    idle_s = policy.session_idle_minutes * 60
    app = server.streamable_http_app(
        streamable_http_path=policy.mcp_path,
        session_idle_timeout=idle_s,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        host=policy.host,
    )
    limiter = SessionLimiter(app, policy.max_sessions_per_client, idle_s, policy.mcp_path, total=policy.max_sessions)
    return SecurityMiddleware(limiter, policy)


def dashboard_app(services: Services, policy: HttpPolicy) -> ASGIApp:
    """The pages alone (`sae-mcp dashboard`), behind the same checks."""
    return SecurityMiddleware(Starlette(routes=page_routes(services)), policy)


def uvicorn_server(app: ASGIApp, access_log: bool = False):
    """The uvicorn.Server that serve_asgi runs (tests run the same one on a thread). log_config=None sends
    uvicorn's lines through our logging to stderr (its own config writes the access log to stdout); the access log
    is off unless asked for. No proxy headers: a forwarded client address could be forged to dodge the per-client
    session cap."""
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=access_log, proxy_headers=False, server_header=False)
    return uvicorn.Server(config)


@contextlib.contextmanager
def redacted_access_log(token: str | None) -> Iterator[None]:
    """While serving: uvicorn's access log lines pass RedactTokens (no query value named like `token`, and no
    occurrence of this server's token, reaches a log)."""
    redact = RedactTokens(token)
    access = logging.getLogger("uvicorn.access")
    access.addFilter(redact)
    try:
        yield
    finally:
        access.removeFilter(redact)


def serve_asgi(app: ASGIApp, sock: socket.socket, access_log: bool = False) -> None:
    """Run `app` with uvicorn on an already bound socket (security.reserve_socket). The token to keep out of the
    access log is the one `app` checks, when it is a SecurityMiddleware (mcp_http_app, dashboard_app)."""
    token = app.policy.token if isinstance(app, SecurityMiddleware) else None
    with redacted_access_log(token):
        uvicorn_server(app, access_log).run(sockets=[sock])
