"""A circuit graph in the JSON that circuit-tracer writes and Neuronpedia's graph viewer reads.

Mapping from the graph trace_circuit returns (schema 'sae-mcp circuit 1', results/circuits.py):

    ours                                  circuit-tracer / Neuronpedia
    feature node  <sae>/<f>@<p>           node_id "<layer>_<f>_<p>", feature f, layer "<layer>", ctx_idx p,
                                          feature_type "cross layer transcoder" (the viewer knows no SAE type; an
                                          SAE feature is drawn as a transcoder feature of its block), activation,
                                          influence = our attribution, clerp = its label
    error node    <sae>/error@<p>         node_id "<layer>_error_<p>", feature_type "mlp reconstruction error"
    metric node   metric                  the answer's logit node: node_id "<n_layers>_<answer id>_<position>",
                                          feature_type "logit", is_target_logit true, token_prob P(answer), clerp
                                          naming our metric (a logit difference or log P(answer): a logit node's
                                          incoming weights are in that metric's units)
    edge          {source, target, weight} the same, by the converted node_ids
    prompt, tokens, the traced SAEs       metadata {slug, scan, prompt, prompt_tokens, node_threshold,
                                          schema_version 1}; qParams empty (no pinned nodes, no supernodes)

Circuit-tracer graphs also hold embedding nodes (tokens) and edges from them; ours start at the first traced SAE,
so a viewer shows no embedding row. Two SAEs at one block would share node_ids: convert one per block.
"""

from __future__ import annotations

from typing import Any

from sae_mcp.results.circuits import CircuitGraph


def _node_ids(graph: CircuitGraph) -> dict[str, str]:
    out = {}
    for n in graph.nodes:
        if n.kind == "feature":
            out[n.node_id] = f"{n.layer}_{n.feature}_{n.position}"
        elif n.kind == "error":
            out[n.node_id] = f"{n.layer}_error_{n.position}"
        else:
            out[n.node_id] = f"{graph.n_layers}_{graph.answer_token_id}_{graph.position}"
    return out


def to_neuronpedia(graph: CircuitGraph, scan: str, slug: str, node_threshold: float = 0.0) -> dict[str, Any]:
    """The graph as circuit-tracer's JSON (metadata, qParams, nodes, links). `scan` names the model on
    Neuronpedia (e.g. 'gpt2-small'), `slug` the graph."""
    ids = _node_ids(graph)
    nodes = []
    for n in graph.nodes:
        node = {"node_id": ids[n.node_id], "jsNodeId": ids[n.node_id], "ctx_idx": n.position
                if n.position is not None else graph.position, "run_idx": 0, "reverse_ctx_idx": 0}
        if n.kind == "metric":
            node.update(feature=graph.answer_token_id, layer=str(graph.n_layers), feature_type="logit",
                        is_target_logit=True, token_prob=graph.answer_probability,
                        clerp=f"{graph.metric} = {graph.metric_value:.4g} (p={graph.answer_probability:.3f})")
        else:
            node.update(feature=n.feature, layer=str(n.layer), is_target_logit=False, token_prob=0.0,
                        feature_type="cross layer transcoder" if n.kind == "feature" else "mlp reconstruction error",
                        activation=n.activation, influence=n.attribution, clerp=n.label or "")
        nodes.append(node)
    return {
        "metadata": {"slug": slug, "scan": scan, "prompt": graph.prompt, "prompt_tokens": graph.tokens,
                     "node_threshold": node_threshold, "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": ids[e.source], "target": ids[e.target], "weight": e.weight} for e in graph.edges],
    }
