"""Results of the causal tools: steer_generate, ablate_and_test, attribute.

Every intervention result carries what an agent needs to judge it: the coefficients actually used, the plain
model's output beside the intervened one, and (with controls=true) the same intervention on matched random
features, so a generic perturbation is not mistaken for a feature's meaning.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from sae_mcp.results import TokenProb, warnings_field

# ------------------------------------------------------------------------------------------------- controls


class ControlRun(BaseModel):
    features: list[int] = Field(description="Random features used in place of the targets (one per target)")
    effects: dict[str, float] = Field(description="The same effect metrics as the target's, for this control")
    continuations: list[str] | None = Field(
        default=None, description="Steering only: the control's continuation per seed, in the order of `seeds`"
    )


class ControlStat(BaseModel):
    metric: str = Field(description="Effect compared: the result's metric change or KL (steering: also the concept "
                        "readout); raw logit changes are never compared")
    target: float = Field(description="The targets' effect")
    control_mean: float
    control_std: float
    control_min: float
    control_max: float
    z_score: float | None = Field(
        description="(target - mean) / std of the controls; None when the controls (almost) do not vary"
    )
    exceeds_all_controls: bool = Field(description="|target| is larger than every control's |effect|")


class Controls(BaseModel):
    matched_on: str = Field(description="How control features were matched to the targets")
    scale: float | None = Field(
        default=None, description="Steering only: the dose (scale) these controls ran at; stats compare them with "
        "the targets' run at that dose"
    )
    seed: int = Field(description="Seed the control features were drawn with")
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
    seed: int | None = Field(default=None, description="The sampling seed of this continuation")
    text: str = Field(description="Generated text after the prompt")
    n_tokens: int
    stopped_at_eos: bool
    changed: bool | None = Field(
        default=None, description="Steered runs: the text differs from the unsteered text of the same seed"
    )
    first_divergent_token: int | None = Field(
        default=None, description="Steered runs: index into the generated tokens where this text first differs "
        "from the unsteered text of the same seed; None when identical"
    )
    concept_readout: list[float] | None = Field(
        default=None, description="Per target feature (order of `features`): its mean SAE activation over the "
        "generated tokens, read back through the UNSTEERED model (is the concept in the text, not only in the "
        "hook?); None when nothing was generated"
    )
    repetition: float | None = Field(
        default=None, description="Share of the generated 3-grams that repeat an earlier one (0 = none); None "
        "below 8 tokens"
    )
    loss_ratio: float | None = Field(
        default=None, description="Mean per-token loss of this text under the unsteered model / the unsteered "
        "model's mean entropy along the same seed's unsteered text (~1 for text the model would write)"
    )
    degenerate: bool | None = Field(
        default=None, description="A repetition loop (repetition >= 0.5, or one token over half of the tokens) or "
        "word salad (loss_ratio > 3); judged from 8 tokens on"
    )


class SteerRun(BaseModel):
    scale: float = Field(description="Dose: every feature's coefficient is multiplied by this (1 without strengths)")
    coefficients: list[float] = Field(description="Coefficient per feature, in the order of `features`")
    kl_next_token: float = Field(
        description="KL(unsteered || steered) of the next-token distribution after the prompt (seed-independent)"
    )
    mean_kl_prompt: float = Field(description="KL(unsteered || steered) averaged over the prompt's positions")
    metric: float | None = Field(
        default=None, description="With an answer: the metric at the prompt's next-token position (seed-independent)"
    )
    metric_change: float | None = Field(default=None, description="Minus the unsteered metric")
    answer_probability: float | None = Field(
        default=None, description="P(answer's first token) at the prompt's next-token position (not during "
        "generation; seed-independent), when answer given"
    )
    answer_probability_change: float | None = Field(default=None, description="Minus the unsteered P(answer)")
    continuations: list[Continuation] = Field(description="One per seed, in the order of `seeds`")
    concept_readout: list[float] | None = Field(
        default=None, description="Per target feature: the continuations' concept_readout (a mean over generated "
        "tokens) averaged over seeds (seeds that generated nothing left out); compare with unsteered_concept_readout"
    )
    concept_readout_std: list[float] | None = Field(
        default=None, description="Per target feature: sample std (n - 1) of concept_readout over seeds; None "
        "with fewer than 2"
    )
    changed_fraction: float = Field(description="Share of seeds whose text differs from the unsteered text")
    degenerate_fraction: float = Field(description="Share of seeds whose continuation is degenerate")
    degenerate: bool = Field(description="At least half of the seeds' continuations are degenerate")


class SteerResult(BaseModel):
    sae: str
    hook_name: str
    calibration: str = Field(description="'max_activation' (coefficient = strength * max) or 'absolute'")
    features: list[SteerFeature]
    seeds: list[int] = Field(description="Sampling seeds: every run is generated once per seed")
    temperature: float = Field(description="0 = greedy")
    top_p: float
    prompt_tokens: list[str]
    unsteered: list[Continuation] = Field(description="The plain model's continuation per seed")
    unsteered_concept_readout: list[float] | None = Field(
        default=None, description="Per target feature: the unsteered continuations' concept_readout averaged "
        "over seeds: the baseline for each run's concept_readout"
    )
    unsteered_answer_probability: float | None = Field(
        default=None, description="The unsteered P(answer's first token) at the prompt's next-token position"
    )
    metric: str | None = Field(
        default=None, description="With an answer: logit[answer] - logit[counterfactual], or log P(answer) without one"
    )
    unsteered_metric: float | None = Field(default=None, description="The unsteered metric")
    answer_tokens: list[str] | None = Field(default=None, description="How the whole answer tokenizes")
    multi_token: bool | None = Field(
        default=None, description="True when the answer is several tokens: only the first is scored"
    )
    steered: list[SteerRun] = Field(description="One run per dose (one entry unless strengths was given)")
    controls: list[Controls] | None = Field(
        default=None, description="One block per dose the controls ran at (`scale`), each compared with the "
        "targets' run at that dose"
    )
    warnings: list[str] | None = warnings_field()


# ------------------------------------------------------------------------------------------------- ablation


class ScoredToken(BaseModel):
    token: str = Field(description="The first token of what was given (the one scored)")
    token_id: int
    tokens: list[str] = Field(description="How the whole text tokenizes; only the first token is scored")


class NextTokenTable(BaseModel):
    """One condition's next-token prediction after the prompt."""

    top: list[TokenProb]
    answer_rank: int = Field(description="0-based: 0 = the most likely next token")
    answer_probability: float
    answer_logit: float = Field(description="Raw logit: moves with the whole distribution; judge by the metric")
    metric: float = Field(description="The result's metric (logit difference, or log P(answer))")
    answer_probability_change: float = Field(description="Versus baseline")
    answer_logit_change: float = Field(description="Versus baseline (raw; no significance is claimed on it)")
    metric_change: float = Field(description="Versus baseline: the effect (= minus the contribution zeroed)")
    kl_from_baseline: float = Field(description="KL(baseline || this) of the next-token distribution")


