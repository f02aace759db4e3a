"""The MCP face: build_server(engine, settings) -> MCPServer.

build_server constructs the services once (services/: the example source, the explanation store, the logit-weight
statistics, the ledger), handed the registered tools (sae_mcp/server/tools/: each tool's ToolSpec), and registers each
tool with what it is made with (ToolDeps: the engine, the services, the argument types, every tool by name, the
conversations). A tool body validates its arguments (bounds live in the signature, so every client sees them in
the input schema), calls one engine or service function and returns its pydantic result (structured content +
output schema). Domain errors (SaeMcpError) become `isError` results with the engine's message; the server keeps
working.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mcp.server.mcpserver import MCPServer

from sae_mcp.engine.runtime import Engine
from sae_mcp.pages.links import PageLinks
from sae_mcp.server import http
from sae_mcp.server.args import engine_args
from sae_mcp.server.prompts import load_prompts
from sae_mcp.server.tools import TOOLS, tool_map
from sae_mcp.server.tools.spec import ToolDeps
from sae_mcp.server.wiring import SaeMcpServer, register_tool
from sae_mcp.services import Services
from sae_mcp.settings import Settings

INSTRUCTIONS = """\
sae-mcp runs sparse-autoencoder (SAE) experiments on a loaded transformer language model.
Start with model_info. Conventions for every tool: `sae` is an SAE's key (optional when one is loaded); prompts get
BOS prepended as the SAE was trained; positions count tokens from 0 (BOS when prepended), negative ones from the end;
`answer` and `counterfactual` are next tokens written with their leading space (' Paris'; the first token counts);
the metric is logit[answer] - logit[counterfactual], or log P(answer) without a counterfactual.
Read: get_feature_acts, compare_prompts, next_token, project_to_vocab, top_examples (build_index indexes every
feature at once), feature_card, search_explanations, feature_stats, token_set_enrichment.
Test cause: ablate_and_test (the effect is `ablated` vs `baseline`; use controls), steer_generate, attribute,
patch_features (minimal pairs), trace_circuit (a feature circuit across SAEs).
Label in two calls: describe_features (the evidence for several features), then label_feature with score (records
the label, cites run_ids in evidence_runs, hands out its blind set); answer the set from the label alone with
submit_predictions. Every call is recorded: ledger() finds earlier runs. The MCP prompts hold recipes."""


def package_version() -> str:
    try:
        return version("sae-mcp")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from sae_mcp import __version__

        return __version__


def build_server(engine: Engine, settings: Settings | None = None, services: Services | None = None,
                 record: bool = True) -> MCPServer:
    """Every tool, resource, prompt and page, wired to the engine and to one set of services (built here unless
    given: tests pass their own, built with the same tools). Every call is recorded in the ledger unless `record` is
    False (`--no-ledger`) or the services' ledger does not record."""
    tools = tool_map()
    services = services or Services(engine, settings, tools=tools, record=record)
    unknown = [s.name for s in TOOLS if s.ledger is not None and s.name not in services.tools]
    if unknown:
        raise ValueError(f"the services were built without the registered tools ({', '.join(unknown)}): pass "
                         "Services(..., tools=sae_mcp.server.tools.tool_map())")
    server = SaeMcpServer("sae-mcp", version=package_version(), instructions=INSTRUCTIONS)
    if record and services.ledger.recording:
        server.ledger = services.ledger
        services.ledger.prepare()  # the environment's hashes and versions, in the background
        server.circuits = services.circuits  # circuit graphs kept whole by run id (the file: on the first one)
    dashboard_url = (settings.dashboard_url if settings is not None else None) or services.settings.dashboard_url
    if dashboard_url:  # results naming one feature link to its page
        server.pages = PageLinks(dashboard_url, list(engine.saes))
    deps = ToolDeps(engine=engine, services=services, args=engine_args(engine), tools=tools,
                    conversations=server.conversations)
    for spec in TOOLS:
        register_tool(server, spec, deps)
    for prompt in load_prompts():
        server.add_prompt(prompt)
    http.register_routes(server, services)  # the card pages, served beside /mcp over streamable HTTP
    return server
