"""Circuit tools: patch_features and trace_circuit. Validation and wiring only; the math is in sae_mcp/circuits/.

No `from __future__ import annotations` here: the SDK reads the tools' annotations at registration.
"""

from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from sae_mcp.circuits import graph, patching
from sae_mcp.engine.attribution_checks import MAX_STEPS
from sae_mcp.engine.controls import MAX_CONTROLS
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.results.circuits import CircuitResult, PatchResult
from sae_mcp.server.args import engine_args
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.wiring import ToolDecorator
from sae_mcp.services import Services

Threshold = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]


def label_nodes(services: Services, engine: Engine, result: CircuitResult) -> CircuitResult:
    """Each feature node with the newest label of its feature, when it has one (the explanation store)."""
    labels: dict[tuple[str, int], str | None] = {}
    for n in result.graph.nodes:
        if n.kind != "feature":
            continue
        key = (n.sae, n.feature)
        if key not in labels:
            found = [x for x in services.explanations.for_feature(engine.sae(n.sae).store_key, n.feature)
                     if x.source == "label"]
            labels[key] = found[0].description if found else None
        n.label = labels[key]
    return result


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    max_k = engine.limits.max_top_k
    A = engine_args(engine)
    Positions = Annotated[
        A.Position | Annotated[list[A.Position], Field(max_length=A.n_ctx)] | None,
        Field(description="Default: every aligned one but BOS"),
    ]

    @tool()
    def patch_features(
        prompt: A.Prompt,
        source_prompt: A.Prompt,
        answer: A.Answer,
        counterfactual: A.Answer | None = None,
        features: Annotated[A.Features | None, Field(min_length=1, description="Patched together; "
                                                     "default: sweep every differing feature alone")] = None,
        position: Positions = None,
        sae: A.Sae = None,
        align: Annotated[Literal["none", "end"], Field(description="'end': align from the end if lengths differ")] = (
            "none"),
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        controls: Annotated[bool, Field(description="Matched features patched alike")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
        mcp_context: Context = None,
    ) -> PatchResult:
        """On a minimal pair, patch features to their source_prompt values: the metric's gap recovered."""
        cancel = CancelToken()
        progress_reporter(mcp_context, cancel, "patches")  # watches the client: a cancel stops between forwards
        return patching.patch_features(engine, prompt, source_prompt, answer, counterfactual=counterfactual,
                                       features=features, position=position, sae=sae, align=align, top_k=top_k,
                                       controls=controls, n_controls=n_controls, seed=seed, cancel=cancel)

    @tool(page_in_text=True)
    def trace_circuit(
        prompt: A.Prompt,
        answer: A.Answer,
        counterfactual: A.Answer | None = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="Default: every SAE, one per hook"),
        ] = None,
        node_threshold: Annotated[Threshold, Field(description="Min |attribution|")] = 0.0,
        max_nodes: Annotated[int, Field(ge=1, le=graph.MAX_NODES)] = 40,
        edge_threshold: Annotated[Threshold, Field(description="Min |weight|")] = 0.0,
        position: Annotated[A.Position, Field(description="Where the metric is read")] = -1,
        method: Literal["gradient", "integrated_gradients"] = "gradient",
        steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 8,
        mcp_context: Context = None,
    ) -> CircuitResult:
        """A sparse feature circuit across SAEs (Marks et al.): nodes, edges, faithfulness, paths."""
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "steps (nodes, checks, each SAE pair, faithfulness)")
        result = graph.trace_circuit(engine, prompt, answer, counterfactual=counterfactual, saes=saes,
                                     node_threshold=node_threshold, max_nodes=max_nodes,
                                     edge_threshold=edge_threshold, position=position, method=method, steps=steps,
                                     progress=progress, cancel=cancel)
        return label_nodes(services, engine, result)
