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
        Field(min_length=1, max_length=MAX_SEEDS, description="One run per seed"),
    ]
    ControlStrength = Annotated[
        Strength | None,
        Field(description="Controls at this dose only"),
    ]

    @tool()
    def steer_generate(
        prompt: Prompt,
        features: Annotated[
            list[SteerSpec],
            Field(min_length=1, max_length=MAX_STEER_FEATURES),
        ],
        sae: SaeArg = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 30,
        temperature: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False, description="0 = greedy")] = (
            DEFAULT_TEMPERATURE),
        top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = DEFAULT_TOP_P,
        seed: Annotated[int | None, Field(ge=0, le=MAX_SEED)] = None,
        seeds: Seeds = None,
        calibration: Literal["max_activation", "absolute"] = "max_activation",
        strengths: Annotated[
            list[Strength] | None,
            Field(min_length=1, max_length=MAX_STRENGTHS, description="Doses (multipliers)"),
        ] = None,
        answer: Answer | None = None,
        counterfactual: Answer | None = None,
        controls: Annotated[bool, Field(description="Random features, matched norms")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        control_strength: ControlStrength = None,
        mcp_context: Context = None,
    ) -> SteerResult:
        """Generate with features added at their SAE's hook, dose by dose beside the unsteered text."""
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
        features: Annotated[A.Features, Field(min_length=1)],
        sae: SaeArg = None,
        position: Annotated[
            A.Position | Annotated[list[A.Position], Field(max_length=A.n_ctx)] | None,
            Field(description="Default: all"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        controls: Annotated[bool, Field(description="Matched random features")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
        counterfactual: Answer | None = None,
    ) -> AblationResult:
        """Zero features and read the next token, with the error term (the causal effect) and without it."""
        return ablation.ablate_and_test(
            engine, prompt, answer, features, sae=sae, position=position, top_k=top_k, controls=controls,
            n_controls=n_controls, seed=seed, counterfactual=counterfactual,
        )

    @tool()
    def attribute(
        prompt: Prompt,
        answer: Answer,
        counterfactual: Answer | None = None,
        sae: SaeArg = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="Default: every SAE, one per hook"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 20,
        position: Annotated[A.Position, Field(description="Where the metric is read")] = -1,
        method: Literal["gradient", "integrated_gradients"] = "gradient",
        steps: Annotated[int, Field(ge=1, le=attr.checks.MAX_STEPS)] = 8,
        verify: Annotated[bool, Field(description="Exact effect of zeroing each entry")] = True,
    ) -> Attribution:
        """Which features and error terms drive the metric: attribution beside the exact effect of zeroing."""
        return attr.attribute(
            engine, prompt, answer, counterfactual=counterfactual, sae=sae, saes=saes, top_k=top_k, position=position,
            method=method, steps=steps, verify=verify,
        )
