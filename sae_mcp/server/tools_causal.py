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
from sae_mcp.engine.steering_plan import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_NEW_TOKENS,
    MAX_SEED,
    MAX_SEEDS,
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


def known_max_of(examples: ExampleSource) -> Callable[[LoadedSAE, int], float | None]:
    """A feature's max activation when the index or an earlier scan already knows it (never scans): what steering
    under calibration='absolute' compares coefficients with."""

    def fn(sae: LoadedSAE, feature: int) -> float | None:
        try:
            top = examples.cached_top_examples(sae.key, feature, k=1)
        except SaeMcpError:
            return None
        return float(top.max_activation) if top is not None and top.max_activation > 0 else None

    return fn


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    max_k = engine.limits.max_top_k
    A = engine_args(engine)
    SaeArg, Prompt, Answer = A.Sae, A.Prompt, A.Answer

    class SteerSpec(BaseModel):
        feature: A.Feature
        strength: Strength = Field(default=1.0, description="x max activation (the coefficient if absolute)")

    Seeds = Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None,
        Field(min_length=1, max_length=MAX_SEEDS, description="Run everything once per seed (default [seed])"),
    ]
    ControlStrength = Annotated[
        Strength | None,
        Field(description="Run controls at this one dose only (default: every dose)"),
    ]

    @tool()
    def steer_generate(
        prompt: Prompt,
        features: Annotated[
            list[SteerSpec],
            Field(min_length=1, max_length=MAX_STEER_FEATURES, description="[{feature, strength}]"),
        ],
        sae: SaeArg = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 30,
        temperature: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False, description="0 = greedy")] = (
            DEFAULT_TEMPERATURE),
        top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = DEFAULT_TOP_P,
        seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Default 0")] = None,
        seeds: Seeds = None,
        calibration: Literal["max_activation", "absolute"] = "max_activation",
        strengths: Annotated[
            list[Strength] | None,
            Field(min_length=1, max_length=MAX_STRENGTHS, description="Doses: each multiplies every coefficient"),
        ] = None,
        answer: Annotated[Answer | None, Field(description="Score the metric per dose (first token)")] = None,
        counterfactual: Annotated[
            Answer | None, Field(description="metric = logit[answer] - logit[this] (else log P(answer))")
        ] = None,
        controls: Annotated[bool, Field(description="Random features matched in decoder norm")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        control_strength: ControlStrength = None,
        mcp_context: Context = None,
    ) -> SteerResult:
        """Add coefficient * W_dec[feature] at the SAE's hook at every position and generate, unsteered and per
        dose side by side from the same seeds. coefficient = strength * max activation (calibration max_activation)
        or strength (absolute). Per dose: KL, the metric with an answer, the concept readout (the features' mean
        activation over the generated tokens, read back unsteered), changed/degenerate seeds; controls per dose. At
        most 128 runs x seeds."""
        calib = max_activation_of(services.examples) if calibration == "max_activation" else None
        cancel = CancelToken()

        progress = progress_reporter(mcp_context, cancel, "tokens generated")

        return steering.steer_generate(
            engine, prompt, [(f.feature, f.strength) for f in features], sae=sae, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, calibration=calibration, max_activation_fn=calib,
            strengths=strengths, answer=answer, controls=controls, n_controls=n_controls, cancel=cancel,
            progress=progress, seeds=seeds, control_strength=control_strength, counterfactual=counterfactual,
            known_max_fn=known_max_of(services.examples),
        )

    @tool()
    def ablate_and_test(
        prompt: Prompt,
        answer: Answer,
        features: Annotated[A.Features, Field(min_length=1, description="To zero")],
        sae: SaeArg = None,
        position: Annotated[
            A.Position | Annotated[list[A.Position], Field(max_length=A.n_ctx)] | None,
            Field(description="Position(s) to ablate at; default all"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        controls: Annotated[bool, Field(description="Random features matched in activation")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1, description="Draws the controls")] = 0,
        counterfactual: Annotated[
            Answer | None, Field(description="Also score logit[answer] - logit[counterfactual]")
        ] = None,
    ) -> AblationResult:
        """Zero features at positions and compare the next token: baseline, reconstruction_only (SAE spliced, no
        error term: its own distortion), ablated (error term on: its change from baseline is the causal effect),
        ablated_without_error_term (effect *_vs_reconstruction). Scored on the metric: logit[answer] -
        logit[counterfactual], else log P(answer)."""
        return ablation.ablate_and_test(
            engine, prompt, answer, features, sae=sae, position=position, top_k=top_k, controls=controls,
            n_controls=n_controls, seed=seed, counterfactual=counterfactual,
        )

    @tool()
    def attribute(
        prompt: Prompt,
        answer: Answer,
        counterfactual: Annotated[Answer | None, Field(description="metric = logit[answer] - logit[this]")] = None,
        sae: SaeArg = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="Several SAEs, one pass (default: all, one per hook)"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 20,
        position: Annotated[A.Position, Field(description="Whose logits define the metric")] = -1,
        method: Literal["gradient", "integrated_gradients"] = "gradient",
        steps: Annotated[int, Field(ge=1, le=attr.checks.MAX_STEPS, description="integrated_gradients")] = 8,
        verify: Annotated[bool, Field(description="Zero each returned entry for its exact contribution")] = True,
    ) -> Attribution:
        """Which features drive the metric (logit[answer] - logit[counterfactual], else log P(answer); first token
        of each): gradient x activation (or integrated gradients) of every feature and each SAE's error, error term
        on; error share; each entry's exact contribution (metric - metric with it zeroed) beside its attribution."""
        return attr.attribute(
            engine, prompt, answer, counterfactual=counterfactual, sae=sae, saes=saes, top_k=top_k, position=position,
            method=method, steps=steps, verify=verify,
        )
