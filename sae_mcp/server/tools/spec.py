"""One tool, described once: ToolSpec says everything the server and the rest of the house know about a tool.

Each tool is one module, sae_mcp/server/tools/<tool>.py, ending in its SPEC:

    name          the MCP name (the module is named after it)
    make          (ToolDeps) -> the function the SDK registers: its signature is the input schema, its return
                  annotation the output schema, its docstring the description
    result        the result model (the structured content; ledger(run=) re-validates a recorded run into it)
    render        result -> the text the agent reads; None: compact JSON (server/text.py)
    annotations   (ToolDeps) -> its MCP tool annotations
    page_in_text  with pages served, its text also shows the feature's page URL (else only its structured content)
    resources     the MCP resources that come with it, registered after it; None: none
    ledger        how its calls are recorded and read back (ledger/rule.py); None: not recorded
    export        how the exports show its runs (ledger/export/rules.py); None only where it is not recorded
    replay        how replay sends its runs again (ledger/export/rules.py); likewise

sae_mcp/server/tools/__init__.py registers the specs in order: adding a tool is one module and one line there. No field
has a default, so each module states every choice, None included, where a reader sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations
from pydantic import BaseModel

from sae_mcp.engine.runtime import Engine
from sae_mcp.ledger.export.rules import ExportRule, ReplayRule
from sae_mcp.ledger.rule import LedgerRule
from sae_mcp.server.args import Args
from sae_mcp.server.conversations import Conversations
from sae_mcp.services import Services

R = TypeVar("R", bound=BaseModel)

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
# Each call hands out a new challenge (and stores it): neither read-only nor idempotent.
CHALLENGES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                             open_world_hint=False)


@dataclass(frozen=True)
class ToolDeps:
    """What a tool's function is made with: built once per server by build_server."""

    engine: Engine
    services: Services
    args: Args
    """The engine's bounded argument types (server/args.py)."""
    tools: Mapping[str, ToolSpec[Any]]
    """Every registered tool by name, whatever its result model (ledger(run=) shows a run as its own tool rendered
    it)."""
    conversations: Conversations
    """Which conversation a call came in (server/conversations.py)."""


ToolFactory = Callable[[ToolDeps], Callable[..., BaseModel]]
"""(deps) -> the tool's function, as the SDK registers it: its arguments are its input schema; it answers with its
result model (or a CallToolResult / InputRequiredResult, models too, passed on as they are)."""
AnnotationsOf = Callable[[ToolDeps], ToolAnnotations]
"""(deps) -> the tool's MCP annotations (a corpus tool's open-world hint depends on the corpus)."""
Resources = Callable[[MCPServer, ToolDeps], None]
"""Registers the MCP resources that come with a tool."""


def read_only(deps: ToolDeps) -> ToolAnnotations:
    """Reads the model, the SAEs and the stores; changes nothing."""
    return READ_ONLY


def hands_out_challenges(deps: ToolDeps) -> ToolAnnotations:
    """Each call may store a new blind set (a challenge) or answer one."""
    return CHALLENGES


@dataclass(frozen=True)
class ToolSpec(Generic[R]):
    """One tool, described once (the module's docstring lists the fields)."""

    name: str
    make: ToolFactory
    result: type[R]
    render: Callable[[R], str] | None
    annotations: AnnotationsOf
    page_in_text: bool
    resources: Resources | None
    ledger: LedgerRule | None
    export: ExportRule | None
    replay: ReplayRule | None
