"""The recipes (prompts/*.md, served as MCP prompts) name only what the tools have: every name a recipe puts in
backticks is a tool, or an argument or result field of a tool that the same step names (its input or output schema
as tools/list publishes it). A recipe that names a field the tools do not have sends the agent looking for it."""

from __future__ import annotations

import re

import anyio
import pytest
from mcp import Client

from sae_mcp.server.app import build_server
from sae_mcp.settings import Settings

from mcp_client import list_tools

NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:\s*[:=][^`]*)?`")
"""A name in backticks, alone or as `name: value` / `name=value` (an argument with its value). Other spans (JSON,
a resource URI, a token such as ` Paris`, a shell command) name no field."""
STEP = re.compile(r"^(?:\d+\.|Check)", re.MULTILINE)  # a numbered step, or the closing check


def schema_names(schema: dict | None) -> set[str]:
    """Every property name at any depth of a JSON schema (its $defs included)."""
    out: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                out.update(props)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema or {})
    return out


@pytest.fixture(scope="module")
def served(tiny_engine, tmp_path_factory):
    """(tool name -> the names its input and output schemas hold, recipe name -> its text as served). A recipe
    names another by its name too: those are tools here."""
    server = build_server(tiny_engine, Settings(data_dir=tmp_path_factory.mktemp("recipes")))
    names = {t.name: schema_names(t.input_schema) | schema_names(t.output_schema) for t in list_tools(server)}

    async def go():
        async with Client(server) as c:
            prompts = (await c.list_prompts()).prompts
            # each argument given (a leading space: a filled `{answer}` is no name)
            got = {p.name: await c.get_prompt(p.name, {a.name: " 7" for a in p.arguments or []}) for p in prompts}
            return {name: r.messages[0].content.text for name, r in got.items()}

    recipes = anyio.run(go)
    return {**names, **{r: set() for r in recipes}}, recipes


def steps(text: str) -> list[str]:
    """The recipe's steps (its text before the first is the first)."""
    cuts = [m.start() for m in STEP.finditer(text)]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_every_name_a_recipe_puts_in_backticks_is_a_tool_or_a_field_of_a_tool_its_step_names(served):
    tools, recipes = served
    assert len(recipes) == 5
    wrong = []
    for recipe, text in recipes.items():
        for step in steps(text):
            named = [n for n in NAME.findall(step) if n in tools]
            fields = set().union(*(tools[t] for t in named)) if named else set().union(*tools.values())
            wrong += [(recipe, n, named) for n in NAME.findall(step) if n not in tools and n not in fields]
    assert not wrong, wrong


def test_the_check_catches_a_field_no_tool_has(served):
    tools, _ = served
    step = "Call `steer_generate` and read `concept_readout_change` and `degenerate`."
    named = [n for n in NAME.findall(step) if n in tools]
    assert named == ["steer_generate"]
    assert [n for n in NAME.findall(step) if n not in tools and n not in tools["steer_generate"]] == [
        "concept_readout_change"]
