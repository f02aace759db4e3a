"""The scorer's prompt (score_explanation with auto: sent to the client's model through MCP sampling) and reading its
answer back as predictions.

The prompt texts are prompts/scoring/<method>.md (installed as sae_mcp.prompts/scoring), with {explanation}, {n},
{n_true} (how many contexts are true, as the blind set states it) and {contexts} filled in; they are fixed, so scores
from different sessions were asked the same question.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files

from sae_mcp.errors import InvalidInput
from sae_mcp.results.scoring import BlindSet

TRUE_WORDS = {"true", "yes", "y", "1", "fires"}
FALSE_WORDS = {"false", "no", "n", "0"}
LINE = re.compile(r"^\W*(\d+)\W+(true|false|yes|no|y|n|1|0|fires)\b", re.I | re.M)
SLOT = re.compile(r"\{(explanation|n_true|n|contexts)\}")


def scorer_prompt(blind: BlindSet) -> str:
    text = files("sae_mcp.prompts").joinpath("scoring").joinpath(f"{blind.method}.md").read_text(encoding="utf-8")
    contexts = "\n".join(f"{c.id}: {c.text}" for c in blind.contexts)
    values = {"explanation": blind.explanation, "n": str(len(blind.contexts)), "n_true": str(blind.n_true),
              "contexts": contexts}
    return SLOT.sub(lambda m: values[m.group(1)], text)  # one pass: braces in the explanation stay as written


def answer_tokens(n: int) -> int:
    """A generous max_tokens for an answer of n `"id": bool` pairs (~6 tokens each), JSON punctuation included."""
    return 64 + 10 * n


def read_predictions(reply: str, ids: list[str]) -> dict[str, bool]:
    """The scorer's reply -> {id: bool} for every id: a JSON object (the first { to the last } of the reply), else
    a JSON list of one true/false per context in the order shown, else lines 'id: yes'. InvalidInput saying what
    was wrong when ids are missing or a value is not a yes/no."""
    found = _from_json(reply) or _from_list(reply, ids)
    if found is None:
        found = {m.group(1): m.group(2).lower() in TRUE_WORDS for m in LINE.finditer(reply)}
    missing = [i for i in ids if i not in found]
    if missing:
        raise InvalidInput(f"no true/false for {len(missing)} of the {len(ids)} contexts (e.g. id {missing[0]}) in "
                           f"the reply {reply[:120]!r}")
    return {i: found[i] for i in ids}


def _from_list(reply: str, ids: list[str]) -> dict[str, bool] | None:
    """[true, false, ...]: one boolean per context, in the order shown (nothing else is read as a list)."""
    start, end = reply.find("["), reply.rfind("]")
    try:
        data = json.loads(reply[start : end + 1]) if 0 <= start < end else None
    except ValueError:
        return None
    if not isinstance(data, list) or len(data) != len(ids) or not all(isinstance(v, bool) for v in data):
        return None
    return dict(zip(ids, data))


def _from_json(reply: str) -> dict[str, bool] | None:
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(reply[start : end + 1])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    out = {}
    for k, v in data.items():
        word = str(v).strip().lower()
        if isinstance(v, bool) or word in TRUE_WORDS | FALSE_WORDS:
            out[str(k).strip()] = v if isinstance(v, bool) else word in TRUE_WORDS
    return out
