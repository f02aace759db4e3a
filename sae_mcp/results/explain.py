"""Results of the explanation, statistics and card tools (compact: an agent pays for every token)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from sae_mcp.results import TokenLogit, warnings_field
from sae_mcp.results.corpus import Example, Interval
from sae_mcp.results.scoring import BlindSet, ScoreBrief

# ------------------------------------------------------------------------------------- search_explanations


class ExplanationMatch(BaseModel):
    feature: int
    sae: str = Field(description="SAE key (alias or hook name) the feature belongs to")
    description: str
    source: str = Field(description="'label' (recorded by label_feature) or where it was imported from")
    score: float = Field(description="Ranking score, larger is better (bm25, or fused rank when semantic)")
    scored: list[ScoreBrief] | None = Field(
        default=None, description="How well this explanation predicts the feature: its newest score per method "
        "(score_explanation); absent when never scored"
    )


class ExplanationSearch(BaseModel):
    query: str
    ranking: str = Field(description="'lexical' (FTS5 bm25), 'lexical+semantic' (bm25 and MiniLM fused by rank), "
                         "or 'semantic' (no word of the query occurs anywhere: matches by meaning alone)")
    matches: list[ExplanationMatch]
    note: str | None = Field(default=None, description="Why there may be few matches, and what to do")


class LabelRecorded(BaseModel):
    feature: int
    sae: str
    label_id: int = Field(description="The label's id in the explanation store")
    labels_for_feature: int = Field(description="How many labels this feature now has")
    scored: list[ScoreBrief] | None = Field(
        default=None, description="Scores of this text (score_explanation), newest per method; absent when none"
    )
    challenge: BlindSet | None = Field(
        default=None, description="With score: the label's blind set; answer it with submit_predictions"
    )
    submit_secret: str | None = Field(
        default=None, description="With score: shown once; submit_predictions needs it with the challenge_id"
    )
    warnings: list[str] | None = warnings_field()


# ----------------------------------------------------------------------------------------------- statistics


class FeatureStat(BaseModel):
    feature: int
    mean: float | None = Field(
        default=None,
        description="Mean of W_dec[f] @ W_U over the vocabulary; absent when the unembedding is mean-centred "
        "(transformer-lens' center_unembed, its default), where W_U's rows sum to 0 and the mean is 0 for every "
        "feature",
    )
    std: float = Field(description="Standard deviation (population) over the vocabulary")
    skewness: float = Field(description="Third standardised moment; large positive = promotes a few tokens")
    kurtosis: float = Field(description="Fourth standardised moment (3 for a Gaussian); large = heavy tails")
    density: float | None = Field(default=None, description="Fraction of indexed tokens it fires on, when indexed")


class FeatureStats(BaseModel):
    sae: str
    sort_by: str
    n_features: int = Field(description="Features considered (after filters) before `top` was applied")
    densities: str = Field(description="'indexed' or 'not indexed: run sae-mcp index'")
    features: list[FeatureStat]


class EnrichedFeature(BaseModel):
    feature: int
    score: float = Field(description="Rank-biserial r = 2*AUC-1 in [-1, 1]: >0 the set's tokens are promoted")
    z: float = Field(description="Mann-Whitney z of the set's logit weights vs the rest of the vocabulary")


class SetEnrichment(BaseModel):
    name: str
    size: int = Field(description="Tokens of the vocabulary in the set")
    examples: list[str] = Field(description="A few of its tokens")
    unmatched: list[str] | None = Field(default=None, description="Given tokens that are not single vocabulary tokens")
    promoted: list[EnrichedFeature] = Field(description="Features whose decoder most promotes the set (score > 0)")
    suppressed: list[EnrichedFeature] = Field(description="Features whose decoder most suppresses it (score < 0)")


class TokenSetEnrichment(BaseModel):
    sae: str
    n_features: int
    skipped: list[str] | None = Field(default=None, description="Built-in sets left out: empty in this vocabulary")
    sets: list[SetEnrichment]
    warnings: list[str] | None = warnings_field()


# ------------------------------------------------------------------------------------------------ cards


class FeatureCardResult(BaseModel):
    sae: str
    feature: int
    uri: str = Field(description="The card as an MCP resource")
    markdown: str


# ----------------------------------------------------------------------------------------------- describe


class FeatureDescription(BaseModel):
    """What the index and the weights say of one feature: enough to explain it in one read."""

    feature: int
    density: float | None = Field(default=None, description="Share of scanned tokens where it fires (index)")
    max_activation: float | None = None
    top: list[Example] = Field(default_factory=list, description="Top examples, largest first (max token in «»)")
    bands: list[Interval] = Field(default_factory=list, description="Samples by activation quantile, highest first "
                                  "(those already in top left out)")
    promotes: list[TokenLogit] = Field(default_factory=list, description="Logit lens: W_dec[f] @ W_U, largest")
    suppresses: list[TokenLogit] = Field(default_factory=list, description="... and smallest")
    labels: list[str] = Field(default_factory=list, description="The newest labels (one line each, cut)")
    note: str | None = Field(default=None, description="Why something is missing (not indexed, no logit lens)")


class FeatureDescriptions(BaseModel):
    sae: str
    features: list[FeatureDescription]
    left_out: list[int] | None = Field(
        default=None, description="Features not described: over the character budget (ask for them again)"
    )
    warnings: list[str] | None = warnings_field()
