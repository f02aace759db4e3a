"""MCP prompts: the markdown investigation recipes of the top-level prompts/ folder (installed as the package
sae_mcp.prompts, so a wheel and a checkout read the same files). A recipe file looks like

    ---
    title: Investigate a feature
    description: One line saying when to use it.
    arguments:
    - feature (required): the feature index
    - sae: SAE key; optional when one SAE is loaded
    ---
    The recipe, mentioning {feature} and {sae}, which are replaced by the arguments' values.
"""

from __future__ import annotations

import re
import sys
from importlib.resources import files
from typing import Any

from mcp.server.mcpserver.prompts.base import Prompt, PromptArgument

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:  # where 3.10 has it
    from importlib.abc import Traversable

FRONT_MATTER = re.compile(r"^---\n(.*?)\n---\n(.*)$", re.S)
ARGUMENT = re.compile(r"^\s*-\s*(\w+)\s*(\(required\))?\s*:\s*(.*)$")


def recipe_files() -> list[Traversable]:
    """The recipes shipped with the package, by name."""
    return sorted((f for f in files("sae_mcp.prompts").iterdir() if f.name.endswith(".md")), key=lambda f: f.name)


def parse_prompt(text: str) -> tuple[dict[str, str], list[PromptArgument], str]:
    """Front matter (title, description, arguments) and body of one recipe file."""
    meta: dict[str, str] = {}
    args: list[PromptArgument] = []
    body = text
    m = FRONT_MATTER.match(text)
    if m:
        head, body = m.group(1), m.group(2)
        for line in head.splitlines():
            arg = ARGUMENT.match(line)
            if arg:
                args.append(PromptArgument(name=arg.group(1), required=bool(arg.group(2)),
                                           description=arg.group(3).strip()))
            elif ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                meta[k.strip()] = v.strip()
    return meta, args, body.strip() + "\n"


def render(body: str, names: list[str], values: dict[str, Any]) -> str:
    """The body with each declared {argument} replaced; one not given reads '(not given)'."""
    for n in names:
        v = values.get(n)
        body = body.replace("{" + n + "}", str(v) if v not in (None, "") else "(not given)")
    return body


def recipe_prompt(name: str, text: str) -> Prompt:
    meta, args, body = parse_prompt(text)
    names = [a.name for a in args]

    def fn(**values: Any) -> str:  # the SDK passes exactly the declared arguments
        return render(body, names, values)

    return Prompt(name=name, title=meta.get("title"), description=meta.get("description", ""),
                  arguments=args or None, fn=fn)


def load_prompts() -> list[Prompt]:
    return [recipe_prompt(f.name.removesuffix(".md"), f.read_text(encoding="utf-8")) for f in recipe_files()]
