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

Threshold = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]


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
        Field(description="Prompt position(s) to patch; default every aligned one but BOS"),
    ]

    @tool()
    def patch_features(
        prompt: A.Prompt,
        source_prompt: A.Prompt,
        answer: A.Answer,
        counterfactual: Annotated[A.Answer | None, Field(description="metric = logit[answer] - logit[this]")] = None,
        features: Annotated[A.Features | None, Field(min_length=1, description="Patched together; "
                                                     "default: sweep every differing feature alone")] = None,
        position: Positions = None,
        sae: A.Sae = None,
        align: Annotated[Literal["none", "end"], Field(description="'end': pair positions from the end when the "
                                                                   "token lengths differ")] = "none",
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        controls: Annotated[bool, Field(description="With features: matched features patched the same way")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
        mcp_context: Context = None,
    ) -> PatchResult:
        """Interchange intervention on a minimal pair: set features of `prompt` (SAE spliced, error term on) to
        their values on `source_prompt` at aligned positions; the metric clean, patched and on the source, the
        share recovered, KL. Without features: each differing feature patched alone, ranked by effect."""
        cancel = CancelToken()
        progress_reporter(mcp_context, cancel, "patches")  # watches the client: a cancel stops between forwards
        return patching.patch_features(engine, prompt, source_prompt, answer, counterfactual=counterfactual,
                                       features=features, position=position, sae=sae, align=align, top_k=top_k,
                                       controls=controls, n_controls=n_controls, seed=seed, cancel=cancel)

    @tool()
    def trace_circuit(
        prompt: A.Prompt,
        answer: A.Answer,
        counterfactual: Annotated[A.Answer | None, Field(description="metric = logit[answer] - logit[this]")] = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="SAEs to trace, by layer (default: every loaded SAE, one per hook)"),
        ] = None,
        node_threshold: Annotated[Threshold, Field(description="Keep nodes with |attribution| >= this")] = 0.0,
        max_nodes: Annotated[int, Field(ge=1, le=graph.MAX_NODES, description="At most this many, largest first")] = 40,
        edge_threshold: Annotated[Threshold, Field(description="Keep edges with |weight| >= this")] = 0.0,
        position: Annotated[A.Position, Field(description="Whose logits define the metric")] = -1,
        method: Literal["gradient", "integrated_gradients"] = "gradient",
        steps: Annotated[int, Field(ge=1, le=MAX_STEPS, description="integrated_gradients")] = 8,
        mcp_context: Context = None,
    ) -> CircuitResult:
        """A sparse feature circuit across SAEs (Marks et al. 2024): nodes (features and error nodes) by
        attribution, edges between consecutive SAEs, faithfulness of the circuit alone, the strongest paths."""
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "steps (nodes, checks, each SAE pair, faithfulness)")
        result = graph.trace_circuit(engine, prompt, answer, counterfactual=counterfactual, saes=saes,
                                     node_threshold=node_threshold, max_nodes=max_nodes,
                                     edge_threshold=edge_threshold, position=position, method=method, steps=steps,
                                     progress=progress, cancel=cancel)
        return label_nodes(services, engine, result)
