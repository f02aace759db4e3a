"""The shape of the house (issue 21). Imports point down only: each top-level package or module of sae_mcp/ has a
layer, and every import in it, at module level or inside a function, names something in a lower layer or in its own
package. A new package fails here until it is given a layer, so the order below stays the map of the house. And no
module is over 400 lines.

    the commands       cli*.py, __main__.py: parse arguments, build the server or a service, print
    server/            the MCP face: the tools (server/tools/), wiring, transports, security, progress
    pages/             what a person reads beside the agent (HTTP pages)
    cards/             what is shown about a feature, for the agent's card, describe_features and the pages
    services/          the container that builds the wings below once per server
    scoring/           blind sets, scores, challenges
    ledger/            every call recorded, exported and replayed
    index/             the feature index over the corpus (scan, state, store, Ray)
    circuits/          patching and sparse feature circuits
    store/             SQLite: the database helpers and the explanation store
    engine/            torch + transformer-lens + sae-lens, no MCP
    the ground         results/ (pydantic results), one_line, settings, errors, the bundled demo's files
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sae_mcp"

LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"cli_ledger", "cli_explain", "cli_index"},
    {"cli_common"},
    {"server"},
    {"pages"},
    {"cards"},
    {"services"},
    {"scoring"},
    {"ledger"},
    {"index"},
    {"circuits"},
    {"store"},
    {"preflight"},
    {"engine"},
    {"results"},
    {"one_line", "settings"},
    {"errors", "demo", "__init__"},
]
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def top_name(path: Path) -> str:
    """sae_mcp/ledger/export/session.py -> ledger; sae_mcp/cli_common.py -> cli_common."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every sae_mcp import in the file, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [(node.lineno, n.split(".")[1]) for n in names if n.startswith("sae_mcp.")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_and_module_has_a_layer():
    unplaced = sorted({top_name(p) for p in SOURCES} - set(LAYER_OF))
    assert unplaced == [], f"give these a layer in LAYERS: {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_only(path):
    own = top_name(path)
    upward = [f"line {line}: sae_mcp.{name}" for line, name in imported(path)
              if name != own and LAYER_OF.get(name, -1) <= LAYER_OF.get(own, -1)]
    assert upward == [], f"{own} (layer {LAYER_OF.get(own)}) imports from its own layer or above: {upward}"


def test_the_check_sees_a_function_level_import_upward(tmp_path):
    """The scan is not blind to an import inside a function (the kind that hides a cycle until it runs)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f():\n    from sae_mcp.server.app import build_server\n", encoding="utf-8")
    assert imported(probe) == [(5, "server")]
    assert LAYER_OF["server"] < LAYER_OF["engine"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    """A module a reader takes in top to bottom: past 400 lines, split it along a seam a reader would name."""
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= 400, f"{path.relative_to(PACKAGE)} has {lines} lines"
