"""Ablation: zero SAE features at some positions with the SAE spliced in, and compare next-token predictions.

Ablation zeroes features on `<hook>.hook_sae_acts_post`, the spliced SAE's own hook point. With the error term
sae-lens computes the error from a hook-free re-encode, so the model's output moves by exactly
-sum_f act_f * W_dec[f] at the ablated positions (tested against that plain computation).

Hygiene: every hook lives inside a context manager (`model.hooks(fwd_hooks=...)`, `model.saes(saes=...,
use_error_term=...)`) entered inside `Engine.device_work()`, whose finally detaches anything left anyway.
SAE weights and `sae.use_error_term` are never touched: sae-lens 6 reads use_error_term only when the SAE is
attached, so it is passed to `model.saes(...)`.

Every condition is scored on the metric (engine/metric.py): logit[answer] - logit[counterfactual] with a
counterfactual, else log P(answer); z and "exceeds every control" are stated on it and on KL only. Zeroing a feature
changes the metric by minus its contribution (attribute's exact_contribution).

ablate_and_test validates a call into an AblationPlan, runs its two spliced batches (AblationBatches) under
device_work into an AblationOutcome, and assembles the AblationResult from that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sae_mcp.engine.controls import (
    ACTIVATION_BAND,
    EXCLUDED_TOP,
    activation_matched_controls,
    check_n_controls,
    control_stats,
    few_controls_caution,
    kl,
    rounded_effects,
)
from sae_mcp.engine.features import reconstruction_warning, relative_error
from sae_mcp.engine.logits import answer_token_ids, answer_variant_warning, next_token_table
from sae_mcp.engine.metric import Metric, metric_for
from sae_mcp.engine.runtime import Engine, context_warning, resolve_positions
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.causal import (
    AblatedFeature,
    AblationResult,
    ControlRun,
    Controls,
    NextTokenTable,
    ReconstructionTable,
    ScoredToken,
)

# ---------------------------------------------------------------------------------------------------------------
# The hooks: zero features per batch row, with the SAE spliced in


def _ablation_hook(rows: list[list[int]], positions: list[int], device) -> Callable:
    """A hook for <hook>.hook_sae_acts_post that zeroes, in batch row b, features rows[b] at `positions`."""
    pos = torch.tensor(positions, device=device)[:, None]  # [n_pos, 1]
    idx = [torch.tensor(fs, device=device)[None, :] if fs else None for fs in rows]  # [1, n_feats] per row

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:  # acts [B, S, d_sae]
        acts = acts.clone()
        for b, fs in enumerate(idx):
            if fs is not None:
                acts[b, pos, fs] = 0.0
        return acts

    return hook


def _spliced_logits(
    engine: Engine, sae: LoadedSAE, tokens: torch.Tensor, rows: list[list[int]], positions: list[int], error_term: bool
) -> torch.Tensor:
    """Last-position logits [B, d_vocab] with the SAE spliced in and rows[b]'s features zeroed in row b."""
    model = engine.model
    hook = _ablation_hook(rows, positions, tokens.device)
    with model.saes(saes=[sae.sae], use_error_term=error_term):
        with model.hooks(fwd_hooks=[(f"{sae.hook_name}.hook_sae_acts_post", hook)]):
            return model(tokens.expand(len(rows), -1), return_type="logits")[:, -1]


# ---------------------------------------------------------------------------------------------------------------
# ablate_and_test: the batch rows, the validated call, the device work


@dataclass(frozen=True)
class AblationBatches:
    """The features zeroed in each row of the two spliced batches of one call.

    Without the error term: row 0 = nothing ablated (the SAE's own distortion), row 1 = the targets ablated.
    With the error term: row 0 = the targets, then one row per control set."""

    targets: list[int]
    control_sets: list[list[int]]

    RECONSTRUCTION = 0  # without the error term
    ABLATED_WITHOUT_ERROR_TERM = 1
    ABLATED = 0  # with the error term

    @property
    def without_error_term(self) -> list[list[int]]:
        return [[], self.targets]

    @property
    def with_error_term(self) -> list[list[int]]:
        return [self.targets, *self.control_sets]

    def control_row(self, i: int) -> int:
        """Control set i's row in the batch with the error term."""
        return 1 + i


