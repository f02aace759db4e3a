"""Drive an MCPServer through the SDK's in-memory client from synchronous tests."""

from __future__ import annotations

from typing import Any

import anyio
from mcp import Client


def call_tool(server, name: str, arguments: dict[str, Any] | None = None):
    """One tool call through the real client/server machinery; returns the CallToolResult."""

    async def go():
        async with Client(server) as client:
            return await client.call_tool(name, arguments or {})

    return anyio.run(go)


def call_many(server, calls: list[tuple[str, dict[str, Any]]]):
    """Several calls over one connection (the server must keep working between them)."""

    async def go():
        async with Client(server) as client:
            return [await client.call_tool(n, a) for n, a in calls]

    return anyio.run(go)


def list_tools(server):
    async def go():
        async with Client(server) as client:
            return (await client.list_tools()).tools

    return anyio.run(go)


def error_text(result) -> str:
    assert result.is_error, f"expected an isError result, got {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)
