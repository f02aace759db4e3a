"""feature_card: everything known about one feature as markdown (explanations, labels, index data, logit lens,
statistics); also the resource feature://{sae}/{feature} ({sae} is the key, dots and all:
feature://blocks.7.hook_resid_pre/123) and the feature's HTML page.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from pydantic import Field

from sae_mcp.cards.text import card_markdown
from sae_mcp.errors import SaeMcpError
from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.explain import FeatureCardResult
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., FeatureCardResult]:
    engine, services, A = deps.engine, deps.services, deps.args

    def feature_card(
        feature: Annotated[int, A.feature],
        sae: Annotated[str | None, A.sae] = None,
        examples: Annotated[int, Field(ge=0, le=20)] = 5,
        tokens: Annotated[int, Field(ge=1, le=50, description="Logit-lens tokens per side")] = 8,
    ) -> FeatureCardResult:
        """Everything known about one feature, as markdown."""
        s = engine.sae(sae)
        md = card_markdown(services, feature, s.key, n_examples=examples, n_tokens=tokens)
        return FeatureCardResult(sae=s.key, feature=feature, uri=f"feature://{s.key}/{feature}", markdown=md)

    return feature_card


def resources(server: MCPServer, deps: ToolDeps) -> None:
    services = deps.services

    @server.resource(
        "feature://{sae}/{feature}",
        name="feature_card",
        title="Feature card",
        description="One feature's card (explanations, labels, index data, logit lens, statistics) as markdown. "
        "{sae} is the SAE key from model_info, e.g. feature://blocks.7.hook_resid_pre/123",
        mime_type="text/markdown",
    )
    def feature_resource(sae: str, feature: str) -> str:
        # ResourceError carries our message to the client (other exceptions become a generic error)
        try:
            f = int(feature)
        except ValueError:
            raise ResourceError(f"feature {feature!r} in the URI is not an integer: use feature://{sae}/123") from None
        try:
            return card_markdown(services, f, sae)
        except SaeMcpError as exc:
            raise ResourceError(str(exc)) from exc


def render(r: FeatureCardResult) -> str:
    return f"{r.markdown}\n(also the resource {r.uri})"


def summary(r: JSON) -> str:
    return (r.get("markdown") or "").split("\n", 1)[0].lstrip("# ")


SPEC = ToolSpec(
    name="feature_card",
    make=make,
    result=FeatureCardResult,
    render=render,
    annotations=read_only,
    page_in_text=True,  # a view a person opens
    resources=resources,
    ledger=LedgerRule(summary=summary, volatile=(), bos=None, resolve=None, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
