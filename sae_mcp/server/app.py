"""The MCP face: build_server(engine, settings) -> MCPServer.

build_server constructs the services once (services/: the example source, the explanation store, the logit-weight
statistics) and hands them, with the engine, to each tool module's `register(server, tool, engine, services)`.
A tool body validates its arguments (bounds live in the signature, so every client sees them in the input
schema), calls one engine or service function and returns its pydantic result (structured content + output
schema). Domain errors (SaeMcpError) become `isError` results with the engine's message; the server keeps working.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from mcp.server.mcpserver import MCPServer

from sae_mcp.engine.runtime import Engine
from sae_mcp.server import (
    http,
    tools_causal,
    tools_circuits,
    tools_corpus,
    tools_explain,
    tools_ledger,
    tools_prompt,
    tools_scoring,
)
from sae_mcp.server.page_links import PageLinks
from sae_mcp.server.prompts import load_prompts
from sae_mcp.server.wiring import SaeMcpServer, tool_decorator
from sae_mcp.services import Services
from sae_mcp.settings import Settings

INSTRUCTIONS = """\
sae-mcp runs sparse-autoencoder (SAE) experiments on a loaded transformer language model.
Start with model_info (the model and its SAEs; address an SAE by its key, optional when one is loaded).
Read: get_feature_acts (features firing per token), compare_prompts (pairs, or sets of minimal pairs with effect
sizes), next_token, project_to_vocab (what a decoder direction promotes), top_examples (max-activating corpus
examples; build_index indexes every feature at once), feature_card (everything known about a feature),
search_explanations, feature_stats, token_set_enrichment.
Test cause: ablate_and_test (the effect is `ablated` vs `baseline` on the metric; use controls), steer_generate
(calibrated, dose-response, controls), attribute (gradient x activation, error share); patch_features (a minimal
pair: patch features to the other prompt's values), trace_circuit (a feature circuit across SAEs, faithfulness).
Record what you learn with label_feature, citing the run_id of the results it rests on (evidence_runs); every
call is recorded, and ledger() finds earlier runs (also of earlier conversations). Measure how well a label
predicts where its feature fires with score_explanation (answer its blind contexts from the label alone, then
submit_predictions). Activations depend on context: prompts get BOS prepended as the SAE was trained. The MCP
prompts hold investigation recipes."""

TOOL_MODULES = (tools_prompt, tools_corpus, tools_causal, tools_circuits, tools_explain, tools_scoring, tools_ledger)


def package_version() -> str:
    try:
        return version("sae-mcp")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        from sae_mcp import __version__

        return __version__


def build_server(engine: Engine, settings: Settings | None = None, services: Services | None = None,
                 record: bool = True) -> MCPServer:
    """Every tool, resource, prompt and page, wired to the engine and to one set of services (built here unless
    given: tests pass their own). Every call is recorded in the ledger unless `record` is False (`--no-ledger`) or
    the services' ledger does not record."""
    services = services or Services(engine, settings, record=record)
    server = SaeMcpServer("sae-mcp", version=package_version(), instructions=INSTRUCTIONS)
    if record and services.ledger.recording:
        server.ledger = services.ledger
        services.ledger.prepare()  # the environment's hashes and versions, in the background
        server.circuits = services.circuits  # circuit graphs kept whole by run id (the file: on the first one)
    dashboard_url = (settings.dashboard_url if settings is not None else None) or services.settings.dashboard_url
    if dashboard_url:  # results naming one feature link to its page
        server.pages = PageLinks(dashboard_url, list(engine.saes))
    tool = tool_decorator(server)
    for module in TOOL_MODULES:
        module.register(server, tool, engine, services)
    for prompt in load_prompts():
        server.add_prompt(prompt)
    http.register_routes(server, services)  # the card pages, served beside /mcp over streamable HTTP
    return server