class ReconstructionTable(NextTokenTable):
    """The ablation without the error term, also measured against reconstruction_only (the same SAE spliced,
    nothing ablated): the change that is the ablation's own, without the SAE's distortion."""

    answer_probability_change_vs_reconstruction: float = Field(
        description="Versus reconstruction_only: the ablation's effect without the error term"
    )
    answer_logit_change_vs_reconstruction: float = Field(description="Versus reconstruction_only")
    metric_change_vs_reconstruction: float = Field(description="Versus reconstruction_only")
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
    positions: list[int] | None = Field(description="Ablated positions (non-negative); None = every position")
    answer: ScoredToken
    counterfactual: ScoredToken | None = Field(
        default=None, description="With one, metric = logit[answer] - logit[counterfactual] (attribute's metric)"
    )
    metric: str = Field(description="What every table's metric is: logit[a] - logit[c], or log P(a) without c")
    metric_kind: str = Field(description="'logit_difference' (with a counterfactual) or 'log_probability'")
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
    summary: str = Field(description="One line: the ablation's causal effect, and the SAE's own distortion (the "
                         "tables' numbers again, for a reader without them)")
    controls: Controls | None = None
    warnings: list[str] | None = warnings_field()


# ------------------------------------------------------------------------------------------------ attribution


class AttributionEntry(BaseModel):
    sae: str
    position: int
    token: str
    feature: int
    activation: float
    attribution: float = Field(
        description="Estimated contribution to the metric (metric - metric with it zeroed; > 0: it raises the "
        "metric). method='gradient': gradient x activation (first order); 'integrated_gradients': its share of "
        "removing every node together"
    )
    exact_contribution: float | None = Field(
        default=None,
        description="With verify: metric - metric with this one feature zeroed at this one position (every SAE "
        "spliced with its error term). Zeroing it changes the metric by minus this (ablate_and_test's change). A "
        "warning names the entries whose attribution disagrees",
    )


