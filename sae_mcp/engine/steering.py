"""Steering: add `coefficient * W_dec[f]` at an SAE's hook and generate, unsteered and steered side by side.

The vector is added at the SAE's hook at every position, prompt and generated, through a plain model hook (no SAE
spliced); generation is our own loop over the KV cache (generation.py), so seed, temperature and top_p are exact.
All runs (unsteered, each dose, each control) go as rows of one batch (SteerRows), each row with its own generator
seeded identically, so rows differ only by their steering.

Hygiene: the steering hook lives inside `model.hooks(fwd_hooks=...)`, entered inside `Engine.device_work()`, whose
finally detaches anything left anyway; SAE weights are never touched.

steer_generate validates a call into a SteerPlan, runs it under device_work into a SteerOutcome, and assembles
the SteerResult from that.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sae_mcp.engine.controls import (
    check_n_controls,
    control_stats,
    few_controls_caution,
    matched_controls,
    pool_size,
    rounded_effects,
)
from sae_mcp.engine.generation import (
    ProgressFn,
    PromptStats,
    continuation,
    first_divergence,
    generate_rows,
    generated_ids,
)
from sae_mcp.engine.logits import answer_token_ids
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import rounded
from sae_mcp.results.causal import Continuation, ControlRun, Controls, SteerFeature, SteerResult, SteerRun

# Ceilings on one call's work (the tool signatures repeat them so clients see them in the schema).
MAX_NEW_TOKENS = 256
MAX_STEER_FEATURES = 16
MAX_STRENGTHS = 12
MAX_STRENGTH = 1000.0  # |strength|: a multiple of max_activation, or the absolute coefficient
MAX_COEFFICIENT = 1e5  # |strength * max_activation| after calibration

# Defaults shared by the engine and the tool: sampled as in the SAELens steering tutorial (temperature 1, top_p
# 0.9), which shows a feature's pull better than greedy decoding's repetition loops on small models; every row
# draws from its own generator seeded alike, so runs are reproducible by seed and rows differ only by steering.
# temperature=0 gives greedy decoding.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.9

MaxActivationFn = Callable[[LoadedSAE, int], tuple[float, str]]


# ---------------------------------------------------------------------------------------------------------------
# steer_generate: the batch rows, the validated call, the device work


@dataclass(frozen=True)
class SteerRows:
    """The batch rows of one steering call: row 0 unsteered, then one row per dose (scale), then one row per
    control set (each at the strongest dose)."""

    scales: list[float]
    control_sets: list[list[int]]

    UNSTEERED = 0

    def dose_row(self, i: int) -> int:
        return 1 + i

    def control_row(self, i: int) -> int:
        return 1 + len(self.scales) + i

    @property
    def control_scale(self) -> float:
        """The strongest dose (largest |scale|, the first of a tie): the scale the controls are steered at."""
        return max(self.scales, key=abs)

    @property
    def target_row_for_controls(self) -> int:
        """The targets' row at the control scale, whose effects the controls are compared with."""
        return self.dose_row(self.scales.index(self.control_scale))


