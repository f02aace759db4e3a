"""What one steer_generate call is: its ceilings and defaults, the call as asked (SteeringRequest), its runs and
their batch rows (SteerRows), the validated call (SteerPlan) and what the device work gives back (SteerOutcome).

Validation happens here, before any device work: every error says what to change, and a call too large for one
batch is refused before it starts. SteeringRequest.check() validates all that needs no model; plan_call the rest
(the SAE, the features' range, the answer's tokens, the calibration).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sae_mcp.engine.controls import check_n_controls
from sae_mcp.engine.generation import Decoding, PromptStats
from sae_mcp.engine.logits import answer_token_ids
from sae_mcp.engine.metric import Metric, metric_for
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput

# Ceilings on one call's work (the tool signatures repeat them so clients see them in the schema).
MAX_NEW_TOKENS = 256
MAX_STEER_FEATURES = 16
MAX_STRENGTHS = 12
MAX_STRENGTH = 1000  # |strength|: a multiple of max_activation, or the absolute coefficient
MAX_COEFFICIENT = 1e5  # |strength * max_activation| after calibration
MAX_SEEDS = 8
MAX_SEED = 2**31 - 1
# Runs x seeds generated as one batch. Memory grows with it: the first forward's [rows, prompt, d_vocab] logits
# and a KV cache per row (GPT-2 small, 300 tokens: ~20 MiB a row); 128 rows keep both to a few GiB.
MAX_BATCH_ROWS = 128

# Defaults shared by the engine and the tool: sampled as in the SAELens steering tutorial (temperature 1, top_p
# 0.9), which shows a feature's pull better than greedy decoding's repetition loops on small models; every row
# draws from its own generator seeded alike, so runs are reproducible by seed and rows differ only by steering.
# temperature=0 gives greedy decoding.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.9

# A coefficient above this multiple of the feature's max activation (at any dose) is warned about: on stories260K
# 5-10x already turns most features' continuations into word salad (measured: per-token loss 4-15 nats against
# ~1 unsteered), and the issue that asked for this saw "mom her herse her" at 290x.
FAR_ABOVE_MAX = 10.0

MaxActivationFn = Callable[[LoadedSAE, int], tuple[float, str]]
KnownMaxFn = Callable[[LoadedSAE, int], float | None]  # a max activation already known (index, cached scan), or None


@dataclass(frozen=True)
class SteerRows:
    """The runs of one call and their batch rows. Runs: 0 unsteered, then one per dose (scale), then for each
    control dose one per control set. The batch holds the runs once per seed, seed-major:
    batch row = seed index * n_runs + run, so the first seed's rows are the first n_runs."""

    scales: list[float]
    control_scales: list[float]  # the doses the controls run at
    control_sets: list[list[int]]
    n_seeds: int = 1

    UNSTEERED = 0

    @property
    def n_runs(self) -> int:
        return 1 + len(self.scales) + len(self.control_scales) * len(self.control_sets)

    def dose_row(self, i: int) -> int:
        return 1 + i

    def control_row(self, j: int, i: int) -> int:
        """Control set i at control dose j."""
        return 1 + len(self.scales) + j * len(self.control_sets) + i

    def target_row(self, j: int) -> int:
        """The targets' run at control dose j (the first of equal doses), whose effects the controls are compared
        with."""
        return self.dose_row(self.scales.index(self.control_scales[j]))

    def batch_row(self, run: int, k: int) -> int:
        """Run `run` under the k-th seed."""
        return k * self.n_runs + run

    def batch_layout(self) -> list[tuple[int, int]]:
        """(run, seed index) of every batch row, in batch order: the inverse of batch_row."""
        return [(run, k) for k in range(self.n_seeds) for run in range(self.n_runs)]