class Attribution(BaseModel):
    metric: str = Field(
        description="What was differentiated, e.g. logit[' Paris'] - logit[' London'] at position 7, or "
        "log P(' Paris') without a counterfactual; only the first token of each is scored"
    )
    metric_kind: str = Field(description="'logit_difference' (with a counterfactual) or 'log_probability'")
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
        description="Per SAE: the SAE error's attribution under the method, summed over all positions (BOS "
        "included). gradient: gradient . error (per_token + gradient . b_dec + this = gradient . SAE input); "
        "integrated_gradients: error . mean gradient along the error's path"
    )
    error_attribution_per_token: dict[str, list[float]] = Field(
        description="Per SAE: the error's attribution at each position (where the SAE's error moves the metric)"
    )
    reconstruction_attribution: dict[str, float] = Field(
        description="Per SAE: the reconstruction's attribution summed over all positions. gradient: gradient . "
        "reconstruction (incl. b_dec); integrated_gradients: its features' total (b_dec is on both path ends)"
    )
    error_share: dict[str, float] = Field(
        description="Per SAE, under the method: sum_p |error_p| / (sum_p |error_p| + sum_p |reconstruction_p|) "
        "over error_share_positions (per-position attributions): how much of the metric the SAE does not explain "
        "(absolute per position, so signs cannot cancel; BOS excluded)"
    )
    error_share_positions: list[int] = Field(
        description="[first, last] positions error_share is taken over: 1 (0 without BOS) .. the metric position"
    )
    method: str = Field(
        description="'gradient' (gradient x activation, first order, one backward pass) or 'integrated_gradients' "
        "(every attribution, error fields included: features along their path with the errors held, errors along "
        "theirs with the features held)"
    )
    feature_attribution_total: dict[str, float] = Field(
        description="Per SAE: the sum of all its feature attributions (all positions)"
    )
    attribution_total: float = Field(
        description="feature_attribution_total + error_attribution summed over the SAEs. It need not equal "
        "metric_value. gradient: with a linear decoder an SAE's features + error = gradient . (its input - b_dec), the "
        "first-order effect of what flows through its hook, so it misses the model's nonlinearity, the decoder "
        "bias and whatever reaches the logits without passing the hook (the residual bypass of an "
        "attention/MLP-output SAE, biases); SAEs in series on one residual stream each count that stream, so "
        "compare each SAE's own total",
    )
    integrated_gradients: IntegratedGradientsCheck | None = Field(
        default=None, description="method='integrated_gradients' only: its completeness check"
    )
    warnings: list[str] | None = warnings_field()


class IntegratedGradientsCheck(BaseModel):
    """Integrated gradients along a path sums exactly to the metric's change over it; with few steps the midpoint
    sum is off. Two paths: every SAE's features scaled together (errors held), and every error (features held)."""

    steps: int = Field(description="Interpolation points (midpoints of steps intervals of [0, 1])")
    attribution_sum: float = Field(description="Sum of the attributions of all features")
    endpoint_difference: float = Field(
        description="metric_value - the metric with every feature of every SAE zeroed, errors kept (with several "
        "SAEs each passes on what earlier ones changed in its input): what attribution_sum equals with many steps"
    )
    relative_error: float = Field(
        description="|attribution_sum - endpoint_difference| / |endpoint_difference| (the denominator at least "
        "0.05 |metric_value|); a warning above 0.05"
    )
    error_attribution_sum: float = Field(description="Sum of the errors' attributions")
    error_endpoint_difference: float = Field(
        description="metric_value - the metric with every SAE's error zeroed, features kept"
    )
    error_relative_error: float = Field(description="As relative_error, for the errors' path")


Attribution.model_rebuild()
