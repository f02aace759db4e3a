"""The strongest paths of a circuit graph, for the agent to read first."""

from __future__ import annotations

from sae_mcp.circuits.nodes import Node
from sae_mcp.results import rounded
from sae_mcp.results.circuits import CircuitPath

MAX_PATHS = 10
PATH_BEAM = 20  # partial paths kept per node while enumerating
METRIC = "metric"




def top_paths(kept: list[Node], edges: dict[tuple[Node, Node], float], n_saes: int, keys: list[str]
              ) -> list[CircuitPath]:
    """The strongest paths from the first SAE's kept nodes to the metric. A path's weight: its first edge times,
    at each later node, the share of that node's attribution its next edge carries (the last SAE's nodes reach
    the metric with their attribution, a share of 1)."""
    out_edges: dict[Node, list[tuple[Node, float]]] = {}
    for (u, d), w in edges.items():
        out_edges.setdefault(u, []).append((d, w))
    best: dict[Node, list[tuple[float, list[Node]]]] = {}
    for layer in reversed(range(n_saes)):
        for n in (x for x in kept if x.sae == layer):
            if layer == n_saes - 1:
                best[n] = [(n.attribution, [n])]
                continue
            paths = []
            for d, w in out_edges.get(n, []):
                for weight, rest in best.get(d, []):
                    share = weight / d.attribution if d.attribution else 0.0
                    paths.append((w * share, [n, *rest]))
            best[n] = sorted(paths, key=lambda p: -abs(p[0]))[:PATH_BEAM]
    starts = [p for n in kept if n.sae == 0 for p in best.get(n, [])]
    top = sorted(starts, key=lambda p: -abs(p[0]))[:MAX_PATHS]
    return [CircuitPath(nodes=[n.node_id(keys) for n in nodes] + [METRIC], weight=rounded(w, 6)) for w, nodes in top]


