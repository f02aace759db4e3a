"""Explanations, labels, feature cards and logit-weight statistics.

register(server, tool, engine, services) adds:
    tools       search_explanations, label_feature (the one writing tool), feature_card, feature_stats,
                token_set_enrichment
    resource    feature://{sae}/{feature}   the feature card as markdown ({sae} is the key, dots and all:
                feature://blocks.7.hook_resid_pre/123)

No `from __future__ import annotations` here: the SDK reads the tools' annotations at registration.
"""

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from pydantic import Field

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.token_sets import BUILTIN_SETS
from sae_mcp.errors import SaeMcpError
from sae_mcp.results.explain import (
    ExplanationMatch,
    ExplanationSearch,
    FeatureCardResult,
    FeatureStats,
    LabelRecorded,
    TokenSetEnrichment,
)
from sae_mcp.server.args import engine_args
from sae_mcp.server.card_text import card_markdown
from sae_mcp.server.wiring import WRITES, ToolDecorator
from sae_mcp.services import Services

SetName = Annotated[str, Field(max_length=64)]


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    max_k = engine.limits.max_top_k
    A = engine_args(engine)
    SaeArg, FeatureArg = A.Sae, A.Feature

    def key_of_source() -> dict[str, str]:
        """Store key (source + weights id) -> the key tools address the SAE by."""
        return {s.store_key: s.key for s in engine.saes.values()}

    @tool()
    def search_explanations(
        query: Annotated[
            str, Field(min_length=1, max_length=500, description="Words to look for, e.g. 'bible verses'")
        ],
        sae: SaeArg = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Matches to return")] = 10,
    ) -> ExplanationSearch:
        """Search feature explanations: those imported (`sae-mcp explanations import`, e.g. Neuronpedia's export)
        and the labels recorded with label_feature. Ranked by FTS5 bm25, fused with sentence-embedding similarity
        when the optional semantic extra is installed (`ranking` says which). Without sae, searches every loaded SAE."""
        saes = [engine.sae(sae)] if sae else list(engine.saes.values())
        found, ranking = services.explanations.search(query, [s.store_key for s in saes], top_k=top_k)
        keys = key_of_source()
        matches = [
            ExplanationMatch(feature=e.feature, sae=keys.get(e.sae, e.sae), description=e.description,
                             source=e.source, score=float(f"{e.score:.4g}"))  # digits, not decimals: bm25 can be ~1e-6
            for e in found
        ]
        note = None
        if not matches:
            total = sum(sum(services.explanations.counts(s.store_key).values()) for s in saes)
            note = (
                "no explanation or label matched" if total else
                "nothing to search yet: import explanations (`sae-mcp explanations import --sae SPEC "
                "--neuronpedia`, or a JSON/JSONL/CSV file of {feature, description}) or record labels with "
                "label_feature"
            )
        return ExplanationSearch(query=query, ranking=ranking, matches=matches, note=note)

    @tool(annotations=WRITES)
    def label_feature(
        feature: FeatureArg,
        label: Annotated[str, Field(min_length=1, max_length=1000, description="What the feature responds to / does")],
        sae: SaeArg = None,
        evidence: Annotated[
            str | None,
            Field(max_length=4000, description="What supports the label: examples, tool results, ablation effects"),
        ] = None,
    ) -> LabelRecorded:
        """Record your own explanation of a feature, with the evidence behind it. Labels persist across restarts
        (for these weights: an SAE re-trained into the same folder starts without labels), are searchable at once
        with search_explanations (source 'label') and appear on the feature's card.
        Each call adds a label (earlier ones are kept)."""
        s = engine.sae(sae)
        engine.check_feature(s, feature)
        store = services.explanations
        rec = store.add_label(s.store_key, feature, label, (evidence or "").strip() or None)
        n = sum(1 for e in store.for_feature(s.store_key, feature) if e.source == "label")
        return LabelRecorded(feature=feature, sae=s.key, label=rec.description, evidence=rec.evidence,
                             labels_for_feature=n)

    @tool()
    def feature_card(
        feature: FeatureArg,
        sae: SaeArg = None,
        examples: Annotated[int, Field(ge=0, le=20, description="Top examples shown (from the corpus index)")] = 5,
        tokens: Annotated[int, Field(ge=1, le=50, description="Logit-lens tokens per side")] = 8,
    ) -> FeatureCardResult:
        """Everything known about one feature in one compact markdown card: explanations and labels, density,
        histogram and top examples from the corpus index (when built), the tokens its decoder promotes and
        suppresses, and its logit-weight statistics. Also readable as the resource feature://{sae}/{feature}."""
        s = engine.sae(sae)
        md = card_markdown(services, feature, s.key, n_examples=examples, n_tokens=tokens)
        return FeatureCardResult(sae=s.key, feature=feature, uri=f"feature://{s.key}/{feature}", markdown=md)

    @tool()
    def feature_stats(
        sae: SaeArg = None,
        features: Annotated[
            A.Features | None, Field(description="Only these features (default: every feature of the SAE)")
        ] = None,
        sort_by: Annotated[
            str,
            Field(pattern="^(skewness|kurtosis|mean|std|density|feature)$", description="Column to sort by"),
        ] = "skewness",
        descending: Annotated[bool, Field(description="Largest first")] = True,
        top: Annotated[int, Field(ge=1, le=max_k, description="Features to return")] = 20,
        min_density: Annotated[
            float | None, Field(ge=0, le=1, description="Keep features firing at least this often (needs the index)")
        ] = None,
        max_density: Annotated[
            float | None, Field(ge=0, le=1, description="Keep features firing at most this often (needs the index)")
        ] = None,
    ) -> FeatureStats:
        """Statistics of each feature's logit weights W_dec[f] @ W_U over the vocabulary: mean, std, skewness and
        kurtosis (the tutorial's feature statistics), with density when the corpus is indexed. Sort and filter,
        e.g. the most skewed features (sort_by='skewness') are the ones that promote a few specific tokens.
        The mean is ~0 for every feature when the model's unembedding is mean-centred (transformer-lens'
        center_unembed, its default), since W_U's rows then sum to 0 over the vocabulary; compare features by
        std, skewness and kurtosis."""
        s = engine.sae(sae)
        return services.stats.feature_stats(
            s.key, features=features, sort_by=sort_by, descending=descending, top=top,
            densities=services.densities(s.key), min_density=min_density, max_density=max_density,
        )

    @tool()
    def token_set_enrichment(
        sets: Annotated[
            list[SetName] | None,
            Field(max_length=16, description=f"Built-in sets: {', '.join(BUILTIN_SETS)} (default: all, when no "
                  "token_sets/regex_sets are given). They leave out special tokens, byte-fallback pieces <0x..> "
                  "(bar whitespace) and tokens with control characters"),
        ] = None,
        token_sets: Annotated[
            dict[SetName, Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=4096)]] | None,
            Field(max_length=16,
                  description="Named sets given as token lists, e.g. {\"days\": [\" Monday\", \" Tuesday\"]}"),
        ] = None,
        regex_sets: Annotated[
            dict[SetName, Annotated[str, Field(max_length=512)]] | None,
            Field(max_length=16, description="Named sets given as a regex over each token's text, e.g. "
                  "{\"years\": \"^ ?1[89][0-9]{2}$\"}"),
        ] = None,
        sae: SaeArg = None,
        features: Annotated[
            A.Features | None, Field(description="Only these features (default: every feature)")
        ] = None,
        top: Annotated[int, Field(ge=1, le=max_k, description="Features per set and direction")] = 10,
    ) -> TokenSetEnrichment:
        """Which features' logit weights (W_dec[f] @ W_U) are enriched for a set of tokens: per set, the features
        that most promote it and most suppress it. Score = rank-biserial r = 2*AUC-1 of the set's logit weights
        against the rest of the vocabulary (Mann-Whitney), in [-1, 1], with its z; the sign is the direction."""
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

