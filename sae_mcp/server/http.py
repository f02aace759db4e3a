"""Feature cards as HTML pages on localhost, so a person can look at what the agent looked at.

    /                            loaded SAEs, labelled features, a box to open any feature
    /features/{sae}/{feature}    the feature card (the same data as the feature://{sae}/{feature} resource)

The routes are added to the MCP server (custom routes, served next to /mcp when it runs over streamable HTTP)
and make up the standalone `sae-mcp dashboard` app. Cards do device work, so they run on a worker thread.
"""

from __future__ import annotations

import html

from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from sae_mcp.errors import SaeMcpError
from sae_mcp.server.card_text import card_html, index_html
from sae_mcp.services import Services


def _error_page(message: str, status: int) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>sae-mcp: not found</title></head><body>"
        f"<h1>Not found</h1><p id='error'>{html.escape(message)}</p><p><a href='/'>all features</a></p></body></html>"
    )
    return HTMLResponse(body, status_code=status)


def page_routes(services: Services) -> list[Route]:
    async def front(request: Request) -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(index_html, services))

    async def feature(request: Request) -> HTMLResponse:
        sae, raw = request.path_params["sae"], request.path_params["feature"]
        try:
            f = int(raw)
        except ValueError:
            return _error_page(f"feature {raw!r} is not an integer", 404)
        try:
            return HTMLResponse(await run_in_threadpool(card_html, services, f, sae))
        except SaeMcpError as exc:
            return _error_page(str(exc), 404)

    return [
        Route("/", front, methods=["GET"], name="features_index"),
        Route("/features/{sae}/{feature}", feature, methods=["GET"], name="feature_card_page"),
    ]


def register_routes(server: MCPServer, services: Services) -> None:
    """Add the pages to an MCPServer's HTTP app (used when it is served over streamable HTTP or SSE)."""
    for route in page_routes(services):
        server.custom_route(route.path, methods=["GET"], name=route.name)(route.endpoint)


def dashboard_app(services: Services) -> Starlette:
    return Starlette(routes=page_routes(services))


def serve_dashboard(services: Services, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    uvicorn.run(dashboard_app(services), host=host, port=port, log_level="warning")