@dataclass(frozen=True)
class AblationPlan:
    """A validated ablate_and_test call."""

    sae: LoadedSAE
    features: list[int]
    answer: str
    answer_ids: list[int]
    counterfactual_ids: list[int] | None
    metric: Metric  # logit[answer] - logit[counterfactual] with one, else log P(answer)
    position: int | Sequence[int] | None  # resolved against the prompt's length under device_work
    top_k: int
    controls: bool
    n_controls: int
    seed: int


@dataclass(frozen=True)
class AblationLogits:
    """Next-token logits [d_vocab] after the prompt, per condition, unrounded."""

    baseline: torch.Tensor  # the plain model, no SAE
    reconstruction: torch.Tensor  # SAE spliced without the error term, nothing ablated
    ablated_without_error_term: torch.Tensor  # SAE spliced without the error term, the targets ablated
    ablated: torch.Tensor  # SAE spliced with the error term, the targets ablated
    controls: list[torch.Tensor]  # SAE spliced with the error term, one control set ablated each


@dataclass(frozen=True)
class AblationOutcome:
    """What the device work gives back."""

    tokens: list[str]
    positions: list[int]  # the ablated positions, non-negative
    recon_error: torch.Tensor  # [S] relative squared reconstruction error per position (features.PromptActs)
    act_sum: torch.Tensor  # [d_sae]: how much each feature fires where we ablate
    act_max: torch.Tensor  # [d_sae]
    fired: torch.Tensor  # [d_sae] bool: nonzero at some ablated position
    control_sets: list[list[int]]
    control_note: str | None  # why fewer control sets than asked, when so
    logits: AblationLogits


def _attribution_at(engine: Engine, s: LoadedSAE, tokens: torch.Tensor, metric: Metric, positions: list[int]
                    ) -> torch.Tensor:
    """Gradient x activation of every feature on the metric after the prompt, summed over `positions` [d_sae]: the
    SAE spliced with its error term (the plain model's output), its activations a leaf. The controls leave out the
    largest of these (known causes of the metric are no controls)."""
    model, kept = engine.model, {}

    def leaf(acts: torch.Tensor, hook) -> torch.Tensor:  # acts [1, S, d_sae]
        kept["acts"] = acts.detach().requires_grad_(True)
        return kept["acts"]

    with torch.enable_grad(), model.saes(saes=[s.sae], use_error_term=True):
        with model.hooks(fwd_hooks=[(f"{s.hook_name}.hook_sae_acts_post", leaf)]):
            m = metric.of(model(tokens, return_type="logits")[0, -1])
            (grad,) = torch.autograd.grad(m, [kept["acts"]])
    return (kept["acts"].detach()[0] * grad[0]).float()[positions].sum(0)  # [d_sae]


def _controls_for(engine: Engine, plan: AblationPlan, tokens: torch.Tensor, positions: list[int],
                  act_sum: torch.Tensor) -> tuple[list[list[int]], str | None]:
    attribution = _attribution_at(engine, plan.sae, tokens, plan.metric, positions)  # [d_sae]
    return activation_matched_controls(act_sum, attribution, plan.features, plan.n_controls, plan.seed)


def _run(engine: Engine, prompt: str, plan: AblationPlan) -> AblationOutcome:
    """The device work: the plain forward, the SAE's activations, the controls (one backward pass for their
    exclusions), then the two spliced batches. Inside device_work."""
    s = plan.sae
    tokens = engine.to_tokens(prompt, prepend_bos=s.prepend_bos)  # [1, S]
    positions = resolve_positions(plan.position, tokens.shape[1])
    with torch.inference_mode():
        base = engine.model(tokens, return_type="logits")[0, -1]  # [V]
        x = engine.forward_to_hook(tokens, s)[0]  # [S, d_in]
        raw = engine.encode(s, x)  # [S, d_sae] in the SAE's dtype
        recon_error = relative_error(x, s.sae.decode(raw))  # [S]
        acts = raw.float()
        act_sum = acts[positions].sum(0)  # [d_sae]: how much each feature fires where we ablate
        act_max = acts[positions].max(0).values  # [d_sae]
        fired = (acts[positions] != 0).any(0)  # [d_sae]
    control_sets, note = _controls_for(engine, plan, tokens, positions, act_sum) if plan.controls else ([], None)
    with torch.inference_mode():
        batches = AblationBatches(plan.features, control_sets)
        no_err = _spliced_logits(engine, s, tokens, batches.without_error_term, positions, error_term=False)  # [2, V]
        with_err = _spliced_logits(engine, s, tokens, batches.with_error_term, positions, error_term=True)  # [B, V]
    logits = AblationLogits(
        baseline=base,
        reconstruction=no_err[batches.RECONSTRUCTION],
        ablated_without_error_term=no_err[batches.ABLATED_WITHOUT_ERROR_TERM],
        ablated=with_err[batches.ABLATED],
        controls=[with_err[batches.control_row(i)] for i in range(len(control_sets))],
    )
    return AblationOutcome(
        tokens=engine.str_tokens(tokens), positions=positions, recon_error=recon_error, act_sum=act_sum,
        act_max=act_max, fired=fired,
        control_sets=control_sets, control_note=note, logits=logits,
    )


