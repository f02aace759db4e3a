"""Circuits: interchange interventions between two prompts (patching.py) and sparse feature circuits across SAEs
(graph.py: nodes and edges; faithfulness.py: does the circuit alone reproduce the behaviour; neuronpedia.py: the
graph in circuit-tracer's JSON). Engine-level: torch, transformer-lens and sae-lens, no MCP."""
