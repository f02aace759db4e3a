"""Results of the corpus area: top_examples, feature summaries from the index, and index builds."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Histogram(BaseModel):
    edges: list[float] = Field(description="Bin edges of positive activations (log-spaced); len(counts) + 1 values")
    counts: list[int] = Field(description="Tokens whose activation fell in each bin")


class Example(BaseModel):
    activation: float = Field(description="The feature's activation at the max token")
    tokens: list[str] = Field(description="Context around the max token, from its window (BOS included when in range)")
    position: int = Field(description="Index of the max token inside `tokens`")
    document: int = Field(description="Index of the document in the corpus (0-based)")
    offset: int = Field(description="Offset of the max token in its document's token stream (0 = first token after BOS)")


class FeatureSummary(BaseModel):
    sae: str = Field(description="SAE key")
    feature: int
    max_activation: float = Field(description="Largest activation over the scanned tokens (0 if it never fired)")
    density: float = Field(description="Fraction of scanned tokens where the feature fired (activation > 0)")
    n_fired: int = Field(description="Scanned tokens where the feature fired")
    tokens_scanned: int = Field(description="Document tokens scanned (BOS not counted)")
    histogram: Histogram = Field(description="Positive activations, compact (at most 16 bins over the used range)")


class TopExamples(FeatureSummary):
    source: Literal["index", "scan"] = Field(description="'index': the corpus index; 'scan': an on-demand scan of this feature")
    corpus: str = Field(description="The corpus the examples come from")
    context_size: int = Field(description="Window length in tokens (BOS + context_size - 1 document tokens)")
    examples: list[Example] = Field(description="The k largest activations, largest first (ties: earlier first)")


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
