"""Results of the circuit tools: patch_features (interchange interventions on a minimal pair) and trace_circuit (a
sparse feature circuit across SAEs, with its faithfulness).

Both score the one metric of every causal tool (engine/metric.py): logit[answer] - logit[counterfactual] with a
counterfactual, else log P(answer). Edge and node weights are in that metric's units.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from sae_mcp.results import TokenProb, warnings_field
from sae_mcp.results.causal import Controls

# ------------------------------------------------------------------------------------------------- patching


class PatchCondition(BaseModel):
    """The next token after one of the runs."""

    metric: float
    answer_probability: float
    top: list[TokenProb]


class PatchedFeature(BaseModel):
    feature: int
    clean_activation: float = Field(description="Summed over the patched positions, on the prompt")
    source_activation: float = Field(description="Summed over the patched positions, on source_prompt")


class SweepEntry(BaseModel):
    feature: int
    effect: float = Field(description="metric with this feature alone patched - metric clean")
    recovered: float | None = Field(description="effect / (metric on source - metric clean); None when they are equal")
    kl: float = Field(description="KL(clean || patched) of the next token")
    clean_activation: float = Field(description="Summed over the patched positions, on the prompt")
    source_activation: float = Field(description="Summed over the patched positions, on source_prompt")


class PatchResult(BaseModel):
    sae: str
    metric: str = Field(description="logit[answer] - logit[counterfactual], or log P(answer) without one")
    metric_kind: str = Field(description="'logit_difference' or 'log_probability'")
    tokens: list[str] = Field(description="The prompt's tokens")
    source_tokens: list[str] = Field(description="source_prompt's tokens")
    positions: list[list[int]] = Field(description="[prompt position, source position] pairs patched (0-based)")
    clean: PatchCondition = Field(description="The prompt, SAE spliced with its error term (= the plain model)")
    patched: PatchCondition | None = Field(
        default=None, description="The listed features patched together to their values on source_prompt"
    )
    source: PatchCondition = Field(description="source_prompt through the plain model")
    features: list[PatchedFeature] | None = Field(default=None, description="The listed features")
    effect: float | None = Field(default=None, description="patched metric - clean metric")
    recovered: float | None = Field(
        default=None, description="effect / (source metric - clean metric): the share of the clean->source difference "
        "the patch recovers; None when source and clean metrics are equal"
    )
    kl: float | None = Field(default=None, description="KL(clean || patched) of the next token")
    sweep: list[SweepEntry] | None = Field(
        default=None, description="Without features: each differing feature patched alone, by |effect|, top_k"
    )
    n_differing: int = Field(description="Features whose activation differs between the prompts at the positions")
    n_swept: int | None = Field(default=None, description="How many of them the sweep patched (at most a bound)")
    controls: Controls | None = None
    warnings: list[str] | None = warnings_field()


# ------------------------------------------------------------------------------------------------- circuits


class CircuitNode(BaseModel):
    node_id: str = Field(description="'<sae>/<feature>@<position>', '<sae>/error@<position>', or 'metric'")
    kind: str = Field(description="'feature', 'error' or 'metric'")
    sae: str | None = None
    layer: int | None = Field(default=None, description="The SAE's block index")
    feature: int | None = None
    position: int | None = None
    token: str | None = None
    activation: float | None = Field(default=None, description="Feature activation (error nodes: the error's norm)")
    attribution: float | None = Field(
        default=None, description="Estimated contribution to the metric (metric - metric with it zeroed)"
    )
    exact_contribution: float | None = Field(
        default=None, description="metric - metric with this node alone zeroed (checked for every kept node)"
    )
    label: str | None = Field(default=None, description="The newest label of the feature, when it has one")


class CircuitEdge(BaseModel):
    source: str
    target: str
    weight: float = Field(description="source . d/d source [stopgrad(d metric / d target) . target]: metric units")


class CircuitPath(BaseModel):
    nodes: list[str] = Field(description="node_ids from the first SAE up to 'metric'")
    weight: float = Field(
        description="Its first edge times, at each later node, the share of that node's attribution its next edge "
        "carries (edges are in metric units, so a node's out-edges sum to its attribution)"
    )


class Faithfulness(BaseModel):
    ablation: str = Field(description="'zero': ablated nodes are set to 0 (errors too); 'mean': to their mean over "
                          "corpus tokens (a feature's mean activation, the SAE's mean error vector)")
    mean_tokens: int | None = Field(default=None, description="Mean ablation: the corpus tokens the means are over")
    metric_full: float = Field(description="m(M): the model")
    metric_empty: float = Field(description="m(empty): every node of every traced SAE ablated")
    metric_circuit: float = Field(description="m(C): every node outside the circuit ablated")
    metric_without_circuit: float = Field(description="m(M \\ C): the circuit's nodes ablated")
    faithfulness: float | None = Field(
        default=None, description="(m(C) - m(empty)) / (m(M) - m(empty)) (Marks et al. 2024); ~1: the circuit alone "
        "reproduces the behaviour; None when m(M) = m(empty)"
    )
    completeness: float | None = Field(
        default=None, description="(m(M \\ C) - m(empty)) / (m(M) - m(empty)); ~0: nothing outside the circuit does it"
    )


class CircuitGraph(BaseModel):
    """The whole graph as data (schema 'sae-mcp circuit 1'); to_neuronpedia converts it for circuit-tracer viewers."""

    schema_name: str = Field(default="sae-mcp circuit 1", description="This format's name and version")
    prompt: str
    tokens: list[str]
    metric: str
    metric_value: float
    position: int = Field(description="The metric's position")
    answer_token_id: int = Field(description="The answer's first token")
    answer_probability: float = Field(description="Its probability at the metric's position")
    n_layers: int = Field(description="The model's blocks (the metric node sits above the last)")
    saes: list[str] = Field(description="The traced SAEs, by layer")
    nodes: list[CircuitNode]
    edges: list[CircuitEdge]


class CircuitResult(BaseModel):
    metric: str = Field(description="The metric, with its position")
    metric_kind: str
    metric_value: float
    saes: list[str] = Field(description="SAEs traced, by layer")
    n_nodes: int = Field(description="Nodes kept (features and errors)")
    n_candidate_nodes: int = Field(description="Nodes with nonzero attribution before pruning")
    n_edges: int = Field(description="Edges kept (|weight| >= edge_threshold, between kept nodes)")
    attribution_kept: float = Field(
        description="Share of the total |attribution| of all nodes that the kept nodes carry"
    )
    faithfulness: Faithfulness
    paths: list[CircuitPath] = Field(description="The strongest paths to the metric, by |weight|")
    graph: CircuitGraph
    warnings: list[str] | None = warnings_field()
