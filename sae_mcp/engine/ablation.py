"""Ablation: zero SAE features at some positions with the SAE spliced in, and compare next-token predictions.

Ablation zeroes features on `<hook>.hook_sae_acts_post`, the spliced SAE's own hook point. With the error term
sae-lens computes the error from a hook-free re-encode, so the model's output moves by exactly
-sum_f act_f * W_dec[f] at the ablated positions (tested against that plain computation).

Hygiene: every hook lives inside a context manager (`model.hooks(fwd_hooks=...)`, `model.saes(saes=...,
use_error_term=...)`) entered inside `Engine.device_work()`, whose finally detaches anything left anyway.
SAE weights and `sae.use_error_term` are never touched: sae-lens 6 reads use_error_term only when the SAE is
attached, so it is passed to `model.saes(...)`.

ablate_and_test validates a call into an AblationPlan, runs its two spliced batches (AblationBatches) under
device_work into an AblationOutcome, and assembles the AblationResult from that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sae_mcp.engine.controls import (
    check_n_controls,
    control_stats,
    few_controls_caution,
    kl,
    matched_controls,
    pool_size,
    rounded_effects,
)
from sae_mcp.engine.logits import answer_token_ids, next_token_table
from sae_mcp.engine.runtime import Engine, resolve_positions
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.results import rounded
from sae_mcp.results.causal import (
    AblatedFeature,
    AblationResult,
    ControlRun,
    Controls,
    NextTokenTable,
    ReconstructionTable,
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
    answer_ids: list[int]
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
    act_sum: torch.Tensor  # [d_sae]: how much each feature fires where we ablate
    act_max: torch.Tensor  # [d_sae]
    fired: torch.Tensor  # [d_sae] bool: nonzero at some ablated position
    control_sets: list[list[int]]
    control_note: str | None  # why fewer control sets than asked, when so
    logits: AblationLogits


def _run(engine: Engine, prompt: str, plan: AblationPlan) -> AblationOutcome:
    """The device work: the plain forward, the SAE's activations, then the two spliced batches. Inside device_work."""
    s = plan.sae
    tokens = engine.to_tokens(prompt, prepend_bos=s.prepend_bos)  # [1, S]
    positions = resolve_positions(plan.position, tokens.shape[1])
    with torch.inference_mode():
        base = engine.model(tokens, return_type="logits")[0, -1]  # [V]
        acts = engine.encode(s, engine.forward_to_hook(tokens, s))[0].float()  # [S, d_sae]
        act_sum = acts[positions].sum(0)  # [d_sae]: how much each feature fires where we ablate
        act_max = acts[positions].max(0).values  # [d_sae]
        fired = (acts[positions] != 0).any(0)  # [d_sae]
        control_sets, note = [], None
        if plan.controls:
            control_sets, note = matched_controls(act_sum, plan.features, plan.n_controls, plan.seed, act_sum > 0)
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
        tokens=engine.str_tokens(tokens), positions=positions, act_sum=act_sum, act_max=act_max, fired=fired,
        control_sets=control_sets, control_note=note, logits=logits,
    )


# ---------------------------------------------------------------------------------------------------------------
# ablate_and_test: the result


def _changes(logits: torch.Tensor, ref: torch.Tensor, answer_id: int) -> tuple[float, float, float]:
    """(P(answer) change, answer logit change, KL(ref || this)), unrounded."""
    lp_r, lp = ref.float().log_softmax(-1), logits.float().log_softmax(-1)  # [V] each
    a = answer_id
    return float(lp[a].exp() - lp_r[a].exp()), float(logits[a] - ref[a]), float(kl(ref, logits))


def _effects(logits: torch.Tensor, baseline: torch.Tensor, answer_id: int) -> dict[str, float]:
    dp, dl, k = _changes(logits, baseline, answer_id)
    return {"answer_logit_change": dl, "answer_probability_change": dp, "kl_next_token": k}


def _summary(lg: AblationLogits, answer_id: int) -> str:
    """One line: the ablation's causal effect, its effect without the error term, and the SAE's own distortion."""
    dp_rec, dl_rec, kl_rec = _changes(lg.ablated_without_error_term, lg.reconstruction, answer_id)  # the ablation alone
    dp_abl, dl_abl, kl_abl = _changes(lg.ablated, lg.baseline, answer_id)  # the ablation's causal effect
    dp_sae, _, kl_sae = _changes(lg.reconstruction, lg.baseline, answer_id)  # the SAE's own distortion
    return (
        f"causal effect of the ablation (ablated vs baseline, with the error term): P(answer) {dp_abl:+.4g}, "
        f"logit {dl_abl:+.4g}, KL {kl_abl:.4g}; without the error term (vs reconstruction_only): P(answer) "
        f"{dp_rec:+.4g}, logit {dl_rec:+.4g}, KL {kl_rec:.4g}; the SAE's own distortion (reconstruction_only "
        f"vs baseline): KL {kl_sae:.4g}, P(answer) {dp_sae:+.4g}"
    )


