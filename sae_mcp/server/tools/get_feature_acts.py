"""get_feature_acts: the SAE features firing at each token of a prompt, and chosen features traced along it.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

import heapq
from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.engine import features as feat
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results import FeatureActs
from sae_mcp.server.text import fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., FeatureActs]:
    engine, A = deps.engine, deps.args
    max_k = engine.limits.max_top_k

    def get_feature_acts(
        prompt: Annotated[str, A.prompt],
        sae: Annotated[str | None, A.sae] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 5,
        features: Annotated[
            Annotated[list[Annotated[int, A.feature]], A.features] | None, Field(description="Also trace these")
        ] = None,
        position: Annotated[int, A.position] | None = None,
    ) -> FeatureActs:
        """The SAE features firing at each token of a prompt (top_k per position), and `features` traced."""
        return feat.get_feature_acts(engine, prompt, sae=sae, top_k=top_k, features=features, position=position)

    return get_feature_acts


def render(r: FeatureActs) -> str:
    lines = [f"sae {r.sae}: {len(r.tokens)} tokens; per position: index token L0 (active features), then "
             "feature=activation, largest first"]
    for p in r.positions:
        top = " ".join(f"{a.feature}={fmt(a.activation)}" for a in p.top) or "(none active)"
        lines.append(f"{p.position} {tok(p.token)} L0={p.l0}: {top}")
    for f, trace in (r.features or {}).items():
        lines.append(f"feature {f} at the positions above: " + " ".join(fmt(a) for a in trace))
    return join(lines + warnings_lines(r.warnings))


def summary(r: JSON) -> str:
    cells = ((a["activation"], p["position"], p["token"], a["feature"]) for p in r.get("positions", [])
             if p.get("position", 0) > 0 for a in p.get("top", []))
    best = heapq.nlargest(3, cells)  # written with every run: no sort of every cell
    return f"{len(r.get('tokens', []))} tokens; strongest: " + ", ".join(
        f"{pos} {t!r} {f}={ls.fmt(a)}" for a, pos, t, f in best)


def features(r: JSON) -> set[int]:
    return {a["feature"] for p in r.get("positions") or [] for a in p.get("top") or []}


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    rows = [(p["position"], p["l0"], [(a["feature"], a["activation"]) for a in items(p["top"])])
            for p in items(res["positions"])]
    traces = {int(f): v for f, v in (res.get("features") or {}).items()}
    # A cut copy kept each list's first (largest) entries: nothing left out exceeds the last one kept.
    k = "len(top)" if run.truncated else r["top_k"]
    return f"""\
acts = sae_acts({r['sae']!r}, {r['prompt']!r}, prepend_bos={r['prepend_bos']})  # [seq, d_sae]
assert acts.shape[0] == {len(res['tokens'])}, "the prompt tokenizes differently than when recorded"
recorded = {lit(rows, 11)}  # (position, L0, [(feature, activation), ...])
for position, l0, top in recorded:
    for feature, activation in top:
        close(acts[position, feature], activation, f"position {{position}} feature {{feature}}")
    check_top(acts[position], top, {k}, f"position {{position}}")
    assert abs(int((acts[position] > 0).sum()) - l0) <= 1, f"position {{position}}: L0, recorded {{l0}}"
traces = {lit(traces, 9)}  # feature -> its activation at each position above
for feature, trace in traces.items():
    for (position, _, _), activation in zip(recorded, trace):
        close(acts[position, feature], activation, f"feature {{feature}} at position {{position}}")
print({run.id!r}, "get_feature_acts reproduced:", len(recorded), "positions")
"""


SPEC = ToolSpec(
    name="get_feature_acts",
    make=make,
    result=FeatureActs,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos="sae", resolve=None, features=features, keeps_runs=False,
                      looks_up=True, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(), note=None, details=None, label=None, score=None),
    replay=AS_GIVEN,
)
