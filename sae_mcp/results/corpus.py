"""Results of the corpus tools: top_examples, feature summaries from the index, and index builds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from sae_mcp.results import warnings_field


class Histogram(BaseModel):
    """Bins, not points: counts[i] is the tokens with edges[i] <= activation < edges[i + 1]."""

    edges: list[float] = Field(
        description="Bin edges of the positive activations, log-spaced, ascending: len(counts) + 1 values, bin i "
        "spanning [edges[i], edges[i+1]) (activations under 1e-4 count in a first bin starting at 1e-4, over 1e4 "
        "in a last bin ending at 1e4)"
    )
    counts: list[int] = Field(
        description="Tokens per bin: counts[i] fell in [edges[i], edges[i+1]); one fewer than edges"
    )


class Example(BaseModel):
    activation: float = Field(description="The feature's activation at the max token")
    token: str = Field(description="The max token itself: tokens[position]")
    tokens: list[str] = Field(description="Context around the max token, from its window (BOS included when in range)")
    position: int = Field(description="Index of the max token inside `tokens`")
    document: int = Field(description="Index of the document in the corpus (0-based)")
    offset: int = Field(
        description="Offset of the max token in its document's token stream (0 = first token after BOS)"
    )
    count: int | None = Field(
        default=None,
        description="How many of the candidates showed exactly these tokens (identical contexts are listed once, "
        "with the first one's activation and location); absent when this context occurred once",
    )


class FeatureSummary(BaseModel):
    sae: str = Field(description="SAE key")
    feature: int
    max_activation: float = Field(description="Largest activation over the scanned tokens (0 if it never fired)")
    density: float = Field(description="Fraction of scanned tokens where the feature fired (activation > 0)")
    n_fired: int = Field(description="Scanned tokens where the feature fired")
    tokens_scanned: int = Field(description="Document tokens scanned (BOS not counted)")
    histogram: Histogram = Field(
        description="Positive activations as bins, compact (at most 16 over the used range): edges has one more "
        "entry than counts"
    )
    compute_dtype: str | None = Field(
        default=None,
        description="Precision the scan computed activations in: 'float32', or 'bfloat16'/'float16' under CUDA "
        "autocast (then max_activation and the examples' activations can differ from get_feature_acts' fp32 "
        "values in the 3rd digit); None for an index written before it was recorded",
    )


class Interval(BaseModel):
    lower: float = Field(description="Activations in this band are >= lower (0 for the band that starts at the "
                         "histogram's first bin)")
    upper: float = Field(description="... and < upper; the top band's upper is the max activation, included")
    quantiles: list[float] = Field(
        description="[q_lo, q_hi]: the band holds the feature's firing tokens from quantile q_lo to q_hi of its "
        "activation distribution"
    )
    tokens: int = Field(description="Scanned tokens whose activation fell in this band")
    examples: list[Example] = Field(
        description="Uniformly sampled firing tokens of this band (deterministic), largest activation first"
    )
    merged_duplicates: int | None = Field(
        default=None, description="Sampled tokens folded into an identical shown context (see count); absent if none"
    )


class TopExamples(FeatureSummary):
    source: Literal["index", "scan"] = Field(
        description="'index': the corpus index; 'scan': an on-demand scan of this feature"
    )
    corpus: str = Field(description="The corpus the examples come from")
    context_size: int = Field(description="Window length in tokens (BOS + context_size - 1 document tokens)")
    examples: list[Example] = Field(
        description="The k largest activations with distinct shown contexts, largest first (ties: earlier first)"
    )
    merged_duplicates: int | None = Field(
        default=None,
        description="Candidates (the kept top 50) folded into an identical shown context listed above them (see "
        "each example's count); absent when none were",
    )
    intervals: list[Interval] | None = Field(
        default=None,
        description="With intervals=N: up to N activation bands spanning (0, max] by quantile, highest first, each "
        "with sampled examples; absent when not asked for or unavailable (see warnings)",
    )
    warnings: list[str] | None = warnings_field()


class IndexReport(BaseModel):
    path: str = Field(description="The index's SQLite file")
    corpus: str = Field(description="The corpus scanned")
    sae: str
    tokens_scanned: int
    windows: int = Field(description="Windows scanned (each BOS + up to context_size - 1 tokens)")
    exhausted: bool = Field(description="True when the corpus ended before the token budget")
    reused: bool = Field(description="True when a finished index was found and nothing was scanned")
    seconds: float
    tokens_per_second: float
