"""describe_features: the evidence to explain several features in one read, within a character budget: density,
max, top examples (max token in «»), samples from 4 activation bands, the logit lens, the newest labels; nothing it
shows is ever in a blind set (cards/describe.py).

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.cards.describe import describe_feature
from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import LedgerRule
from sae_mcp.results.corpus import Example
from sae_mcp.results.explain import FeatureDescription, FeatureDescriptions
from sae_mcp.server.text import fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only

MAX_DESCRIBED = 32  # features one describe_features call may name
MAX_BUDGET = 30_000  # characters of its text
LEFT_OUT_RESERVE = 200  # characters kept for the line listing the features left out
DESCRIBE_HEAD = ("per feature: density, max activation, newest labels; top examples and band samples "
                 "(activation: context, max token in «»), highest band first; logit lens (+ promoted, - suppressed)")


def make(deps: ToolDeps) -> Callable[..., FeatureDescriptions]:
    engine, services, A = deps.engine, deps.services, deps.args

    def describe_features(
        features: Annotated[list[Annotated[int, A.feature]], Field(min_length=1, max_length=MAX_DESCRIBED)],
        sae: Annotated[str | None, A.sae] = None,
        examples: Annotated[int, Field(ge=0, le=20, description="Top examples each")] = 4,
        per_band: Annotated[int, Field(ge=0, le=4, description="Samples per band (4 bands)")] = 2,
        context: Annotated[int, Field(ge=1, le=32, description="Tokens each side")] = 8,
        tokens: Annotated[int, Field(ge=0, le=20, description="Logit-lens tokens per side")] = 6,
        budget: Annotated[int, Field(ge=500, le=MAX_BUDGET, description="Max text characters")] = 8000,
    ) -> FeatureDescriptions:
        """The evidence to explain features, several per call: examples, band samples, logit lens, labels."""
        s = engine.sae(sae)
        out: list[FeatureDescription] = []
        left_out: list[int] = []  # features that did not fit the budget
        used = len(describe_text_head(s.key)) + LEFT_OUT_RESERVE  # the header, and room for the left-out line
        for f in dict.fromkeys(features):
            if left_out:
                left_out.append(f)
                continue
            d = describe_feature(services, s.key, f, examples, 4 if per_band else 0, max(per_band, 1), context,
                                 tokens)
            size = len(describe_text(d)) + 1
            if out and used + size > budget:
                left_out.append(f)
                continue
            out.append(d)
            used += size
        return FeatureDescriptions(sae=s.key, features=out, left_out=left_out or None)

    return describe_features


def _context(e: Example) -> str:
    return "".join(t if i != e.position else f"«{t}»" for i, t in enumerate(e.tokens)).replace("\n", "⏎")


def describe_text(d: FeatureDescription) -> str:
    """One feature of describe_features, compactly (the tool keeps the whole answer within its budget)."""
    head = f"feature {d.feature}: " + (f"density {fmt(d.density)}, max {fmt(d.max_activation)}"
                                      if d.density is not None and d.max_activation is not None else "not indexed")
    lines = [head + ("; labels: " + " | ".join(repr(x) for x in d.labels) if d.labels else "")]
    lines += [f"  {fmt(e.activation)}: {_context(e)}" for e in d.top]
    for b in d.bands:
        lines.append(f"  band [{fmt(b.lower)}, {fmt(b.upper)}) q{fmt(b.quantiles[0])}-{fmt(b.quantiles[1])}: "
                     + ("; ".join(f"{fmt(e.activation)}: {_context(e)}" for e in b.examples) or "(top examples)"))
    if d.promotes or d.suppresses:
        lines.append("  lens + " + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in d.promotes) + "; - "
                     + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in d.suppresses))
    return join(lines + ([f"  note: {d.note}"] if d.note else []))


def describe_text_head(sae: str) -> str:
    return f"sae {sae}; {DESCRIBE_HEAD}"


def render(r: FeatureDescriptions) -> str:
    return join([describe_text_head(r.sae), *(describe_text(d) for d in r.features),
                 f"left out (over the character budget): {r.left_out}" if r.left_out else None,
                 *warnings_lines(r.warnings)])


SPEC = ToolSpec(
    name="describe_features",
    make=make,
    result=FeatureDescriptions,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=None, volatile=(), bos=None, resolve=None, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
