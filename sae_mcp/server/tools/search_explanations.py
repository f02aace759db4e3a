"""search_explanations: full-text (BM25, and semantic when installed) search over imported explanations and the
agent's own labels, each match with its blind scores.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.explain import ExplanationMatch, ExplanationSearch
from sae_mcp.scoring.results import brief, brief_text
from sae_mcp.server.text import fmt, join
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., ExplanationSearch]:
    engine, services, A = deps.engine, deps.services, deps.args
    max_k = engine.limits.max_top_k

    def key_of_source() -> dict[str, str]:
        """Store key (source + weights id) -> the key tools address the SAE by."""
        return {s.store_key: s.key for s in engine.saes.values()}

    def search_explanations(
        query: Annotated[str, Field(min_length=1, max_length=500)],
        sae: Annotated[str | None, A.sae] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
    ) -> ExplanationSearch:
        """Search feature explanations (imported and your labels) by text."""
        saes = [engine.sae(sae)] if sae else list(engine.saes.values())
        found, ranking = services.explanations.search(query, [s.store_key for s in saes], top_k=top_k)
        keys = key_of_source()
        scored = services.scores.latest([(e.sae, e.feature, e.description) for e in found])
        matches = [
            ExplanationMatch(feature=e.feature, sae=keys.get(e.sae, e.sae), description=e.description,
                             source=e.source, score=float(f"{e.score:.4g}"),  # digits, not decimals: bm25 can be ~1e-6
                             scored=[brief(x) for x in scored.get((e.sae, e.feature, e.description), [])] or None)
            for e in found
        ]
        note = None
        if matches and ranking == "semantic":
            note = (f"no word of the query occurs in any explanation or label: these {len(matches)} matches are by "
                    "meaning alone (embedding similarity), which also ranks loosely related text; read each one "
                    "before relying on it")
        if not matches:
            total = sum(sum(services.explanations.counts(s.store_key).values()) for s in saes)
            note = (
                "no explanation or label matched" if total else
                "nothing to search yet: import explanations (`sae-mcp explanations import --sae SPEC "
                "--neuronpedia`, or a JSON/JSONL/CSV file of {feature, description}) or record labels with "
                "label_feature"
            )
        return ExplanationSearch(query=query, ranking=ranking, matches=matches, note=note)

    return search_explanations


def render(r: ExplanationSearch) -> str:
    lines = [f"{len(r.matches)} matches ({r.ranking} ranking): feature (sae, source, score): description"
             + (" [scored: method balanced accuracy (contexts)]" if any(m.scored for m in r.matches) else "")]
    lines += [f"{m.feature} ({m.sae}, {m.source}, {fmt(m.score)}): {m.description}"
              + (f" [scored: {brief_text(m.scored)}]" if m.scored else "") for m in r.matches]
    return join(lines + ([f"note: {r.note}"] if r.note else []))


def summary(r: JSON) -> str:
    return f"{len(r.get('matches', []))} matches: " + ", ".join(
        f"{m['feature']} {m['description'][:30]!r}" for m in r.get("matches", [])[:3])


def features(r: JSON) -> set[int]:
    return {m["feature"] for m in r.get("matches") or []}


SPEC = ToolSpec(
    name="search_explanations",
    make=make,
    result=ExplanationSearch,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos=None, resolve=None, features=features, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
