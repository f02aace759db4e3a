"""token_set_enrichment: the features whose logit weights promote or suppress a set of tokens most (rank-biserial
score and z), for built-in sets, given token lists or regexes over the vocabulary.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.engine.token_sets import BUILTIN_SETS
from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.explain import TokenSetEnrichment
from sae_mcp.server.text import fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only

SetName = Annotated[str, Field(max_length=64)]


def make(deps: ToolDeps) -> Callable[..., TokenSetEnrichment]:
    engine, services, A = deps.engine, deps.services, deps.args
    max_k = engine.limits.max_top_k

    def token_set_enrichment(
        sets: Annotated[
            list[SetName] | None,
            Field(max_length=16, description=f"{', '.join(BUILTIN_SETS)} (default: all)"),
        ] = None,
        token_sets: Annotated[
            dict[SetName, Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=4096)]] | None,
            Field(max_length=16, description="{name: [tokens]}, e.g. {\"days\": [\" Monday\", \" Tuesday\"]}"),
        ] = None,
        regex_sets: Annotated[
            dict[SetName, Annotated[str, Field(max_length=512)]] | None,
            Field(max_length=16, description="{name: regex}, e.g. {\"years\": \"^ ?1[89][0-9]{2}$\"}"),
        ] = None,
        sae: Annotated[str | None, A.sae] = None,
        features: Annotated[list[Annotated[int, A.feature]], A.features] | None = None,
        top: Annotated[int, Field(ge=1, le=max_k, description="Per set and direction")] = 10,
    ) -> TokenSetEnrichment:
        """Features whose logit weights most promote or suppress a token set."""
        return services.stats.token_set_enrichment(
            sets=sets, token_sets=token_sets, regex_sets=regex_sets, sae=sae, features=features, top=top
        )

    return token_set_enrichment


def render(r: TokenSetEnrichment) -> str:
    lines = [f"sae {r.sae}, {r.n_features} features; per set: feature r (rank-biserial) z"]
    for s in r.sets:
        lines.append(f"{s.name} ({s.size} tokens, e.g. {' '.join(map(tok, s.examples[:4]))})"
                     + (f"; not single tokens: {s.unmatched}" if s.unmatched else ""))
        lines.append("  promotes: " + (", ".join(f"{e.feature} {fmt(e.score)} {fmt(e.z)}" for e in s.promoted)
                                       or "none"))
        lines.append("  suppresses: " + (", ".join(f"{e.feature} {fmt(e.score)} {fmt(e.z)}" for e in s.suppressed)
                                         or "none"))
    if r.skipped:
        lines.append(f"skipped (empty in this vocabulary): {', '.join(r.skipped)}")
    return join(lines + warnings_lines(r.warnings))


def summary(r: JSON) -> str:
    return "; ".join(f"{x['name']}: " + " ".join(str(e["feature"]) for e in x.get("promoted", [])[:3])
                     for x in r.get("sets", [])[:4])


SPEC = ToolSpec(
    name="token_set_enrichment",
    make=make,
    result=TokenSetEnrichment,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos=None, resolve=None, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
