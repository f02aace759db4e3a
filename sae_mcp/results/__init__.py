"""Pydantic results: what engine functions return and what tools serve as structured content.

Kept compact (an agent pays for every token): floats are rounded where the digits carry no meaning, and
lists are bounded by the caller's top_k.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


def warnings_field():
    """The `warnings` field every result may carry: None (absent from the agent's text) when there is nothing to
    warn about."""
    return Field(default=None, description="How this answer could mislead, each with what to do; absent when none")


def collect_warnings(*items: str | None) -> list[str] | None:
    """The warnings that apply (Nones dropped), or None when none does."""
    kept = [w for w in items if w]
    return kept or None


def rounded(x: float, nd: int = 4) -> float:
    """Round for display: enough digits to compare, few enough to read. A value rounded to zero reads 0.0, not
    -0.0 (e.g. the mean of a centred unembedding's logit weights, ~1e-9 either side)."""
    return float(round(float(x), nd)) + 0.0


# ------------------------------------------------------------------------------------------------- model_info


class SaeFidelity(BaseModel):
    """Measured on the first windows of the SAE's corpus (the scans' windows), once per server."""

    tokens: int = Field(description="Document tokens measured on (BOS left out)")
    explained_variance: float = Field(description="1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the tokens")
    l0: float = Field(description="Mean number of features active per token")
    dead_in_sample: int = Field(
        description="Features that never fired on these tokens (a small sample: an upper bound on dead features)"
    )
    loss_clean: float = Field(description="Next-token cross-entropy of the plain model (nats per token)")
    loss_spliced: float = Field(description="The same with the SAE's reconstruction spliced in (no error term)")
    loss_zero_ablated: float = Field(description="The same with the hook's activation zeroed")
    loss_recovered: float = Field(
        description="(zero_ablated - spliced) / (zero_ablated - clean): 1 = the reconstruction loses nothing"
    )


class SaeInfo(BaseModel):
    key: str = Field(description="How tools address this SAE (alias, else hook name)")
    hook_name: str = Field(description="transformer-lens hook the SAE reads and writes")
    layer: int = Field(description="Block index of the hook")
    d_in: int = Field(description="Width of the activation the SAE encodes")
    d_sae: int = Field(description="Number of features")
    architecture: str = Field(description="SAE architecture (standard, topk, jumprelu, ...)")
    source: str = Field(description="RELEASE/SAE_ID or the local folder")
    release: str | None = Field(default=None, description="SAELens release, when loaded from the directory")
    sae_id: str | None = Field(default=None, description="SAE id inside the release")
    neuronpedia_id: str | None = Field(default=None, description="Neuronpedia id, when known")
    prepend_bos: bool = Field(description="Whether prompts get BOS prepended, as the SAE was trained")
    context_size: int | None = Field(default=None, description="Training context size, when known")
    dataset_path: str | None = Field(default=None, description="Training dataset, when known")
    corpus: str | None = Field(default=None, description="The corpus its examples, index and blind sets read")
    fidelity: SaeFidelity | None = Field(default=None, description="How well it reconstructs, on a corpus sample")
    fidelity_note: str | None = Field(default=None, description="Why there is no fidelity measurement")


class ModelInfo(BaseModel):
    model: str = Field(description="Model name (official name or local folder name)")
    source: str = Field(description="'official' or the local folder")
    architecture: str = Field(description="Hugging Face architecture that was converted")
    n_layers: int
    d_model: int
    n_ctx: int = Field(description="Context length in tokens")
    d_vocab: int
    device: str
    dtype: str
    processing: dict[str, bool] = Field(
        default_factory=dict, description="transformer-lens weight processing applied (as the SAEs were trained)"
    )
    saes: list[SaeInfo]


# ----------------------------------------------------------------------------------------- get_feature_acts


class FeatureActivation(BaseModel):
    feature: int
    activation: float


class PositionTopFeatures(BaseModel):
    position: int = Field(description="Token index (0 = BOS when prepended)")
    token: str
    l0: int = Field(description="Features active here (activation > 0), of which `top` lists the largest")
    top: list[FeatureActivation] = Field(description="Features firing here (activation > 0), largest first")


class FeatureActs(BaseModel):
    sae: str
    tokens: list[str] = Field(description="Every token of the prompt as the model saw it (BOS first when prepended)")
    positions: list[PositionTopFeatures] = Field(description="Every position, or only the one asked for")
    features: dict[str, list[float]] | None = Field(
        default=None, description="Feature index -> its activation at each listed position (aligned with `positions`)"
    )
    warnings: list[str] | None = warnings_field()


# ------------------------------------------------------------------------------------------ compare_prompts


class FeatureDiff(BaseModel):
    feature: int
    activation_a: float
    activation_b: float
    difference: float = Field(description="activation_a - activation_b")


class FeatureSetDiff(BaseModel):
    feature: int
    mean_a: float = Field(description="Mean activation over set A")
    mean_b: float = Field(description="Mean activation over set B")
    difference: float = Field(description="mean_a - mean_b")
    effect_size: float | None = Field(
        description="Cohen's d: difference / pooled standard deviation (None when a set has one prompt or both sets "
        "are constant on this feature)"
    )
    rank_biserial: float = Field(
        description="2 P(a > b) + P(a = b) - 1 over all prompt pairs, in [-1, 1]: bounded, robust at small n"
    )
    separated: bool = Field(
        default=False,
        description="The sets do not overlap on this feature (every prompt of A above every prompt of B, or below): "
        "the strongest evidence a set comparison can give; ranked first by sort_by='effect_size'",
    )


class PromptComparison(BaseModel):
    sae: str
    mode: str = Field(description="'pair' (prompt_a vs prompt_b) or 'sets' (prompts_a vs prompts_b)")
    position: int = Field(description="Position compared in every prompt (negative counts from the end)")
    token_a: str | None = Field(default=None, description="Pair mode: the token at that position in prompt_a")
    token_b: str | None = Field(default=None, description="Pair mode: the token at that position in prompt_b")
    tokens_a: list[str] | None = Field(default=None, description="Sets mode: the token compared in each prompt of A")
    tokens_b: list[str] | None = Field(default=None, description="Sets mode: the token compared in each prompt of B")
    n_a: int = Field(default=1, description="Prompts in set A")
    n_b: int = Field(default=1, description="Prompts in set B")
    sort_by: str = Field(default="difference", description="'difference' or 'effect_size' (sets mode)")
    diffs: list[FeatureDiff] | list[FeatureSetDiff] = Field(description="Sorted by |sort_by|, largest first")
    warnings: list[str] | None = warnings_field()


# --------------------------------------------------------------------------------------------- next_token


class TokenProb(BaseModel):
    token: str
    token_id: int
    probability: float
    logit: float


class AnswerScore(BaseModel):
    token: str = Field(description="The answer's first token (the one scored)")
    token_id: int
    rank: int = Field(description="0-based: 0 = the most likely next token")
    probability: float
    logit: float
    answer_tokens: list[str] = Field(description="How the whole answer tokenizes")
    multi_token: bool = Field(description="True when the answer is several tokens: only the first is scored")
    sequence_log_probability: float | None = Field(
        default=None,
        description="next_token only, multi-token answers: log P(all answer tokens | prompt) by teacher forcing",
    )


class NextToken(BaseModel):
    tokens: list[str] = Field(description="The prompt's tokens as the model saw them")
    top: list[TokenProb]
    answer: AnswerScore | None = None
    warnings: list[str] | None = warnings_field()


# -------------------------------------------------------------------------------------------- project_to_vocab


class TokenLogit(BaseModel):
    token: str
    token_id: int
    logit: float


class VocabProjection(BaseModel):
    sae: str
    feature: int
    top_positive: list[TokenLogit] = Field(description="Tokens the decoder direction promotes most (W_dec[f] @ W_U)")
    top_negative: list[TokenLogit] = Field(description="Tokens it suppresses most")