def _silent_note(silent: list[int], features: list[int]) -> str | None:
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
    lg, a = out.logits, plan.answer_ids[0]
    runs = [
        ControlRun(features=cs, effects=rounded_effects(_effects(logits, lg.baseline, a)))
        for cs, logits in zip(out.control_sets, lg.controls)
    ]
    note = out.control_note
    if not runs and note is None:
        note = "no control could be drawn"
    if len(silent) == len(plan.features):
        why = "the target features do not fire at these positions: ablating them changes nothing"
        note = f"{note}; {why}" if note else why
    return Controls(
        matched_on=f"summed activation at the ablated positions (nearest {pool_size(plan.n_controls)} "
        "firing features, drawn by seed); ablated with the error term",
        seed=plan.seed,
        runs=runs,
        stats=control_stats(_effects(lg.ablated, lg.baseline, a), runs),
        note=note,
        caution=few_controls_caution(len(runs)),
    )


def _assemble(engine: Engine, plan: AblationPlan, out: AblationOutcome) -> AblationResult:
    lg, answer_ids, top_k = out.logits, plan.answer_ids, plan.top_k
    base_top, base_ans = next_token_table(engine, lg.baseline, top_k, answer_ids)

    def table(logits: torch.Tensor) -> NextTokenTable:  # logits [V] -> its table, with its changes from baseline
        top, ans = next_token_table(engine, logits, top_k, answer_ids)
        return NextTokenTable(
            top=top,
            answer=ans,
            answer_probability_change=rounded(ans.probability - base_ans.probability, 6),
            answer_logit_change=rounded(ans.logit - base_ans.logit),
            kl_from_baseline=rounded(float(kl(lg.baseline, logits)), 6),
        )

    # the ablation alone, SAE spliced without the error term
    dp_rec, dl_rec, kl_rec = _changes(lg.ablated_without_error_term, lg.reconstruction, answer_ids[0])
    silent = [f for f in plan.features if not bool(out.fired[f])]
    features = [
        AblatedFeature(
            feature=f, fired=bool(out.fired[f]), activation_sum=rounded(float(out.act_sum[f])),
            max_activation=rounded(float(out.act_max[f])),
        )
        for f in plan.features
    ]
    return AblationResult(
        sae=plan.sae.key,
        hook_name=plan.sae.hook_name,
        tokens=out.tokens,
        positions=out.positions,
        features=features,
        baseline=NextTokenTable(
            top=base_top, answer=base_ans, answer_probability_change=0.0, answer_logit_change=0.0,
            kl_from_baseline=0.0,
        ),
        reconstruction_only=table(lg.reconstruction),
        ablated=table(lg.ablated),
        ablated_without_error_term=ReconstructionTable(
            **table(lg.ablated_without_error_term).model_dump(),
            answer_probability_change_vs_reconstruction=rounded(dp_rec, 6),
            answer_logit_change_vs_reconstruction=rounded(dl_rec),
            kl_from_reconstruction=rounded(kl_rec, 6),
        ),
        summary=_summary(lg, answer_ids[0]),
        note=_silent_note(silent, plan.features),
        controls=_ablation_controls(plan, out, silent) if plan.controls else None,
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
) -> AblationResult:
    """Zero `features` at `position` (None = all) with the SAE spliced in; next-token tables for the plain model,
    the reconstruction alone, the ablation with the error term and the ablation without it."""
    s = engine.sae(sae)
    feats = engine.check_features(s, features, engine.limits.max_features_per_call, required=True, unique=True)
    answer_ids = answer_token_ids(engine, answer)
    check_n_controls(controls, n_controls)
    plan = AblationPlan(
        sae=s, features=feats, answer_ids=answer_ids, position=position, top_k=top_k, controls=controls,
        n_controls=n_controls, seed=seed,
    )
    with engine.device_work():
        outcome = _run(engine, prompt, plan)
    return _assemble(engine, plan, outcome)
