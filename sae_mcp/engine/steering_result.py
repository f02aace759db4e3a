"""steer_generate's result, assembled from the plan and the device work's outcome (no device work here).

Per run and seed a Continuation (its text, whether it changed from the same seed's unsteered text, the concept
readout, repetition, loss ratio); per run the prompt effects once (KL, P(answer) and the metric come from the first
forward, so they do not depend on the seed) and the seed-dependent readings averaged over seeds; per control dose one
Controls block against the targets' run at that dose, significance stated on the metric, KL and the concept readout
only; warnings that say what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_mcp.engine.controls import control_stats, few_controls_caution, pool_size, rounded_effects
from sae_mcp.engine.generation import PromptStats, continuation, first_divergence, generated_ids
from sae_mcp.engine.runtime import Engine, context_warning
from sae_mcp.engine.steering_plan import FAR_ABOVE_MAX, SteerOutcome, SteerPlan, SteerRows, far_above_max
from sae_mcp.engine.steering_readout import is_degenerate, loss_ratio, mean_change, mean_std, repetition
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.causal import Continuation, ControlRun, Controls, SteerFeature, SteerResult, SteerRun

UNSTEERED = SteerRows.UNSTEERED
# A run is called degenerate when at least this share of its seeds loop: with one seed, that seed.
DEGENERATE_RUN_SHARE = 0.5
# What z and "exceeds every control" are stated on: the metric, KL, and steering's own readout of the text.
SIGNIFICANCE = ("metric_change", "kl_next_token", "concept_readout_change")


@dataclass(frozen=True)
class _RowText:
    """One batch row, read: its generated ids (before EOS), its text, its concept readout (unrounded)."""

    ids: list[int]
    cont: Continuation
    readout: list[float] | None
    loss: float | None  # mean per-token loss under the unsteered model
    entropy: float | None  # mean entropy of the unsteered model along it


@dataclass(frozen=True)
class _SeedRun:
    """One run over the seeds: a Continuation per seed, and what varies by seed, aggregated."""

    conts: list[Continuation]
    readout_mean: list[float] | None  # per feature, over the seeds that generated something
    readout_std: list[float] | None  # sample std (n - 1), 2 seeds or more
    readout_change: float | None  # mean over seeds and features of (this run - unsteered, same seed)
    changed_fraction: float
    degenerate_fraction: float


def _rounded_list(xs: list[float] | None) -> list[float] | None:
    return [rounded(x, 6) for x in xs] if xs is not None else None


def _row_texts(engine: Engine, out: SteerOutcome) -> list[_RowText]:
    eos = engine.tokenizer.eos_token_id
    new = out.new_tokens  # [B, T]
    return [
        _RowText(generated_ids(new[b], eos), continuation(engine, new[b], eos, out.stopped_at_eos[b]), out.readouts[b],
                 out.losses[b], out.entropies[b])
        for b in range(new.shape[0])
    ]


def _seed_continuation(rows: SteerRows, texts: list[_RowText], run: int, k: int, seed: int) -> Continuation:
    """Run `run` under the k-th seed, next to the unsteered run of the same seed."""
    t, u = texts[rows.batch_row(run, k)], texts[rows.batch_row(UNSTEERED, k)]
    steered = run != UNSTEERED
    rep = repetition(t.ids)
    ratio = loss_ratio(t.loss, u.entropy)
    return t.cont.model_copy(update=dict(
        seed=seed,
        changed=t.cont.text != u.cont.text if steered else None,
        first_divergent_token=first_divergence(u.ids, t.ids) if steered else None,
        concept_readout=_rounded_list(t.readout),
        repetition=rounded(rep, 4) if rep is not None else None,
        loss_ratio=rounded(ratio, 4) if ratio is not None else None,
        degenerate=is_degenerate(t.ids, ratio) if rep is not None else None,
    ))


def _seed_run(rows: SteerRows, texts: list[_RowText], seeds: list[int], run: int) -> _SeedRun:
    conts = [_seed_continuation(rows, texts, run, k, sd) for k, sd in enumerate(seeds)]
    readouts = [texts[rows.batch_row(run, k)].readout for k in range(len(seeds))]
    base = [texts[rows.batch_row(UNSTEERED, k)].readout for k in range(len(seeds))]
    mean, std = mean_std(readouts)
    n = len(seeds)
    return _SeedRun(
        conts=conts, readout_mean=mean, readout_std=std, readout_change=mean_change(readouts, base),
        changed_fraction=sum(bool(c.changed) for c in conts) / n,
        degenerate_fraction=sum(bool(c.degenerate) for c in conts) / n,
    )


def _effects(stats: PromptStats, run: int, sr: _SeedRun) -> dict[str, float | None]:
    """A run's effect metrics against the unsteered run, unrounded: on the prompt (seed-independent), then from its
    texts (means over seeds). None where a reading is missing (no generated token)."""
    effects: dict[str, float | None] = {"kl_next_token": stats.kl_last[run], "mean_kl_prompt": stats.kl_mean[run]}
    if stats.metric is not None and stats.p_answer is not None:
        effects["metric_change"] = stats.metric[run] - stats.metric[UNSTEERED]
        effects["answer_probability_change"] = stats.p_answer[run] - stats.p_answer[UNSTEERED]
    effects["concept_readout_change"] = sr.readout_change
    effects["changed_fraction"] = sr.changed_fraction
    effects["degenerate_fraction"] = sr.degenerate_fraction
    return effects


def _steer_run(plan: SteerPlan, out: SteerOutcome, i: int, sr: _SeedRun) -> SteerRun:
    """Dose i against the unsteered run."""
    stats, p, m, b, x = out.stats, out.stats.p_answer, out.stats.metric, out.rows.dose_row(i), plan.scales[i]
    return SteerRun(
        scale=x,
        coefficients=[rounded(c * x, 6) for c in plan.coefficients],
        kl_next_token=rounded(stats.kl_last[b], 6),
        mean_kl_prompt=rounded(stats.kl_mean[b], 6),
        metric=rounded(m[b], 6) if m else None,
        metric_change=rounded(m[b] - m[UNSTEERED], 6) if m else None,
        answer_probability=rounded(p[b], 6) if p else None,
        answer_probability_change=rounded(p[b] - p[UNSTEERED], 6) if p else None,
        continuations=sr.conts,
        concept_readout=_rounded_list(sr.readout_mean),
        concept_readout_std=_rounded_list(sr.readout_std),
        changed_fraction=rounded(sr.changed_fraction, 4),
        degenerate_fraction=rounded(sr.degenerate_fraction, 4),
        degenerate=sr.degenerate_fraction >= DEGENERATE_RUN_SHARE,
    )


def _controls_at(plan: SteerPlan, out: SteerOutcome, seed_runs: list[_SeedRun], j: int) -> Controls:
    """The control sets at control dose j, compared with the targets' run at that dose. A metric missing for the
    target or any control (a run that generated nothing) is left out of the comparison."""
    rows = out.rows
    t_row = rows.target_row(j)
    target = _effects(out.stats, t_row, seed_runs[t_row])
    c_rows = [rows.control_row(j, i) for i in range(len(rows.control_sets))]
    effects = [_effects(out.stats, r, seed_runs[r]) for r in c_rows]
    keep = [m for m, v in target.items() if v is not None and all(e[m] is not None for e in effects)]
    runs = [
        ControlRun(features=cs, effects=rounded_effects({m: v for m in keep if (v := e[m]) is not None}),
                   continuations=[c.text for c in seed_runs[r].conts])
        for cs, e, r in zip(rows.control_sets, effects, c_rows)
    ]
    return Controls(
        matched_on=f"features among the {pool_size(plan.n_controls)} nearest their target in decoder norm, drawn by "
        f"seed, same coefficients, at scale {rows.control_scales[j]:g}",
        scale=rows.control_scales[j],
        seed=plan.sampling.seeds[0],
        runs=runs,
        stats=control_stats({m: v for m in keep if m in SIGNIFICANCE and (v := target[m]) is not None}, runs),
        note=out.control_note,
        caution=few_controls_caution(len(runs)),
    )


def _doses(xs: list[float]) -> str:
    return ("dose " if len(xs) == 1 else "doses ") + ", ".join(f"{x:g}" for x in xs)


def _degeneration_warning(runs: list[SteerRun]) -> str | None:
    bad = [r.scale for r in runs if r.degenerate]
    if not bad:
        return None
    good = [r.scale for r in runs if not r.degenerate]
    what = "repetition loops or word salad (loss_ratio)"
    if not good:
        return (f"every dose ({', '.join(f'{x:g}' for x in bad)}) degenerated into {what} in at least half the "
                "seeds, so no text here shows the concept: lower the strengths until a dose reads")
    return (f"{_doses(bad)} degenerated into {what} in at least half the seeds, so that text is no evidence of the "
            f"concept: read {_doses(good)}, which did not")


def _far_above_max_warning(plan: SteerPlan) -> str | None:
    far = far_above_max(plan)
    if not far:
        return None
    named = ", ".join(f"feature {f} at {m:.0f}x" for f, m in far)
    return (f"coefficients far above the feature's max activation ({named}; more than {FAR_ABOVE_MAX:g}x): the "
            "stream is pushed where the model never was, and what it writes there says little about the feature; "
            "use strengths of 1-10x max activation (calibration='max_activation')")


def _unsteered_loop_warning(plan: SteerPlan, unsteered: _SeedRun) -> str | None:
    if unsteered.degenerate_fraction < DEGENERATE_RUN_SHARE:
        return None
    n = len(unsteered.conts)
    k = round(unsteered.degenerate_fraction * n)
    fix = "sample (temperature 1)" if plan.sampling.temperature == 0 else "generate fewer tokens"
    return (f"the unsteered continuation loops too ({k} of {n} seeds), so a loop at a dose is not the steering's "
            f"doing: {fix} before reading the doses")


def _features(plan: SteerPlan, out: SteerOutcome) -> list[SteerFeature]:
    return [
        SteerFeature(
            feature=f, strength=st, max_activation=rounded(m[0], 6) if m else None,
            max_activation_source=m[1] if m else None, decoder_norm=rounded(norm, 6), coefficient=rounded(c, 6),
        )
        for f, st, m, c, norm in zip(plan.features, plan.strengths, plan.maxes, plan.coefficients, out.decoder_norms)
    ]


def assemble(engine: Engine, plan: SteerPlan, out: SteerOutcome) -> SteerResult:
    texts = _row_texts(engine, out)
    seeds, rows, p = list(plan.sampling.seeds), out.rows, out.stats.p_answer
    seed_runs = [_seed_run(rows, texts, seeds, run) for run in range(rows.n_runs)]
    runs = [_steer_run(plan, out, i, seed_runs[rows.dose_row(i)]) for i in range(len(plan.scales))]
    controls = [_controls_at(plan, out, seed_runs, j) for j in range(len(rows.control_scales))]
    longest = len(out.prompt_tokens) + max(t.cont.n_tokens for t in texts)  # prompt + the longest continuation
    return SteerResult(
        sae=plan.sae.key,
        hook_name=plan.sae.hook_name,
        calibration=plan.calibration,
        features=_features(plan, out),
        seeds=seeds,
        temperature=plan.sampling.temperature,
        top_p=plan.sampling.top_p,
        prompt_tokens=out.prompt_tokens,
        unsteered=seed_runs[UNSTEERED].conts,
        unsteered_concept_readout=_rounded_list(seed_runs[UNSTEERED].readout_mean),
        unsteered_answer_probability=rounded(p[UNSTEERED], 6) if p else None,
        metric=plan.metric.name if plan.metric else None,
        unsteered_metric=rounded(out.stats.metric[UNSTEERED], 6) if out.stats.metric else None,
        answer_tokens=out.answer_tokens,
        multi_token=len(plan.answer_ids) > 1 if plan.answer_ids else None,
        steered=runs,
        controls=controls if plan.controls else None,
        warnings=collect_warnings(
            _far_above_max_warning(plan), _degeneration_warning(runs),
            _unsteered_loop_warning(plan, seed_runs[UNSTEERED]), out.answer_warning, context_warning(plan.sae, longest),
        ),
    )
