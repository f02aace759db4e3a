"""Causal tools: steer_generate, ablate_and_test, attribute. Validation and wiring only; the math is in
engine/steering.py, engine/ablation.py and engine/attribution.py.

No `from __future__ import annotations` here: the SDK reads the tools' annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel, Field

from sae_mcp.engine import ablation, steering
from sae_mcp.engine import attribution as attr
from sae_mcp.engine.controls import MAX_CONTROLS
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.engine.steering import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    MAX_STEER_FEATURES,
    MAX_STRENGTH,
    MAX_STRENGTHS,
)
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.results.causal import AblationResult, Attribution, SteerResult
from sae_mcp.server.args import engine_args
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.wiring import ToolDecorator
from sae_mcp.services import Services
from sae_mcp.services.example_source import DEFAULT_SCAN_TOKENS, ExampleSource

Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)]


CALIBRATION_HINT = "start the server with --corpus (a feature index or a text corpus), or pass calibration='absolute'"


def max_activation_of(examples: ExampleSource) -> Callable[[LoadedSAE, int], tuple[float, str]]:
    """The feature index's max activation, else a bounded on-demand scan's (DEFAULT_SCAN_TOKENS), as the callable
    steering calibrates with; an error saying what to pass when neither is available."""

    def fn(sae: LoadedSAE, feature: int) -> tuple[float, str]:
        try:
            value, where = examples.max_activation(sae.key, feature, max_scan_tokens=DEFAULT_SCAN_TOKENS)
        except SaeMcpError as exc:
            raise InvalidInput(f"calibration='max_activation': feature {feature}: {exc}; {CALIBRATION_HINT}") from exc
        return float(value), str(where)

    return fn


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    max_k = engine.limits.max_top_k
    A = engine_args(engine)
    SaeArg, Prompt, Answer = A.Sae, A.Prompt, A.Answer

    class SteerSpec(BaseModel):
        feature: A.Feature
        strength: Strength = Field(
            default=1.0,
            description="Multiple of the feature's max activation (or the coefficient, calibration='absolute')",
        )

    @tool()
    def steer_generate(
        prompt: Prompt,
        features: Annotated[
            list[SteerSpec],
            Field(min_length=1, max_length=MAX_STEER_FEATURES, description="Features to add: [{feature, strength}]"),
        ],
        sae: SaeArg = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate")] = 30,
        temperature: Annotated[
            float,
            Field(ge=0, le=10, allow_inf_nan=False,
                  description="Sampling temperature; default 1 (sampled, as in the SAELens steering tutorial, "
                  "reproducible by seed); 0 = greedy"),
        ] = DEFAULT_TEMPERATURE,
        top_p: Annotated[
            float, Field(gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling mass (ignored when greedy)")
        ] = DEFAULT_TOP_P,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Same seed for the unsteered and steered runs")] = 0,
        calibration: Annotated[
            Literal["max_activation", "absolute"],
            Field(description="max_activation: coefficient = strength * the feature's max activation; "
                  "absolute: coefficient = strength"),
        ] = "max_activation",
        strengths: Annotated[
            list[Strength] | None,
            Field(min_length=1, max_length=MAX_STRENGTHS,
                  description="Dose-response: one run per value, every coefficient multiplied by it"),
        ] = None,
        answer: Annotated[
            Answer | None,
            Field(description="Also report P(answer) at the prompt's next-token position for every run, e.g. "
                  "' Paris'; only the first token of a multi-token answer is scored"),
        ] = None,
        controls: Annotated[
            bool, Field(description="Also steer with random features matched in decoder norm, same coefficients "
                        "(use n_controls >= 5: exceeding all of few controls is weak evidence)")
        ] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS, description="Control runs when controls")] = 5,
        mcp_context: Context = None,
    ) -> SteerResult:
        """Steer generation: add coefficient * W_dec[feature] at the SAE's hook at every position (prompt and
        generated tokens) and return the unsteered and steered continuations from the same seed side by side,
        with the coefficients used, whether each run's text changed and where it first diverged, the KL from the
        unsteered next-token distribution, P(answer) at the prompt's next-token position with `answer` (first token
        only: answer_tokens / multi_token say when there are more), a dose-response table with `strengths`, and
        matched random-feature controls with `controls`.
        Sampled by default (temperature 1, top_p 0.9, as in the SAELens tutorial; the same seed for every run);
        temperature=0 is greedy. Reports progress per generated token; cancellable."""
        calib = max_activation_of(services.examples) if calibration == "max_activation" else None
        cancel = CancelToken()

        progress = progress_reporter(mcp_context, cancel, "tokens generated")

        return steering.steer_generate(
            engine, prompt, [(f.feature, f.strength) for f in features], sae=sae, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, calibration=calibration, max_activation_fn=calib,
            strengths=strengths, answer=answer, controls=controls, n_controls=n_controls, cancel=cancel,
            progress=progress,
        )

    @tool()
    def ablate_and_test(
        prompt: Prompt,
        answer: Answer,
        features: Annotated[A.Features, Field(min_length=1, description="Features to zero")],
        sae: SaeArg = None,
        position: Annotated[
            A.Position | Annotated[list[A.Position], Field(max_length=A.n_ctx)] | None,
            Field(description="Token position(s) to ablate at (negative counts from the end); omit for all"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Next tokens listed per table")] = 10,
        controls: Annotated[
            bool, Field(description="Also ablate random features matched in activation at those positions")
        ] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS, description="Control runs when controls")] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Seed for drawing control features")] = 0,
    ) -> AblationResult:
        """Zero features in the SAE's activations at the given positions and compare next-token predictions:
        baseline (plain model), reconstruction_only (SAE spliced without error term, nothing ablated: the SAE's
        own distortion), ablated (SAE with the error term, so only the ablation changes the model: its change
        from baseline is the causal effect) and ablated_without_error_term (its effect is the change versus
        reconstruction_only, given as *_vs_reconstruction and kl_from_reconstruction); each with the answer's
        rank/probability/logit and its change from baseline. `summary` says which number is the effect and how
        large the SAE's distortion is; per feature: fired, activation_sum and max_activation at those positions,
        and `note` warns when a target does not fire there (ablating it changes nothing)."""
        return ablation.ablate_and_test(
            engine, prompt, answer, features, sae=sae, position=position, top_k=top_k, controls=controls,
            n_controls=n_controls, seed=seed,
        )

    @tool()
    def attribute(
        prompt: Prompt,
        answer: Answer,
        counterfactual: Annotated[
            Answer | None, Field(description="Contrast token: metric = logit[answer] - logit[counterfactual]")
        ] = None,
        sae: SaeArg = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="Several SAE keys, one backward pass (default: every loaded SAE, "
                  "one per hook)"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Top (position, feature) attributions")] = 20,
        position: Annotated[A.Position, Field(description="Position whose logits define the metric; -1 = last")] = -1,
    ) -> Attribution:
        """Which SAE features drive a prediction: gradient x activation of every feature (and of each SAE's
        error) on logit[answer] - logit[counterfactual] at `position` (the first token of each: answer_tokens,
        multi_token say when there are more), with the error term on so the model's output is unchanged. Returns the
        top (position, feature) attributions, per-token sums, and each SAE's error attribution and error share (how
        much of the metric the SAE does not explain)."""
        return attr.attribute(
            engine, prompt, answer, counterfactual=counterfactual, sae=sae, saes=saes, top_k=top_k, position=position
        )