@dataclass(frozen=True)
class Sampling:
    """How every row is generated: the same settings for each, every run once per seed."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    seeds: tuple[int, ...]

    @property
    def decoding(self) -> Decoding:
        """The per-row settings, without the seeds."""
        return Decoding(self.max_new_tokens, self.temperature, self.top_p)

    def check(self) -> None:
        if not 0 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidInput(f"max_new_tokens={self.max_new_tokens}: use 0..{MAX_NEW_TOKENS}")
        if not 0 <= self.temperature <= 10 or not math.isfinite(self.temperature):
            raise InvalidInput(f"temperature={self.temperature}: use 0 (greedy) .. 10")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p={self.top_p}: use a value in (0, 1]")
        if not 1 <= len(self.seeds) <= MAX_SEEDS:
            raise InvalidInput(f"{len(self.seeds)} seeds given; pass 1..{MAX_SEEDS}")
        if len(set(self.seeds)) != len(self.seeds):
            raise InvalidInput(f"seeds {list(self.seeds)} repeat a seed; list each seed once")
        if any(not 0 <= x <= MAX_SEED for x in self.seeds):
            raise InvalidInput(f"seeds {list(self.seeds)}: each seed must be in 0..{MAX_SEED}")


def resolve_seeds(seed: int | None, seeds: Sequence[int] | None) -> tuple[int, ...]:
    """`seeds` when given, else (seed,) (default 0). Both given: seeds[0] is what `seed` means (the first texts and
    the control draw), so a different `seed` is an error rather than silently ignored."""
    if seeds is None:
        return (0 if seed is None else int(seed),)
    given = tuple(int(x) for x in seeds)
    if seed is not None and given and int(seed) != given[0]:
        raise InvalidInput(
            f"seed={seed} and seeds={list(given)} disagree: seeds[0] is the seed (it also draws the controls); "
            "pass only seeds"
        )
    return given


@dataclass(frozen=True)
class SteeringRequest:
    """One steer_generate call as asked: the prompt, what to steer with and at which doses, how to sample, what to
    score, which controls to run. check() validates it without a model."""

    prompt: str  # the text every run continues
    features: tuple[tuple[int, float], ...]  # (feature, strength): strength x max activation, or the coefficient
    sae: str | None = None  # the SAE's key; None = the default SAE
    max_new_tokens: int = 30  # tokens generated per run
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = DEFAULT_TOP_P  # the nucleus' probability mass, in (0, 1]
    seed: int | None = None  # the one seed when `seeds` is not given (default 0)
    seeds: tuple[int, ...] | None = None  # every run once per seed; seeds[0] also draws the controls
    calibration: str = "max_activation"  # 'max_activation' (strength x max activation) or 'absolute'
    strengths: tuple[float, ...] | None = None  # the doses: one run per value, every coefficient x it; None = (1,)
    answer: str | None = None  # scored at the prompt's next-token position, per dose
    counterfactual: str | None = None  # with an answer: the metric is logit[answer] - logit[counterfactual]
    controls: bool = False  # random features matched in decoder norm, steered alike
    n_controls: int = 5  # control sets
    control_strength: float | None = None  # the one dose the controls run at; None = every nonzero dose

    @property
    def strengths_given(self) -> list[float]:
        """Per feature, as given."""
        return [float(st) for _, st in self.features]

    @property
    def scales(self) -> list[float]:
        """The doses: `strengths`, else [1.0]."""
        return [1.0] if self.strengths is None else [float(x) for x in self.strengths]

    def sampling(self) -> Sampling:
        """How every run is generated, its seeds resolved (an error when `seed` and `seeds` disagree)."""
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, resolve_seeds(self.seed, self.seeds))

    def control_scales(self) -> list[float]:
        """The doses the controls run at: the one asked for, else every distinct nonzero dose (a zero dose steers
        nothing, so its controls would only repeat the unsteered run); [] without controls."""
        scales = self.scales
        if self.control_strength is None:
            if not self.controls:
                return []
            nonzero = list(dict.fromkeys(x for x in scales if x != 0))
            if not nonzero:
                raise InvalidInput("controls=true but every strength is 0 (nothing is steered); add a nonzero strength")
            return nonzero
        x = float(self.control_strength)
        if not self.controls:
            raise InvalidInput(
                f"control_strength={x:g} is only used with controls=true; pass controls=true or drop it"
            )
        if x not in scales or x == 0:
            raise InvalidInput(
                f"control_strength={x:g} is not one of the nonzero strengths ({', '.join(f'{s:g}' for s in scales)}): "
                "pick one of them, or omit it to run controls at every dose"
            )
        return [x]

    def check(self) -> None:
        """Every check that needs no model, each error saying what to change: the sampling settings and seeds, the
        strengths and doses, the calibration, the controls and their doses, the batch size, the counterfactual."""
        sampling = self.sampling()
        sampling.check()
        _check_strengths(self.strengths_given, self.scales)
        if self.calibration not in ("max_activation", "absolute"):
            raise InvalidInput(f"calibration={self.calibration!r}: use 'max_activation' or 'absolute'")
        check_n_controls(self.controls, self.n_controls)
        n_controls = self.n_controls if self.controls else 0
        _check_batch(len(self.scales), len(self.control_scales()), n_controls, len(sampling.seeds))
        if self.counterfactual is not None and self.answer is None:
            raise InvalidInput("counterfactual needs an answer: the metric is logit[answer] - logit[counterfactual]")


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
    reference_maxes: list[float | None]  # per feature: its max activation when known (calibrated, or already known)
    answer: str | None
    answer_ids: list[int] | None
    metric: Metric | None  # with an answer: logit[answer] - logit[counterfactual], else log P(answer)
    sampling: Sampling
    controls: bool
    n_controls: int
    control_scales: list[float]  # the doses the controls run at ([] without controls)


@dataclass(frozen=True)
class SteerOutcome:
    """What the device work gives back."""

    rows: SteerRows
    new_tokens: torch.Tensor  # [n_seeds * n_runs, T] on the CPU (after EOS: EOS)
    stopped_at_eos: list[bool]  # per batch row
    stats: PromptStats  # every run against the unsteered one, on the prompt (seed-independent: the first seed's)
    readouts: list[list[float] | None]  # per batch row: the targets' concept readout of its continuation
    losses: list[float | None]  # per batch row: mean per-token loss of its continuation under the unsteered model
    entropies: list[float | None]  # per batch row: mean entropy of the unsteered model along its continuation
    control_note: str | None  # why fewer control sets than asked, when so
    decoder_norms: list[float]  # ||W_dec[f]|| per target feature
    prompt_tokens: list[str]
    answer_tokens: list[str] | None
    answer_warning: str | None  # the answer's space variant is far more likely, when so


# ---------------------------------------------------------------------------------------------------------------
# Validation


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
    return list(maxes)  # typed as the plan holds them (None where not calibrated)


def _check_coefficients(features: list[int], coefficients: list[float], scales: list[float]) -> None:
    for f, c in zip(features, coefficients):
        for x in scales:
            if abs(c * x) > MAX_COEFFICIENT:
                raise InvalidInput(
                    f"feature {f}: coefficient {c * x:.4g} exceeds {MAX_COEFFICIENT:g}; lower the strength"
                )


def _check_batch(n_scales: int, n_control_scales: int, n_controls: int, n_seeds: int) -> None:
    runs = 1 + n_scales + n_control_scales * n_controls
    if runs * n_seeds > MAX_BATCH_ROWS:
        raise InvalidInput(
            f"this call generates {runs} runs (unsteered, {n_scales} doses, {n_controls} controls at "
            f"{n_control_scales} doses) x {n_seeds} seeds = {runs * n_seeds} rows, over the {MAX_BATCH_ROWS} one call "
            "may generate: pass fewer seeds, strengths or n_controls, or control_strength=one dose"
        )


def plan_call(
    engine: Engine, request: SteeringRequest, max_activation_fn: MaxActivationFn | None = None,
    known_max_fn: KnownMaxFn | None = None,
) -> SteerPlan:
    """Validate a call (request.check(), then what needs the model) and calibrate its coefficients. Calibration runs
    here, outside device_work: the max may come from an on-demand scan that takes the lock itself."""
    request.check()
    s = engine.sae(request.sae)
    feats = engine.check_features(s, [f for f, _ in request.features], MAX_STEER_FEATURES, required=True, unique=True)
    given, scales = request.strengths_given, request.scales
    answer, counterfactual = request.answer, request.counterfactual
    answer_ids = answer_token_ids(engine, answer) if answer is not None else None
    cf_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    metric = None
    if answer is not None and answer_ids:
        metric = metric_for(engine, answer_ids, cf_ids, answer, counterfactual)
    maxes = _max_activations(s, feats, request.calibration, max_activation_fn)
    coefficients = [st * (m[0] if m else 1.0) for st, m in zip(given, maxes)]  # per feature at scale 1
    _check_coefficients(feats, coefficients, scales)
    known = [m[0] if m else (known_max_fn(s, f) if known_max_fn else None) for f, m in zip(feats, maxes)]
    return SteerPlan(
        sae=s, features=feats, strengths=given, scales=scales, calibration=request.calibration, maxes=maxes,
        coefficients=coefficients, reference_maxes=known, answer=answer, answer_ids=answer_ids, metric=metric,
        sampling=request.sampling(), controls=request.controls, n_controls=request.n_controls,
        control_scales=request.control_scales(),
    )


def far_above_max(plan: SteerPlan) -> list[tuple[int, float]]:
    """(feature, multiple) for every feature whose largest |coefficient x dose| exceeds FAR_ABOVE_MAX times its
    known max activation."""
    out = []
    for f, c, m in zip(plan.features, plan.coefficients, plan.reference_maxes):
        if m and m > 0:
            multiple = max(abs(c * x) for x in plan.scales) / m
            if multiple > FAR_ABOVE_MAX:
                out.append((f, multiple))
    return out