@dataclass(frozen=True)
class Sampling:
    """How every row is generated: the same settings and the same seed for each."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seed: int

    def check(self) -> None:
        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInput(f"max_new_tokens={self.max_new_tokens}: use 0..{MAX_NEW_TOKENS}")
        if not 0 <= self.temperature <= 10 or not math.isfinite(self.temperature):
            raise InvalidInput(f"temperature={self.temperature}: use 0 (greedy) .. 10")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p={self.top_p}: use a value in (0, 1]")


@dataclass(frozen=True)
class SteerPlan:
    """A validated steer_generate call, its coefficients calibrated."""

    sae: LoadedSAE
    features: list[int]
    strengths: list[float]  # per feature, as given
    scales: list[float]  # the doses: one run per value, every coefficient multiplied by it
    calibration: str  # 'max_activation' or 'absolute'
    maxes: list[tuple[float, str] | None]  # per feature: (max activation, where it came from) when calibrated
    coefficients: list[float]  # per feature at scale 1: strength * max activation, or the strength itself
    answer_ids: list[int] | None
    sampling: Sampling
    controls: bool
    n_controls: int


@dataclass(frozen=True)
class SteerOutcome:
    """What the device work gives back."""

    rows: SteerRows
    new_tokens: torch.Tensor  # [B, T] on the CPU (after EOS: EOS)
    stopped_at_eos: list[bool]  # per row
    stats: PromptStats  # every row against the unsteered one, on the prompt
    control_note: str | None  # why fewer control sets than asked, when so
    decoder_norms: list[float]  # ||W_dec[f]|| per target feature
    prompt_tokens: list[str]
    answer_tokens: list[str] | None


def _check_strengths(given: list[float], scales: list[float]) -> None:
    if not 1 <= len(scales) <= MAX_STRENGTHS:
        raise InvalidInput(f"{len(scales)} strengths given; pass 1..{MAX_STRENGTHS}")
    for x in given + scales:
        if not math.isfinite(x) or abs(x) > MAX_STRENGTH:
            raise InvalidInput(
                f"strength {x} is not allowed: strengths must be finite with |strength| <= {MAX_STRENGTH:g}"
            )


def _max_activations(
    sae: LoadedSAE, features: list[int], calibration: str, max_activation_fn: MaxActivationFn | None
) -> list[tuple[float, str] | None]:
    """Per feature: (max activation, its source) for 'max_activation' calibration; None each for 'absolute'."""
    if calibration != "max_activation":
        return [None] * len(features)
    if max_activation_fn is None:
        raise InvalidInput(
            "calibration='max_activation' needs each feature's max activation, and none is available here; "
            "start the server with --corpus, or pass calibration='absolute'"
        )
    maxes = [max_activation_fn(sae, f) for f in features]
    for f, (m, _) in zip(features, maxes):
        if not math.isfinite(m) or m <= 0:
            raise InvalidInput(
                f"feature {f} never fired in the corpus (max activation {m}); max_activation calibration "
                "cannot scale it: pass calibration='absolute' with a coefficient"
            )
    return maxes


def _check_coefficients(features: list[int], coefficients: list[float], scales: list[float]) -> None:
    for f, c in zip(features, coefficients):
        for x in scales:
            if abs(c * x) > MAX_COEFFICIENT:
                raise InvalidInput(
                    f"feature {f}: coefficient {c * x:.4g} exceeds {MAX_COEFFICIENT:g}; lower the strength"
                )


def _plan(
    engine: Engine, sae: str | None, features: Sequence[tuple[int, float]], strengths: Sequence[float] | None,
    sampling: Sampling, calibration: str, max_activation_fn: MaxActivationFn | None, answer: str | None,
    controls: bool, n_controls: int,
) -> SteerPlan:
    """Validate a call and calibrate its coefficients. Calibration runs here, outside device_work: the max may come
    from an on-demand scan that takes the lock itself."""
    s = engine.sae(sae)
    feats = engine.check_features(s, [f for f, _ in features], MAX_STEER_FEATURES, required=True, unique=True)
    given = [float(st) for _, st in features]
    scales = [1.0] if strengths is None else [float(x) for x in strengths]
    sampling.check()
    _check_strengths(given, scales)
    if calibration not in ("max_activation", "absolute"):
        raise InvalidInput(f"calibration={calibration!r}: use 'max_activation' or 'absolute'")
    check_n_controls(controls, n_controls)
    answer_ids = answer_token_ids(engine, answer) if answer is not None else None
    maxes = _max_activations(s, feats, calibration, max_activation_fn)
    coefficients = [st * (m[0] if m else 1.0) for st, m in zip(given, maxes)]  # per feature at scale 1
    _check_coefficients(feats, coefficients, scales)
    return SteerPlan(
        sae=s, features=feats, strengths=given, scales=scales, calibration=calibration, maxes=maxes,
        coefficients=coefficients, answer_ids=answer_ids, sampling=sampling, controls=controls, n_controls=n_controls,
    )


def _steering_vectors(
    rows: SteerRows, W_dec: torch.Tensor, features: list[int], coefficients: list[float]
) -> torch.Tensor:
    """One vector per batch row [B, d_in]: zero (unsteered), scale * sum_f c_f W_dec[f] per dose, and per control
    set the same coefficients on its features at the control scale."""
    coef = torch.tensor(coefficients, device=W_dec.device, dtype=W_dec.dtype)  # [n_feats]

    def direction(feats: list[int]) -> torch.Tensor:  # [d_in]
        return coef @ W_dec[torch.tensor(feats, device=W_dec.device)]

    target = direction(features)  # [d_in]: the scale-1 steering vector
    vectors = [torch.zeros_like(target)] + [x * target for x in rows.scales]
    vectors += [rows.control_scale * direction(cs) for cs in rows.control_sets]
    return torch.stack(vectors)  # [B, d_in]


def _run(
    engine: Engine, prompt: str, plan: SteerPlan, use_cache: bool, cancel: CancelToken | None,
    progress: ProgressFn | None,
) -> SteerOutcome:
    """The device work: tokens, controls, one steering vector per row, one batched generation. Inside device_work."""
    s, sampling = plan.sae, plan.sampling
    tokens = engine.to_tokens(prompt, prepend_bos=s.prepend_bos)  # [1, S]
    if tokens.shape[1] + sampling.max_new_tokens > engine.model.cfg.n_ctx:
        raise InvalidInput(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's "
            f"context of {engine.model.cfg.n_ctx}; shorten one"
        )
    W_dec = s.sae.W_dec  # [d_sae, d_in]
    norms = W_dec.norm(dim=-1)  # [d_sae]
    control_sets: list[list[int]] = []
    note = None
    if plan.controls:
        eligible = torch.ones(s.d_sae, dtype=torch.bool)  # [d_sae]
        control_sets, note = matched_controls(norms, plan.features, plan.n_controls, sampling.seed, eligible)
    rows = SteerRows(plan.scales, control_sets)
    vectors = _steering_vectors(rows, W_dec, plan.features, plan.coefficients)  # [B, d_in]
    # Effects of each row against row 0, on the prompt (identical input, so the comparison is exact), taken
    # from the first forward at once: the [B, S, V] prompt logits are not kept during generation
    new, stats, stopped = generate_rows(
        engine, tokens, s.hook_name, vectors, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
        sampling.seed, use_cache, cancel, progress, answer_id=plan.answer_ids[0] if plan.answer_ids else None,
    )
    return SteerOutcome(
        rows=rows,
        new_tokens=new.cpu(),
        stopped_at_eos=stopped,
        stats=stats,
        control_note=note,
        decoder_norms=[float(norms[f]) for f in plan.features],
        prompt_tokens=engine.str_tokens(tokens),
        answer_tokens=engine.str_tokens(torch.tensor(plan.answer_ids)) if plan.answer_ids else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# steer_generate: the result


def _effects(stats: PromptStats, row: int) -> dict[str, float]:
    """A row's effect metrics against the unsteered row, unrounded."""
    effects = {"kl_next_token": stats.kl_last[row], "mean_kl_prompt": stats.kl_mean[row]}
    if stats.p_answer is not None:
        effects["answer_probability_change"] = stats.p_answer[row] - stats.p_answer[SteerRows.UNSTEERED]
    return effects


