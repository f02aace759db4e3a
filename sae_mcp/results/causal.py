"""Results of the causal tools: steer_generate, ablate_and_test, attribute.

Every intervention result carries what an agent needs to judge it: the coefficients actually used, the plain
model's output beside the intervened one, and (with controls=true) the same intervention on matched random
features, so a generic perturbation is not mistaken for a feature's meaning.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from sae_mcp.results import AnswerScore, TokenProb

# ------------------------------------------------------------------------------------------------- controls


class ControlRun(BaseModel):
    features: list[int] = Field(description="Random features used in place of the targets (one per target)")
    effects: dict[str, float] = Field(description="The same effect metrics as the target's, for this control")
    continuation: str | None = Field(default=None, description="Steering only: the control's continuation")


class ControlStat(BaseModel):
    metric: str = Field(description="Effect metric compared")
    target: float = Field(description="The targets' effect")
    control_mean: float
    control_std: float
    control_min: float
    control_max: float
    z_score: float | None = Field(description="(target - mean) / std of the controls; None when std is 0")
    exceeds_all_controls: bool = Field(description="|target| is larger than every control's |effect|")


class Controls(BaseModel):
    matched_on: str = Field(description="How control features were matched to the targets")
    seed: int
    runs: list[ControlRun]
    stats: list[ControlStat] = Field(description="The targets' effect next to the controls' spread, per metric")
    note: str | None = Field(default=None, description="Why fewer controls than asked, when so")
    caution: str | None = Field(
        default=None, description="Set when there are fewer than 5 controls: exceeding all of few is weak evidence"
    )


# ------------------------------------------------------------------------------------------------- steering


class SteerFeature(BaseModel):
    feature: int
    strength: float = Field(description="As given (a multiple of max_activation, or the coefficient itself)")
    max_activation: float | None = Field(default=None, description="max_activation calibration: the feature's max")
    max_activation_source: str | None = Field(default=None, description="'index' or 'scan' (where the max came from)")
    decoder_norm: float = Field(description="||W_dec[feature]||")
    coefficient: float = Field(description="Added as coefficient * W_dec[feature] at every position (scale 1)")


class Continuation(BaseModel):
    text: str = Field(description="Generated text after the prompt")
    n_tokens: int
    stopped_at_eos: bool


class SteerRun(BaseModel):
    scale: float = Field(description="Dose: every feature's coefficient is multiplied by this (1 without strengths)")
    coefficients: list[float] = Field(description="Coefficient per feature, in the order of `features`")
    continuation: Continuation
    changed: bool = Field(description="The text differs from the unsteered run's (same seed)")
    first_divergent_token: int | None = Field(
        default=None, description="Index into the generated tokens where this run first differs from the unsteered "
        "run; None when the tokens are identical"
    )
    kl_next_token: float = Field(description="KL(unsteered || steered) of the next-token distribution after the prompt")
    mean_kl_prompt: float = Field(description="KL(unsteered || steered) averaged over the prompt's positions")
    answer_probability: float | None = Field(
        default=None, description="P(answer's first token) at the prompt's next-token position (not during "
        "generation), when answer given"
    )
    answer_probability_change: float | None = Field(default=None, description="Minus the unsteered P(answer)")


class SteerResult(BaseModel):
    sae: str
    hook_name: str
    calibration: str = Field(description="'max_activation' (coefficient = strength * max) or 'absolute'")
    features: list[SteerFeature]
    seed: int
    temperature: float = Field(description="0 = greedy")
    top_p: float
    prompt_tokens: list[str]
    unsteered: Continuation = Field(description="The plain model's continuation from the same seed")
    unsteered_answer_probability: float | None = Field(
        default=None, description="The unsteered P(answer's first token) at the prompt's next-token position"
    )
    answer_tokens: list[str] | None = Field(default=None, description="How the whole answer tokenizes")
    multi_token: bool | None = Field(
        default=None, description="True when the answer is several tokens: only the first is scored"
    )
    steered: list[SteerRun] = Field(description="One run per dose (one entry unless strengths was given)")
    controls: Controls | None = None


# ------------------------------------------------------------------------------------------------- ablation


class NextTokenTable(BaseModel):
    top: list[TokenProb]
    answer: AnswerScore | None = None
    answer_probability_change: float | None = Field(default=None, description="Versus baseline")
    answer_logit_change: float | None = Field(default=None, description="Versus baseline")
    kl_from_baseline: float = Field(description="KL(baseline || this) of the next-token distribution")


class ReconstructionTable(NextTokenTable):
    """The ablation without the error term, also measured against reconstruction_only (the same SAE spliced,
    nothing ablated): the change that is the ablation's own, without the SAE's distortion."""

    answer_probability_change_vs_reconstruction: float | None = Field(
        default=None, description="Versus reconstruction_only: the ablation's effect without the error term"
    )
    answer_logit_change_vs_reconstruction: float | None = Field(default=None, description="Versus reconstruction_only")
    kl_from_reconstruction: float = Field(description="KL(reconstruction_only || this) of the next-token distribution")


class AblatedFeature(BaseModel):
    feature: int
    fired: bool = Field(description="Nonzero at some ablated position; False = ablating it changes nothing")
    activation_sum: float = Field(description="Sum of its activations over the ablated positions")
    max_activation: float = Field(description="Its largest activation at the ablated positions")


class AblationResult(BaseModel):
    sae: str
    hook_name: str
    tokens: list[str]
    positions: list[int] = Field(description="Ablated positions (non-negative indices)")
    features: list[AblatedFeature]
    baseline: NextTokenTable = Field(description="The plain model, no SAE")
    reconstruction_only: NextTokenTable = Field(
        description="SAE spliced without the error term, nothing ablated: the SAE's own distortion"
    )
    ablated: NextTokenTable = Field(
        description="SAE spliced with the error term, features zeroed: its change from baseline is the ablation's "
        "causal effect"
    )
    ablated_without_error_term: ReconstructionTable = Field(
        description="SAE reconstruction only, features zeroed; its *_vs_reconstruction / kl_from_reconstruction "
        "fields are the ablation's effect without the error term (its change from baseline mixes in the SAE's "
        "own distortion)"
    )
    summary: str = Field(description="One line: the ablation's causal effect, and the SAE's own distortion")
    note: str | None = Field(
        default=None, description="Set when a target feature does not fire at the ablated positions"
    )
    controls: Controls | None = None


# ------------------------------------------------------------------------------------------------ attribution


class AttributionEntry(BaseModel):
    sae: str
    position: int
    token: str
    feature: int
    activation: float
    attribution: float = Field(description="gradient x activation: first-order effect on the metric of removing it")


class Attribution(BaseModel):
    metric: str = Field(
        description="What was differentiated, e.g. logit[' Paris'] - logit[' London'] at position 7; only the "
        "first token of a multi-token answer or counterfactual is scored"
    )
    answer_tokens: list[str] = Field(description="How the whole answer tokenizes")
    multi_token: bool = Field(description="True when the answer is several tokens: only the first is scored")
    counterfactual_tokens: list[str] | None = Field(default=None, description="How the counterfactual tokenizes")
    counterfactual_multi_token: bool | None = Field(
        default=None, description="True when the counterfactual is several tokens: only the first is scored"
    )
    metric_value: float
    position: int = Field(description="Position whose logits define the metric (non-negative index)")
    tokens: list[str]
    top: list[AttributionEntry] = Field(description="Sorted by |attribution|, largest first, across all SAEs")
    per_token: dict[str, list[float]] = Field(description="Per SAE: sum of feature attributions at each position")
    error_attribution: dict[str, float] = Field(
        description="Per SAE: gradient . SAE error, signed, summed over all positions (BOS included); "
        "per_token + gradient . b_dec + error_attribution = gradient . SAE input"
    )
    error_attribution_per_token: dict[str, list[float]] = Field(
        description="Per SAE: gradient . SAE error at each position (where the SAE's error moves the metric)"
    )
    reconstruction_attribution: dict[str, float] = Field(
        description="Per SAE: gradient . SAE reconstruction (incl. b_dec), signed, summed over all positions"
    )
    error_share: dict[str, float] = Field(
        description="Per SAE: sum_p |gradient_p . error_p| / (sum_p |gradient_p . error_p| + "
        "sum_p |gradient_p . reconstruction_p|) over error_share_positions: how much of the metric the SAE "
        "does not explain (absolute per position, so signs cannot cancel; BOS excluded)"
    )
    error_share_positions: list[int] = Field(
        description="[first, last] positions error_share is taken over: 1 (0 without BOS) .. the metric position"
    )
