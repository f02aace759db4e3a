"""Drive an MCPServer through the SDK's in-memory client from synchronous tests: one place for the helpers every
protocol test uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from mcp import Client

Progress = Callable[[float, float | None, str | None], Awaitable[None]]


def call_tool(server, name: str, arguments: dict[str, Any] | None = None, progress: Progress | None = None):
    """One tool call through the real client/server machinery; returns the CallToolResult."""
    return call_many(server, [(name, arguments or {})], progress=progress)[0]


def call_many(server, calls: list[tuple[str, dict[str, Any]]], progress: Progress | None = None):
    """Several calls over one connection (the server must keep working between them)."""

    async def go():
        async with Client(server) as client:
            return [await client.call_tool(n, a, progress_callback=progress) for n, a in calls]

    return anyio.run(go)


def list_tools(server):
    async def go():
        async with Client(server) as client:
            return (await client.list_tools()).tools

    return anyio.run(go)


def instructions_and_tools(server) -> tuple[str | None, list]:
    """The server's instructions and its listed tools, as a client sees them on connecting."""

    async def go():
        async with Client(server) as client:
            return client.instructions, (await client.list_tools()).tools

    return anyio.run(go)


def tools_by_name(server) -> dict:
    return {t.name: t for t in list_tools(server)}


def read_resource(server, uri: str):
    async def go():
        async with Client(server) as client:
            return await client.read_resource(uri)

    return anyio.run(go)


def text_of(result) -> str:
    """The text content of a result (what a chat host shows the model)."""
    return " ".join(getattr(c, "text", "") for c in result.content)


def error_text(result) -> str:
    assert result.is_error, f"expected an isError result, got {result.structured_content}"
    return text_of(result)


def cancel_after_first_progress(server, name: str, arguments: dict[str, Any], then: tuple[str, dict[str, Any]]):
    """Start the call `name`, abandon it (the client sends notifications/cancelled) as soon as its first progress
    notification arrives, then make the call `then` on the same connection and return its result."""

    async def go():
        async with Client(server) as client:
            async with anyio.create_task_group() as tg:
                first = anyio.Event()

                async def progress(done, total, message):
                    first.set()

                async def call():
                    await client.call_tool(name, arguments, progress_callback=progress)

                tg.start_soon(call)
                await first.wait()
                tg.cancel_scope.cancel()
            return await client.call_tool(*then)

    return anyio.run(go)
