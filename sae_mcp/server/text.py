"""The pieces of what the agent reads (server/renderings.py puts them together).

A chat host shows the model a result's text content, and every character costs it context. The structured content
keeps the whole typed result (the output schema); the text says the same facts once: compact JSON without
indentation, without null or empty fields, floats to 4 significant digits, or a purpose-made rendering.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.types import TextContent

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


def join(lines: list[str | None]) -> str:
    return "\n".join(line for line in lines if line)