# ---------------------------------------------------------------------------------------------------------------
# ablate_and_test: the result


SIGNIFICANCE = ("metric_change", "kl_next_token")  # what z and "exceeds every control" are stated on


def changes(metric: Metric, logits: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Changes of `logits` [V] from `ref` [V], unrounded: the metric, KL(ref || this), P(answer), the raw logit."""
    a = metric.answer
    lp_r, lp = ref.float().log_softmax(-1), logits.float().log_softmax(-1)  # [V] each
    return {"metric_change": float(metric.of(logits) - metric.of(ref)), "kl_next_token": float(kl(ref, logits)),
            "answer_probability_change": float(lp[a].exp() - lp_r[a].exp()),
            "answer_logit_change": float(logits[a] - ref[a])}


def _summary(lg: AblationLogits, metric: Metric) -> str:
    """One line: the ablation's causal effect, its effect without the error term, and the SAE's own distortion."""

    def said(c: dict[str, float]) -> str:
        return (f"metric {c['metric_change']:+.4g}, P(answer) {c['answer_probability_change']:+.4g}, "
                f"KL {c['kl_next_token']:.4g}")

    effect = changes(metric, lg.ablated, lg.baseline)  # the ablation's causal effect
    alone = changes(metric, lg.ablated_without_error_term, lg.reconstruction)  # without the error term
    sae = changes(metric, lg.reconstruction, lg.baseline)  # the SAE's own distortion
    return (
        f"causal effect of the ablation (ablated vs baseline, with the error term): {said(effect)}; without the "
        f"error term (vs reconstruction_only): {said(alone)}; the SAE's own distortion (reconstruction_only vs "
        f"baseline): KL {sae['kl_next_token']:.4g}, P(answer) {sae['answer_probability_change']:+.4g}"
    )


def _silent_warning(silent: list[int], features: list[int]) -> str | None:
    """A warning when some targets do not fire at the ablated positions (ablating them changes nothing)."""
    if not silent:
        return None
    every = len(silent) == len(features)
    return (
        f"feature(s) {silent} have zero activation at the ablated positions: ablating them changes nothing"
        + (" (every target is silent, so the ablated tables equal baseline and reconstruction_only by "
           "construction)" if every else "")
        + "; pick positions where they fire (get_feature_acts) or other features"
    )


def _ablation_controls(plan: AblationPlan, out: AblationOutcome, silent: list[int]) -> Controls:
    lg = out.logits
    runs = [
        ControlRun(features=cs, effects=rounded_effects(changes(plan.metric, logits, lg.baseline)))
        for cs, logits in zip(out.control_sets, lg.controls)
    ]
    note = out.control_note
    if not runs and note is None:
        note = "no control could be drawn"
    if len(silent) == len(plan.features) and "do not fire" not in (note or ""):
        why = "the target features do not fire at these positions: ablating them changes nothing"
        note = f"{note}; {why}" if note else why
    target = changes(plan.metric, lg.ablated, lg.baseline)
    lo, hi = ACTIVATION_BAND
    return Controls(
        matched_on=f"firing features with summed activation at the ablated positions within {lo:g}-{hi:g}x their "
        f"target's, not a target nor among the {EXCLUDED_TOP} of largest |attribution| to the metric there; drawn "
        "by seed, ablated with the error term",
        seed=plan.seed,
        runs=runs,
        stats=control_stats({k: target[k] for k in SIGNIFICANCE}, runs),
        note=note,
        caution=few_controls_caution(len(runs)),
    )


def _table(engine: Engine, plan: AblationPlan, logits: torch.Tensor, baseline: torch.Tensor) -> NextTokenTable:
    """logits [V] -> one condition's table, with its changes from baseline."""
    top, ans = next_token_table(engine, logits, plan.top_k, plan.answer_ids)
    assert ans is not None  # scored: the plan has an answer
    c = changes(plan.metric, logits, baseline)
    return NextTokenTable(
        top=top, answer_rank=ans.rank, answer_probability=ans.probability, answer_logit=ans.logit,
        metric=rounded(float(plan.metric.of(logits))),
        answer_probability_change=rounded(c["answer_probability_change"], 6),
        answer_logit_change=rounded(c["answer_logit_change"]),
        metric_change=rounded(c["metric_change"]),
        kl_from_baseline=rounded(c["kl_next_token"], 6),
    )


def _scored(engine: Engine, ids: list[int]) -> ScoredToken:
    strs = engine.str_tokens(torch.tensor(ids))
    return ScoredToken(token=strs[0], token_id=ids[0], tokens=strs)


def _warnings(engine: Engine, plan: AblationPlan, out: AblationOutcome, silent: list[int]) -> list[str] | None:
    s = plan.sae
    return collect_warnings(
        answer_variant_warning(engine, out.logits.baseline, plan.answer, plan.answer_ids),
        context_warning(s, len(out.tokens)),
        reconstruction_warning(s, out.recon_error, out.positions, out.tokens, "the ablated "),
        _silent_warning(silent, plan.features),
    )


def _assemble(engine: Engine, plan: AblationPlan, out: AblationOutcome) -> AblationResult:
    lg = out.logits
    silent = [f for f in plan.features if not bool(out.fired[f])]
    alone = changes(plan.metric, lg.ablated_without_error_term, lg.reconstruction)  # without the error term
    return AblationResult(
        sae=plan.sae.key,
        hook_name=plan.sae.hook_name,
        tokens=out.tokens,
        positions=None if out.positions == list(range(len(out.tokens))) else out.positions,
        answer=_scored(engine, plan.answer_ids),
        counterfactual=_scored(engine, plan.counterfactual_ids) if plan.counterfactual_ids else None,
        metric=plan.metric.name,
        metric_kind=plan.metric.kind,
        features=[
            AblatedFeature(feature=f, fired=bool(out.fired[f]), activation_sum=rounded(float(out.act_sum[f])),
                           max_activation=rounded(float(out.act_max[f])))
            for f in plan.features
        ],
        baseline=_table(engine, plan, lg.baseline, lg.baseline),
        reconstruction_only=_table(engine, plan, lg.reconstruction, lg.baseline),
        ablated=_table(engine, plan, lg.ablated, lg.baseline),
        ablated_without_error_term=ReconstructionTable(
            **_table(engine, plan, lg.ablated_without_error_term, lg.baseline).model_dump(),
            answer_probability_change_vs_reconstruction=rounded(alone["answer_probability_change"], 6),
            answer_logit_change_vs_reconstruction=rounded(alone["answer_logit_change"]),
            metric_change_vs_reconstruction=rounded(alone["metric_change"]),
            kl_from_reconstruction=rounded(alone["kl_next_token"], 6),
        ),
        summary=_summary(lg, plan.metric),
        controls=_ablation_controls(plan, out, silent) if plan.controls else None,
        warnings=_warnings(engine, plan, out, silent),
    )


def ablate_and_test(
    engine: Engine,
    prompt: str,
    answer: str,
    features: Sequence[int],
    sae: str | None = None,
    position: int | Sequence[int] | None = None,
    top_k: int = 10,
    controls: bool = False,
    n_controls: int = 5,
    seed: int = 0,
    counterfactual: str | None = None,
) -> AblationResult:
    """Zero `features` at `position` (None = all) with the SAE spliced in; next-token tables for the plain model,
    the reconstruction alone, the ablation with the error term and the ablation without it, scored on the metric
    (logit[answer] - logit[counterfactual] with a counterfactual, else log P(answer))."""
    s = engine.sae(sae)
    feats = engine.check_features(s, features, engine.limits.max_features_per_call, required=True, unique=True)
    answer_ids = answer_token_ids(engine, answer)
    cf_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    metric = metric_for(engine, answer_ids, cf_ids, answer, counterfactual)
    check_n_controls(controls, n_controls)
    plan = AblationPlan(
        sae=s, features=feats, answer=answer, answer_ids=answer_ids, counterfactual_ids=cf_ids, metric=metric,
        position=position, top_k=top_k, controls=controls, n_controls=n_controls, seed=seed,
    )
    with engine.device_work():
        outcome = _run(engine, prompt, plan)
    return _assemble(engine, plan, outcome)
