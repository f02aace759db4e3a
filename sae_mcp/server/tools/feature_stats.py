"""feature_stats: features' logit-weight statistics (std, skewness, kurtosis, and the mean unless the unembedding
is centred, of W_dec[f] @ W_U over the vocabulary), sorted and filtered, with density when indexed.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import Field

from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.explain import FeatureStats
from sae_mcp.server.text import fmt, join
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., FeatureStats]:
    engine, services, A = deps.engine, deps.services, deps.args
    max_k = engine.limits.max_top_k

    def feature_stats(
        sae: Annotated[str | None, A.sae] = None,
        features: Annotated[list[Annotated[int, A.feature]], A.features] | None = None,
        sort_by: Literal["skewness", "kurtosis", "mean", "std", "density", "feature"] = "skewness",
        descending: bool = True,
        top: Annotated[int, Field(ge=1, le=max_k)] = 20,
        min_density: Annotated[float | None, Field(ge=0, le=1)] = None,
        max_density: Annotated[float | None, Field(ge=0, le=1)] = None,
    ) -> FeatureStats:
        """Features' logit-weight statistics (skewness, kurtosis of W_dec[f] @ W_U), sorted, filtered."""
        s = engine.sae(sae)
        return services.stats.feature_stats(
            s.key, features=features, sort_by=sort_by, descending=descending, top=top,
            densities=services.densities(s.key), min_density=min_density, max_density=max_density,
        )

    return feature_stats


def render(r: FeatureStats) -> str:
    has_mean = any(f.mean is not None for f in r.features)
    has_density = any(f.density is not None for f in r.features)
    cols = ["feature"] + (["mean"] if has_mean else []) + ["std", "skewness", "kurtosis"] + \
        (["density"] if has_density else [])
    lines = [f"sae {r.sae}: {r.n_features} features considered, sorted by {r.sort_by}; densities {r.densities}",
             " ".join(cols)]
    for f in r.features:
        mean = [fmt(f.mean) if f.mean is not None else "n/a"] if has_mean else []
        vals = [str(f.feature)] + mean + [fmt(f.std), fmt(f.skewness), fmt(f.kurtosis)]
        lines.append(" ".join(vals + ([fmt(f.density)] if has_density and f.density is not None else [])))
    return join(lines)


def summary(r: JSON) -> str:
    return f"by {r.get('sort_by')}: " + ", ".join(
        f"{f['feature']} ({ls.fmt(f.get(r.get('sort_by')))})" for f in r.get("features", [])[:5])


SPEC = ToolSpec(
    name="feature_stats",
    make=make,
    result=FeatureStats,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos=None, resolve=None, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
