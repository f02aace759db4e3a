"""Each tool is described once (issue 21): one module per tool, whose ToolSpec says everything the server, the ledger,
the exports, replay, the pages and the blind-scoring check know about it, and one line in the registration.

Checked here: the server lists exactly the registered tools, in order, each serving its spec's result model; every
spec is whole (no field has a default, so each module states every choice, None included; what a tool is recorded
with goes with what its runs are exported and replayed with); and no tool's name is written in sae_mcp/ outside
its own module and the registration (an AST scan of the string constants: a name used as a path segment or as a
CLI command is told apart by where it stands, not exempted by file).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from mcp.types import ToolAnnotations

from sae_mcp.ledger.export.rules import ExportRule, ReplayRule
from sae_mcp.ledger.rule import LedgerRule
from sae_mcp.server.app import build_server
from sae_mcp.server.args import engine_args
from sae_mcp.server.tools import TOOLS, tool_map
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec

from helpers.servers import server_at, services_at
from mcp_client import list_tools

PACKAGE = Path(__file__).resolve().parent.parent / "sae_mcp"
TOOLS_DIR = PACKAGE / "server" / "tools"
NAMES = {spec.name for spec in TOOLS}


def test_the_server_lists_exactly_the_registered_tools_in_order_each_serving_its_result_model(tiny_engine, tmp_path):
    server = server_at(tiny_engine, tmp_path, record=False)  # no run_id added to the schemas
    listed = list_tools(server)
    assert [t.name for t in listed] == [spec.name for spec in TOOLS] and len(NAMES) == len(TOOLS) == 21
    for tool, spec in zip(listed, TOOLS):
        schema = tool.output_schema
        assert schema["title"] == spec.result.__name__, tool.name
        assert set(schema["properties"]) == set(spec.result.model_fields), tool.name


def test_the_ledger_records_the_tools_whose_spec_has_a_ledger_rule(tiny_engine, tmp_path):
    """run_id is in the output schema exactly where the spec says the tool is recorded (the ledger tool is not)."""
    listed = list_tools(server_at(tiny_engine, tmp_path))
    recorded = {t.name for t in listed if "run_id" in t.output_schema["properties"]}
    assert recorded == {spec.name for spec in TOOLS if spec.ledger is not None} and len(recorded) == 20


def test_every_tool_is_one_module_named_after_it_and_registered_once():
    modules = {p.stem for p in TOOLS_DIR.glob("*.py")} - {"__init__", "spec"}
    assert modules == NAMES
    for spec in TOOLS:
        assert spec.make.__module__ == f"sae_mcp.server.tools.{spec.name}"


def no_defaults(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]


def own_callables(spec: ToolSpec) -> list:
    """The behaviour a spec names besides its annotations (which tools share: read_only, the corpus tools')."""
    rules = [spec.ledger, spec.export, spec.replay]
    found = [spec.make, spec.render, spec.resources]
    found += [getattr(rule, f.name) for rule in rules if rule is not None for f in dataclasses.fields(rule)]
    return [x for x in found if callable(x)]


def test_every_spec_is_whole_each_choice_stated_in_its_module(tiny_engine, tmp_path):
    for cls in (ToolSpec, LedgerRule, ExportRule, ReplayRule):
        assert no_defaults(cls) == [], f"{cls.__name__}: a default hides a choice"
    services = services_at(tiny_engine, tmp_path)
    deps = ToolDeps(engine=tiny_engine, services=services, args=engine_args(tiny_engine), tools=tool_map(),
                    conversations=build_server(tiny_engine, services=services).conversations)
    for spec in TOOLS:
        recorded = spec.ledger is not None
        assert (spec.export is not None) == recorded and (spec.replay is not None) == recorded, spec.name
        assert isinstance(spec.annotations(deps), ToolAnnotations), spec.name
        assert callable(spec.make(deps)), spec.name
        for fn in own_callables(spec):  # its rendering, summary, resolve, export cell, replay rule: in its module
            assert fn.__module__ == f"sae_mcp.server.tools.{spec.name}", (spec.name, fn)
        if spec.ledger is not None:
            assert spec.ledger.bos in ("sae", "model", None)
            assert all(isinstance(p, str) and p for p in spec.ledger.volatile), spec.name
        if spec.export is not None:
            assert all(isinstance(h, str) and h.startswith("def ") for h in spec.export.helpers), spec.name
            assert spec.export.cell is not None or not spec.export.helpers, spec.name


# -- no tool name outside its module --------------------------------------------------------------------------------


def docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (prose)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def told_apart(tree: ast.AST) -> set[int]:
    """The ids of string constants that stand where a tool name is not meant: a path segment (an operand of `/`,
    e.g. <data_dir> / "ledger") or a CLI command (the first argument of add_parser)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            out.update(id(x) for x in (node.left, node.right) if isinstance(x, ast.Constant))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_parser" and node.args:
            out.add(id(node.args[0]))
    return out


def tool_names_in(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each tool name written as a string: a constant that is the name, or the name quoted inside a
    longer string that is not prose (SQL such as "tool = 'x'"); prose that merely mentions a tool is fine."""
    tree = ast.parse(source)
    prose, apart = docstrings(tree), told_apart(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in apart:
            continue
        if node.value in names:
            found.append((node.lineno, node.value))
        elif id(node) not in prose:
            found += [(node.lineno, n) for n in names if f"'{n}'" in node.value or f'"{n}"' in node.value]
    return found


def test_the_scan_finds_a_tool_name_and_tells_a_path_or_command_apart():
    source = '''
"""Docstring naming 'steer_generate' in prose."""
if run.tool == "steer_generate":
    pass
rows = conn.execute("SELECT * FROM runs WHERE tool = 'label_feature'")
folder = Path(data_dir) / "ledger"
sub.add_parser("ledger", help="the record")
note = "call score_explanation again"
'''
    found = tool_names_in(source, NAMES)
    assert sorted(found) == [(3, "steer_generate"), (5, "label_feature")]
    assert tool_names_in('tools = ("ledger",)', NAMES) == [(1, "ledger")]  # a tool name, not a path


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_tool_name_is_written_outside_its_module_and_the_registration(path):
    if path.parent == TOOLS_DIR and path.stem == "__init__":
        return
    own = {path.stem} if path.parent == TOOLS_DIR else set()
    found = [(line, name) for line, name in tool_names_in(path.read_text(encoding="utf-8"), NAMES) if name not in own]
    assert found == [], f"{path.relative_to(PACKAGE)} names tools: read their spec instead"
