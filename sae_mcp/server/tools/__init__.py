"""The tools, registered: one module per tool (sae_mcp/server/tools/<tool>.py, its SPEC says everything about it:
spec.py), in the order the server lists them. Adding a tool is one module and one line here.

    TOOLS          the specs, in order: build_server registers each (server/app.py)
    tool_map()     name -> spec, built from TOOLS: what the ledger, the exports, replay, the pages and the
                   blind-scoring check are handed, to read each tool's rules instead of naming tools
"""

from __future__ import annotations

from typing import Any

from sae_mcp.server.tools import (
    ablate_and_test,
    attribute,
    build_index,
    compare_prompts,
    describe_features,
    feature_card,
    feature_stats,
    get_feature_acts,
    label_feature,
    ledger,
    model_info,
    next_token,
    patch_features,
    project_to_vocab,
    score_explanation,
    search_explanations,
    steer_generate,
    submit_predictions,
    token_set_enrichment,
    top_examples,
    trace_circuit,
)
from sae_mcp.server.tools.spec import ToolSpec

TOOLS: tuple[ToolSpec[Any], ...] = (
    model_info.SPEC,
    get_feature_acts.SPEC,
    compare_prompts.SPEC,
    next_token.SPEC,
    project_to_vocab.SPEC,
    top_examples.SPEC,
    build_index.SPEC,
    steer_generate.SPEC,
    ablate_and_test.SPEC,
    attribute.SPEC,
    patch_features.SPEC,
    trace_circuit.SPEC,
    search_explanations.SPEC,
    label_feature.SPEC,
    describe_features.SPEC,
    feature_card.SPEC,
    feature_stats.SPEC,
    token_set_enrichment.SPEC,
    score_explanation.SPEC,
    submit_predictions.SPEC,
    ledger.SPEC,
)


def tool_map() -> dict[str, ToolSpec[Any]]:
    """Every registered tool by name, in registration order (a new dict each call: nothing is kept here)."""
    return {spec.name: spec for spec in TOOLS}
