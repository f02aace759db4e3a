"""The pieces of what the agent reads (each tool's rendering puts them together: ToolSpec.render, server/tools/).

A chat host shows the model a result's text content, and every character costs it context. The structured content
keeps the whole typed result (the output schema); the text says the same facts once: compact JSON without
indentation, without null or empty fields, floats to 4 significant digits, or a purpose-made rendering, which says
every number of the structured content an agent needs, once, under a header line that names the units.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from mcp.types import CallToolResult, TextContent
from mcp_types import InputRequiredResult
from pydantic import BaseModel

from sae_mcp.results.causal import Controls

SIGNIFICANT = 4


def compact(value: Any) -> Any:
    """JSON data -> the same without None, empty lists/dicts/strings, floats to SIGNIFICANT digits."""
    if isinstance(value, dict):
        out = {k: compact(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, [], {}, "")}
    if isinstance(value, list):
        return [compact(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}")
    return value


def compact_json(value: Any) -> str:
    return json.dumps(compact(value), ensure_ascii=False, separators=(",", ":"))


def fmt(x: float) -> str:
    """A float as the agent reads it: 4 significant digits, no trailing zeros ('3.742', '0.0001234', '12')."""
    return f"{x:.{SIGNIFICANT}g}"


def text_content(text: str) -> TextContent:
    return TextContent(type="text", text=text)


def tok(t: str) -> str:
    """A token as the agent reads it: quoted, newlines visible ('\\n' stays escaped by repr)."""
    return repr(t)


def warnings_lines(warnings: list[str] | None) -> list[str]:
    return [f"warning: {w}" for w in warnings or []]


def join(lines: Iterable[str | None]) -> str:
    return "\n".join(line for line in lines if line)


def controls_lines(c: Controls, head: str = "controls") -> list[str]:
    """Control stats per metric, and the control features (their texts stay in the structured content): the lines
    of every tool that draws controls."""
    if not c.runs:
        return [f"{head}: none drawn ({c.note})"]
    lines = [f"{head} ({len(c.runs)} runs, seed {c.seed}): {c.matched_on}. Target vs controls mean ± std [min, max], "
             "z, |target| > every |control|"]
    for s in c.stats:
        z = "n/a" if s.z_score is None else fmt(s.z_score)
        lines.append(f"  {s.metric}: {fmt(s.target)} vs {fmt(s.control_mean)} ± {fmt(s.control_std)} "
                     f"[{fmt(s.control_min)}, {fmt(s.control_max)}], z {z}, |target| > all: "
                     f"{'yes' if s.exceeds_all_controls else 'no'}")
    lines.append("  control features: " + " ".join(str(run.features) for run in c.runs))
    return lines + ([f"  note: {c.note}"] if c.note else []) + ([f"  caution: {c.caution}"] if c.caution else [])


def as_tool_result(result: BaseModel, render: Callable[[Any], str] | None) -> CallToolResult | InputRequiredResult:
    """A pydantic result -> tool_result(result, render). A CallToolResult, or an InputRequiredResult (the 2026 wire's
    request for client input, e.g. sampling: tools/score_explanation.py), passes as is."""
    if isinstance(result, (CallToolResult, InputRequiredResult)):
        return result
    return tool_result(result, render)


def tool_result(result: BaseModel, render: Callable[[Any], str] | None) -> CallToolResult:
    """A result model -> CallToolResult(text: its tool's rendering, else compact JSON; structured: the whole
    result). `render` takes the result's own model."""
    text = render(result) if render is not None else compact_json(result.model_dump(mode="json"))
    return CallToolResult(content=[text_content(text)], structured_content=result.model_dump(mode="json"))


def first_only(what: str, tokens: list[str] | None) -> str:
    """'; counterfactual tokens [' sa', 'd'], only the first scored' when the text is several tokens, else ''."""
    return f"; {what} tokens {tokens}, only the first scored" if tokens and len(tokens) > 1 else ""
