"""The tool list every conversation pays for before its first call (issue 23): one-line descriptions, the
conventions said once in the server's instructions, and input schemas written compactly by published_schema, which
must accept exactly what pydantic's schema accepts (an explicit null aside: optional is said by `required`).

Checked with jsonschema (the SDK's own dependency) on probe values built from every bound each schema states."""

from __future__ import annotations

import json

import anyio
import jsonschema
import pytest
from mcp.server.mcpserver import MCPServer

from sae_mcp.server.app import build_server

from helpers.servers import stories_settings_at
from mcp_client import instructions_and_tools, list_tools

BUDGET = 16_000  # characters of descriptions + input schemas (json.dumps' default separators), issue 23


@pytest.fixture(scope="module")
def server(stories_engine, stories_sae_dir, tmp_path_factory):
    settings = stories_settings_at(tmp_path_factory.mktemp("tool_list"), stories_sae_dir)
    return build_server(stories_engine, settings)


def numbers_in(schema) -> set[int]:
    """Every bound a schema states, anywhere inside it."""
    out = set()
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k in ("maximum", "minimum", "maxLength", "minLength", "maxItems", "minItems", "maxProperties",
                     "exclusiveMinimum", "exclusiveMaximum") and isinstance(v, (int, float)):
                out |= {int(v)}
            out |= numbers_in(v)
    elif isinstance(schema, list):
        for v in schema:
            out |= numbers_in(v)
    return out


def enums_in(schema) -> list:
    if isinstance(schema, dict):
        return list(schema.get("enum", [])) + [x for v in schema.values() for x in enums_in(v)]
    if isinstance(schema, list):
        return [x for v in schema for x in enums_in(v)]
    return []


def probes(schema) -> list:
    """Values on and past each bound, of every JSON type: what could tell two schemas apart."""
    out: list = [None, True, "bogus", 1.5, [], {}, {"feature": 1}, [{"feature": 1, "strength": 2.0}]]
    for n in sorted(numbers_in(schema) | {0, 1}):
        for m in (n - 1, n, n + 1):
            out += [m, m + 0.5, [m], [str(m)]]
            if 0 <= m <= 20_000:  # a length (a seed's bound, 2**31 - 1, is no length to build)
                out += ["x" * m, [0] * m, {"k": ["x"] * m}, {str(i): "x" for i in range(m)}]
    return out + enums_in(schema) + [[e] for e in enums_in(schema)]


def accepts(schema: dict, name: str, value) -> bool:
    return jsonschema.Draft202012Validator({**schema, "required": []}).is_valid({name: value})


def test_the_published_schemas_accept_exactly_what_pydantic_accepts_but_an_explicit_null(server):
    raw = {t.name: t.input_schema for t in anyio.run(MCPServer.list_tools, server)}
    published = {t.name: t.input_schema for t in list_tools(server)}
    assert raw.keys() == published.keys()
    checked, nulls = 0, 0
    for tool, schema in published.items():
        assert "$defs" not in schema and "anyOf" not in json.dumps(schema), tool
        assert schema.get("required", []) == raw[tool].get("required", []), tool
        for name, prop in raw[tool]["properties"].items():
            for value in probes(prop):
                a, b = accepts(raw[tool], name, value), accepts(schema, name, value)
                if value is None and a and not b:
                    assert name not in raw[tool].get("required", []) and prop.get("default", 0) is None, (tool, name)
                    nulls += 1
                    continue
                assert a == b, (tool, name, value, a, b)
                checked += 1
    assert checked > 5_000 and nulls > 20


def test_the_tool_list_fits_its_budget_with_one_line_descriptions(server):
    tools = list_tools(server)
    size = sum(len(t.description or "") + len(json.dumps(t.input_schema)) for t in tools)
    assert size <= BUDGET, f"tools/list is {size:,} characters, over {BUDGET:,}"
    for t in tools:
        assert "\n" not in t.description and "  " not in t.description and len(t.description) <= 130, t.name


def test_the_conventions_are_said_once_in_the_instructions_not_per_argument(server):
    instructions, tools = instructions_and_tools(server)
    for said in ("`sae` is an SAE's key", "leading space", "negative ones from the end", "log P(answer)",
                 "describe_features", "label_feature with score"):
        assert said in instructions, said
    descriptions = [p.get("description", "") for t in tools for p in t.input_schema["properties"].values()]
    assert not [d for d in descriptions if "SAE key" in d or "leading space" in d or "logit[answer]" in d]
