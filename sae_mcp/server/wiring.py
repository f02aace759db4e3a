"""The MCP server class and what every tool module uses to register its tools.

SaeMcpServer is the SDK's MCPServer with three protocol-level rules an agent needs:
- an argument name the tool does not have is an error naming the valid ones (the SDK would ignore it silently:
  `next_token {"k": 3}` answered 10 tokens), and a validation error reads as one line per bad argument, without
  pydantic's documentation links;
- a prompt asked for without a required argument is an error naming it (the SDK answers "Internal server error");
- results are shown to the agent compactly: `tool()`-registered functions return pydantic models, which become
  the structured content (whole) and a compact text rendering (server/text.py).

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from mcp import MCPError
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import CallToolResult, ToolAnnotations
from mcp_types import INVALID_PARAMS
from pydantic import BaseModel, ValidationError

from sae_mcp.errors import SaeMcpError
from sae_mcp.server.renderings import agent_text
from sae_mcp.server.text import text_content

F = TypeVar("F", bound=Callable[..., Any])
ToolDecorator = Callable[..., Callable[[F], F]]
"""tool(name=..., annotations=...) -> a decorator registering the function as an MCP tool (read-only default)."""

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
SHOWN_INPUT = 60  # characters of a rejected argument value quoted back


class SaeMcpServer(MCPServer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._argument_names: dict[str, set[str]] | None = None  # tool -> its input schema's properties

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
        valid = await self.argument_names(name)
        unknown = sorted(set(arguments) - valid)
        if valid and unknown:
            raise ToolError(f"{name} has no argument {', '.join(map(repr, unknown))}; its arguments: "
                            f"{', '.join(sorted(valid))}")
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):  # the arguments did not fit the input schema
                raise ToolError(f"invalid arguments for {name}: {validation_message(exc.__cause__)}") from exc.__cause__
            raise

    async def list_tools(self) -> list[Any]:
        """The SDK's tool list with the input schemas' `title`s left out: pydantic titles every property with its
        own name capitalised, which the agent pays for on every tool and learns nothing from."""
        tools = await super().list_tools()
        for t in tools:
            t.input_schema = without_titles(t.input_schema)
        return tools

    async def argument_names(self, name: str) -> set[str]:
        """The tool's argument names from its published input schema (empty for an unknown tool)."""
        if self._argument_names is None:
            self._argument_names = {t.name: set(t.input_schema.get("properties", {})) for t in await self.list_tools()}
        return self._argument_names.get(name, set())

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None, context: Any = None) -> Any:
        listed = {p.name: p for p in await self.list_prompts()}
        if name in listed:
            missing = [a.name for a in listed[name].arguments or [] if a.required and not (arguments or {}).get(a.name)]
            if missing:
                raise MCPError(INVALID_PARAMS, f"prompt {name!r} needs the argument(s) {', '.join(missing)}")
        return await super().get_prompt(name, arguments, context)


def without_titles(schema: Any) -> Any:
    """A JSON schema without its `title` keywords. A property *named* title stays: its value is a schema (a dict),
    the keyword's a string."""
    if isinstance(schema, dict):
        return {k: without_titles(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if isinstance(schema, list):
        return [without_titles(v) for v in schema]
    return schema


def validation_message(exc: ValidationError) -> str:
    """A pydantic ValidationError -> 'top_k: Input should be less than or equal to 100 (given 5000); ...'."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        given = repr(err.get("input"))
        given = given if len(given) <= SHOWN_INPUT else given[:SHOWN_INPUT] + "..."
        parts.append(f"{where}: {err['msg']}" + ("" if err["type"] == "missing" else f" (given {given})"))
    return "; ".join(parts)


def as_tool_result(result: Any) -> Any:
    """A pydantic result -> CallToolResult(text: the compact rendering, structured: the whole result)."""
    if isinstance(result, BaseModel) and not isinstance(result, CallToolResult):
        return CallToolResult(content=[text_content(agent_text(result))],
                              structured_content=result.model_dump(mode="json"))
    return result


def domain_errors(fn: F) -> F:
    """Our domain errors become the SDK's ToolError (the caller sees our message as an isError result), and a
    result model becomes a compact CallToolResult."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return as_tool_result(fn(*args, **kwargs))
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
