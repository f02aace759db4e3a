"""Requests on one kept-alive HTTP connection: the listening socket made with protocol 0 (as before issue 20)
against the one security.reserve_socket makes now (IPPROTO_TCP), side by side in one run.

asyncio sets TCP_NODELAY on an accepted connection only when the listening socket's proto is IPPROTO_TCP, and an
accepted socket inherits the listening socket's proto. Without it, Nagle holds a response's second write (h11
sends the head and the body separately) until the client ACKs the first, which a Linux client delays by up to
~40 ms once its connection has left quick-ACK mode: the first request or two are fast, the later ones are not.

Two servers run in this process, each `mcp_http_app` (the app `serve --transport http` runs: the security
middleware, the session caps, MCP and the pages) over the bundled stories260K model and its layer-3 SAE, one on
each kind of socket. Measured on each, alternating between them so both see the same load on a shared box:
    page          GET /features/SAE/x over http.client (a route's small 404 page, no model work: the head and the
                  body are two writes, as for every page; an empty 303 would be one, and never wait)
    model_info    an MCP tools/call from the SDK's Client (its httpx connection pool keeps one connection alive)
Reported per server: the first request, then the median / p90 of the rest, and the ratio old / new.

    python bench/bench_keepalive.py [--requests 200] [--calls 100]

Measured on the shared 2-core dev box (CPU), defaults, two runs (medians in ms after the first request):
    page        old socket 43.3 / 43.3, new 0.75 / 0.77: 56-58x (the first request: 1-5 ms on both)
    model_info  old socket 44.8 / 45.1, new 3.4 / 3.7: 12-13x (an agent's cheap call: the SDK client and the
                tool's own work are the 3.4 ms; the 41 ms more were the delayed ACK)
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import STORIES_HF, STORIES_SAE  # first: the hub offline, the repo importable


def old_socket() -> socket.socket:
    """The listening socket as reserve_socket made it before: protocol 0."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def start(engine, data: Path, sock: socket.socket):
    """mcp_http_app over its own MCP server on `sock`, on a thread -> (the uvicorn.Server, its base URL)."""
    from sae_mcp.server.app import build_server
    from sae_mcp.server.http import mcp_http_app, uvicorn_server
    from sae_mcp.server.security import HttpPolicy
    from sae_mcp.settings import Settings

    port = sock.getsockname()[1]
    server = build_server(engine, Settings(data_dir=data), record=False)
    uv = uvicorn_server(mcp_http_app(server, HttpPolicy(port=port)))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.01)
    return uv, f"http://127.0.0.1:{port}"


def pages(ports: dict[str, int], sae: str, n: int) -> dict[str, list[float]]:
    """n GETs per server on one kept-alive connection each, alternating -> seconds per request, in order."""
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for name, port in ports.items()}
    times: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(n):
        for name, conn in conns.items():
            t0 = time.perf_counter()
            conn.request("GET", f"/features/{sae}/x")
            response = conn.getresponse()
            body = response.read()
            times[name].append(time.perf_counter() - t0)
            assert response.status == 404 and b"not an integer" in body, response.status
    for conn in conns.values():
        conn.close()
    return times


def mcp_calls(urls: dict[str, str], n: int) -> dict[str, list[float]]:
    """n model_info calls per server from one SDK Client each (one pooled connection), alternating."""
    import anyio
    from mcp import Client

    times: dict[str, list[float]] = {name: [] for name in urls}

    async def go():
        async with Client(f"{urls['old']}/mcp") as old, Client(f"{urls['new']}/mcp") as new:
            clients = {"old": old, "new": new}
            for _ in range(n):
                for name, client in clients.items():
                    t0 = time.perf_counter()
                    result = await client.call_tool("model_info", {})
                    times[name].append(time.perf_counter() - t0)
                    assert not result.is_error

    anyio.run(go)
    return times


def report(what: str, times: dict[str, list[float]]) -> None:
    rows = {}
    for name, ts in times.items():
        rest = sorted(ts[1:])
        rows[name] = (ts[0], statistics.median(rest), rest[int(0.9 * len(rest))])
        first, p50, p90 = (1000 * v for v in rows[name])
        print(f"  {what:11s} {name} socket: first {first:6.2f} ms, then p50 {p50:6.2f} ms, p90 {p90:6.2f} ms")
    print(f"  {what:11s} old / new p50: {rows['old'][1] / rows['new'][1]:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="GETs per server")
    ap.add_argument("--calls", type=int, default=100, help="MCP model_info calls per server")
    args = ap.parse_args()
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.server.security import reserve_socket
    from sae_mcp.settings import Settings

    settings = Settings(model=str(STORIES_HF), saes=(f"res3={STORIES_SAE}",), device="cpu")
    engine = Engine.from_settings(settings)
    work = Path(tempfile.mkdtemp(prefix="sae-mcp-keepalive-"))
    socks = {"old": old_socket(), "new": reserve_socket("127.0.0.1", 0)}
    for name, sock in socks.items():
        print(f"{name} listening socket: proto {sock.proto}", file=sys.stderr)
    servers = {name: start(engine, work / name, sock) for name, sock in socks.items()}
    try:
        ports = {name: sock.getsockname()[1] for name, sock in socks.items()}
        mcp_calls({name: url for name, (_, url) in servers.items()}, 3)  # warm-up: tool paths, pools
        print(f"{args.requests} requests / {args.calls} calls per server, one kept-alive connection each:")
        report("page", pages(ports, "res3", args.requests))
        report("model_info", mcp_calls({name: url for name, (_, url) in servers.items()}, args.calls))
    finally:
        for uv, _ in servers.values():
            uv.should_exit = True
        time.sleep(0.5)


if __name__ == "__main__":
    main()