def _steer_runs(
    plan: SteerPlan, out: SteerOutcome, conts: list[Continuation], gen_ids: list[list[int]]
) -> list[SteerRun]:
    """One run per dose, each against the unsteered row."""
    stats, p, u = out.stats, out.stats.p_answer, SteerRows.UNSTEERED
    runs = []
    for i, x in enumerate(plan.scales):
        b = out.rows.dose_row(i)
        runs.append(
            SteerRun(
                scale=x,
                coefficients=[rounded(c * x, 6) for c in plan.coefficients],
                continuation=conts[b],
                changed=conts[b].text != conts[u].text,
                first_divergent_token=first_divergence(gen_ids[u], gen_ids[b]),
                kl_next_token=rounded(stats.kl_last[b], 6),
                mean_kl_prompt=rounded(stats.kl_mean[b], 6),
                answer_probability=rounded(p[b], 6) if p else None,
                answer_probability_change=rounded(p[b] - p[u], 6) if p else None,
            )
        )
    return runs


def _steer_controls(plan: SteerPlan, out: SteerOutcome, conts: list[Continuation]) -> Controls:
    rows = out.rows
    runs = [
        ControlRun(features=cs, effects=rounded_effects(_effects(out.stats, rows.control_row(i))),
                   continuation=conts[rows.control_row(i)].text)
        for i, cs in enumerate(rows.control_sets)
    ]
    return Controls(
        matched_on=f"decoder norm (nearest {pool_size(plan.n_controls)}, drawn by seed), same coefficients, "
        f"at scale {rows.control_scale:g}",
        seed=plan.sampling.seed,
        runs=runs,
        stats=control_stats(_effects(out.stats, rows.target_row_for_controls), runs),
        note=out.control_note,
        caution=few_controls_caution(len(runs)),
    )


