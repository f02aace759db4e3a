"""What every tool module uses to register its tools: annotations and the decorator that turns domain errors into
isError results (the caller sees our message, and the server keeps working).

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from sae_mcp.errors import SaeMcpError

F = TypeVar("F", bound=Callable[..., Any])
ToolDecorator = Callable[..., Callable[[F], F]]
"""tool(name=..., annotations=...) -> a decorator registering the function as an MCP tool (read-only default)."""

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)


def domain_errors(fn: F) -> F:
    """Turn our domain errors into the SDK's ToolError, so the caller sees our message as an isError result."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SaeMcpError as exc:
            raise ToolError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def tool_decorator(server: MCPServer) -> ToolDecorator:
    """The `tool` each module's register() receives: read-only annotations unless given, domain errors translated."""

    def tool(**kw: Any) -> Callable[[F], F]:
        def register(fn: F) -> F:
            server.tool(annotations=kw.pop("annotations", READ_ONLY), **kw)(domain_errors(fn))
            return fn

        return register

    return tool
