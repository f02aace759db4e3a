"""Explanations, labels, feature cards and logit-weight statistics.

register(server, tool, engine, services) adds:
    tools       search_explanations, label_feature (the one writing tool; with `score` it also hands out the
                label's blind set), describe_features, feature_card, feature_stats, token_set_enrichment
    resource    feature://{sae}/{feature}   the feature card as markdown ({sae} is the key, dots and all:
                feature://blocks.7.hook_resid_pre/123)

No `from __future__ import annotations` here: the SDK reads the tools' annotations at registration.
"""

from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from pydantic import BaseModel, Field

from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.token_sets import BUILTIN_SETS
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.results.explain import (
    ExplanationMatch,
    ExplanationSearch,
    FeatureCardResult,
    FeatureDescriptions,
    FeatureStats,
    LabelRecorded,
    TokenSetEnrichment,
)
from sae_mcp.server.args import engine_args
from sae_mcp.server.card_text import card_markdown
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.renderings import describe_text, describe_text_head
from sae_mcp.server.tools_scoring import CHALLENGES, conversation_of
from sae_mcp.server.wiring import ToolDecorator
from sae_mcp.services import Services
from sae_mcp.services.describe import describe_feature
from sae_mcp.services.score_results import brief
from sae_mcp.services.score_runs import ExplanationScorer
from sae_mcp.services.scoring import DEFAULT_MIN_ACTIVATION, MIN_ACTIVATION_RANGE

SetName = Annotated[str, Field(max_length=64)]
MAX_DESCRIBED = 32  # features one describe_features call may name
MAX_BUDGET = 30_000  # characters of its text
LEFT_OUT_RESERVE = 200  # characters kept for the line listing the features left out


class ScoreRequest(BaseModel):
    """label_feature(score=...): the blind set to hand out for the label just recorded (as score_explanation)."""

    method: Literal["detection", "fuzzing"] = "detection"
    n: Annotated[int, Field(ge=4, le=100)] = 20
    seed: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    min_activation: Annotated[float, Field(ge=MIN_ACTIVATION_RANGE[0], le=MIN_ACTIVATION_RANGE[1])] = (
        DEFAULT_MIN_ACTIVATION)


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    max_k = engine.limits.max_top_k
    A = engine_args(engine)
    SaeArg, FeatureArg = A.Sae, A.Feature

    def key_of_source() -> dict[str, str]:
        """Store key (source + weights id) -> the key tools address the SAE by."""
        return {s.store_key: s.key for s in engine.saes.values()}

    @tool()
    def search_explanations(
        query: Annotated[str, Field(min_length=1, max_length=500)],
        sae: SaeArg = None,
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

    scorer = ExplanationScorer(services)

    @tool(annotations=CHALLENGES)
    def label_feature(
        feature: FeatureArg,
        label: Annotated[str, Field(min_length=1, max_length=1000)],
        sae: SaeArg = None,
        evidence: Annotated[str | None, Field(max_length=4000, description="What supports it, with numbers")] = None,
        idempotency_key: Annotated[
            str | None, Field(min_length=1, max_length=128, description="A retry with it adds nothing")
        ] = None,
        evidence_runs: Annotated[
            list[Annotated[str, Field(max_length=32)]] | None,
            Field(max_length=64, description="run_ids it rests on"),
        ] = None,
        score: Annotated[ScoreRequest | None, Field(description="Also hand out its blind set, e.g. "
                                                    '{"n": 20}')] = None,
        mcp_context: Context = None,
    ) -> LabelRecorded:
        """Record your explanation of a feature, citing run_ids; with score, also get its blind set."""
        s = engine.sae(sae)
        engine.check_feature(s, feature)
        runs = list(dict.fromkeys(evidence_runs or [])) or None
        missing = services.ledger.store.missing(runs) if runs else []
        if missing:
            raise InvalidInput(f"evidence_runs: no run {', '.join(map(repr, missing))} in the ledger; cite the "
                               "run_id of results (ledger() lists them)")
        store = services.explanations
        rec = store.add_label(s.store_key, feature, label, (evidence or "").strip() or None, idempotency_key, runs)
        n = sum(1 for e in store.for_feature(s.store_key, feature) if e.source == "label")
        scored = services.scores.latest([(s.store_key, feature, rec.description)]).get(
            (s.store_key, feature, rec.description), [])
        recorded = LabelRecorded(feature=feature, sae=s.key, label_id=rec.id, labels_for_feature=n,
                                 scored=[brief(x) for x in scored] or None)
        if score is None:
            return recorded
        cancel = CancelToken()
        try:
            issued = scorer.issue(s.key, feature, None, rec.id, score.n, score.method, score.seed,
                                  score.min_activation, session=conversation_of(server.conversations, mcp_context),
                                  progress=progress_reporter(mcp_context, cancel, "tokens scanned"), cancel=cancel)
        except SaeMcpError as exc:  # the label stays recorded: say so rather than fail the call that wrote it
            return recorded.model_copy(update={"warnings": [
                f"label recorded, but no blind set: {exc}; score it later with score_explanation(label_id=...)"]})
        return recorded.model_copy(update={"challenge": issued.blind, "submit_secret": issued.submit_secret})

    @tool()
    def describe_features(
        features: Annotated[list[FeatureArg], Field(min_length=1, max_length=MAX_DESCRIBED)],
        sae: SaeArg = None,
        examples: Annotated[int, Field(ge=0, le=20, description="Top examples each")] = 4,
        per_band: Annotated[int, Field(ge=0, le=4, description="Samples per band (4 bands)")] = 2,
        context: Annotated[int, Field(ge=1, le=32, description="Tokens each side")] = 8,
        tokens: Annotated[int, Field(ge=0, le=20, description="Logit-lens tokens per side")] = 6,
        budget: Annotated[int, Field(ge=500, le=MAX_BUDGET, description="Max text characters")] = 8000,
    ) -> FeatureDescriptions:
        """The evidence to explain features, several per call: examples, band samples, logit lens, labels."""
        s = engine.sae(sae)
        out, left_out = [], []
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

    @tool(page_in_text=True)
    def feature_card(
        feature: FeatureArg,
        sae: SaeArg = None,
        examples: Annotated[int, Field(ge=0, le=20)] = 5,
        tokens: Annotated[int, Field(ge=1, le=50, description="Logit-lens tokens per side")] = 8,
    ) -> FeatureCardResult:
        """Everything known about one feature, as markdown."""
        s = engine.sae(sae)
        md = card_markdown(services, feature, s.key, n_examples=examples, n_tokens=tokens)
        return FeatureCardResult(sae=s.key, feature=feature, uri=f"feature://{s.key}/{feature}", markdown=md)

    @tool()
    def feature_stats(
        sae: SaeArg = None,
        features: A.Features | None = None,
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

    @tool()
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
        sae: SaeArg = None,
        features: A.Features | None = None,
        top: Annotated[int, Field(ge=1, le=max_k, description="Per set and direction")] = 10,
    ) -> TokenSetEnrichment:
        """Features whose logit weights most promote or suppress a token set."""
        return services.stats.token_set_enrichment(
            sets=sets, token_sets=token_sets, regex_sets=regex_sets, sae=sae, features=features, top=top
        )

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