def _assemble(engine: Engine, plan: SteerPlan, out: SteerOutcome) -> SteerResult:
    eos = engine.model.tokenizer.eos_token_id
    new, u, p = out.new_tokens, SteerRows.UNSTEERED, out.stats.p_answer
    conts = [continuation(engine, new[b], eos, out.stopped_at_eos[b]) for b in range(new.shape[0])]
    gen_ids = [generated_ids(new[b], eos) for b in range(new.shape[0])]
    features = [
        SteerFeature(
            feature=f,
            strength=st,
            max_activation=rounded(m[0], 6) if m else None,
            max_activation_source=m[1] if m else None,
            decoder_norm=rounded(norm, 6),
            coefficient=rounded(c, 6),
        )
        for f, st, m, c, norm in zip(plan.features, plan.strengths, plan.maxes, plan.coefficients, out.decoder_norms)
    ]
    return SteerResult(
        sae=plan.sae.key,
        hook_name=plan.sae.hook_name,
        calibration=plan.calibration,
        features=features,
        seed=plan.sampling.seed,
        temperature=plan.sampling.temperature,
        top_p=plan.sampling.top_p,
        prompt_tokens=out.prompt_tokens,
        unsteered=conts[u],
        unsteered_answer_probability=rounded(p[u], 6) if p else None,
        answer_tokens=out.answer_tokens,
        multi_token=len(plan.answer_ids) > 1 if plan.answer_ids else None,
        steered=_steer_runs(plan, out, conts, gen_ids),
        controls=_steer_controls(plan, out, conts) if plan.controls else None,
    )


def steer_generate(
    engine: Engine,
    prompt: str,
    features: Sequence[tuple[int, float]],
    sae: str | None = None,
    max_new_tokens: int = 30,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    seed: int = 0,
    calibration: str = "max_activation",
    max_activation_fn: MaxActivationFn | None = None,
    strengths: Sequence[float] | None = None,
    answer: str | None = None,
    controls: bool = False,
    n_controls: int = 5,
    use_cache: bool = True,
    cancel: CancelToken | None = None,
    progress: ProgressFn | None = None,
) -> SteerResult:
    """Generate unsteered and steered continuations side by side. `features` = [(feature, strength)];
    coefficient = strength * max_activation(feature) ('max_activation') or strength ('absolute');
    `strengths` = doses: one run per value, every coefficient multiplied by it. All rows are generated as one
    batch: `cancel` stops it between steps (Cancelled), `progress(step, max_new_tokens)` follows it."""
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    plan = _plan(engine, sae, features, strengths, sampling, calibration, max_activation_fn, answer, controls,
                 n_controls)
    with engine.device_work():
        outcome = _run(engine, prompt, plan, use_cache, cancel, progress)
    return _assemble(engine, plan, outcome)
