"""model_info: where an agent starts. The model, its SAEs (keys, hooks, fidelity) and the corpus, said once here so
that top_examples and build_index need not repeat it.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable

from sae_mcp.engine.runtime import model_info
from sae_mcp.errors import SaeMcpError
from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results import ModelInfo
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[[], ModelInfo]:
    engine, services = deps.engine, deps.services

    def model_info_tool() -> ModelInfo:
        """Start here: the model, its SAEs (keys, hooks, fidelity) and the corpus."""
        info = model_info(engine)
        for s in info.saes:
            s.fidelity, s.fidelity_note = services.fidelity(s.key)
            try:  # said once here: top_examples and build_index no longer repeat it in their text
                s.corpus = services.examples.corpus(engine.sae(s.key)).describe()
            except SaeMcpError:  # no corpus given and no training dataset known
                s.corpus = None
        return info

    return model_info_tool


def summary(r: JSON) -> str:
    return f"{r.get('model')}, SAEs " + ", ".join(s.get("key", "") for s in r.get("saes", []))


SPEC = ToolSpec(
    name="model_info",
    make=make,
    result=ModelInfo,
    render=None,  # compact JSON: a few named fields, read once
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=("fidelity_note",), bos=None, resolve=None, features=None,
                      keeps_runs=False, looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
