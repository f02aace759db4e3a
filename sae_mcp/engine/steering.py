"""Steering: add `coefficient * W_dec[f]` at an SAE's hook and generate, unsteered and steered side by side.

The vector is added at the SAE's hook at every position, prompt and generated, through a plain model hook (no SAE
spliced); generation is our own loop over the KV cache (generation.py), so seed, temperature and top_p are exact.
All runs (unsteered, each dose, each control at each control dose) go as rows of one batch (SteerRows), once per
seed, each row with its own generator seeded with its seed, so the rows of one seed differ only by their steering
and a seed's texts are those a one-seed call gives. Then every continuation is read back through the unsteered model
and the SAE (steering_readout.py: is the concept in the text?), and checked for repetition loops and word salad
(its per-token loss under the unsteered model). With an answer, each dose is scored on the metric (engine/metric.py)
at the prompt's next-token position.

Hygiene: the steering hook lives inside `model.hooks(fwd_hooks=...)`, entered inside `Engine.device_work()` once per
generated step (generation.py: calls queued meanwhile take the device between steps and see the plain model), whose
finally detaches anything left anyway; the readout runs after it, in its own device turn, on the plain model; SAE
weights are never touched.

steer_generate takes the call as one SteeringRequest, validates it into a SteerPlan (steering_plan.py), runs it
under device_work into a SteerOutcome (here), and assembles the SteerResult from that (steering_result.py).
"""

from __future__ import annotations

import torch

from sae_mcp.engine.controls import matched_controls
from sae_mcp.engine.generation import ProgressFn, PromptStats, RowBatch, generate_rows, generated_ids
from sae_mcp.engine.logits import answer_variant_warning
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.steering_plan import (
    KnownMaxFn,
    MaxActivationFn,
    SteeringRequest,
    SteerOutcome,
    SteerPlan,
    SteerRows,
    plan_call,
)
from sae_mcp.engine.steering_readout import concept_readout, continuation_losses
from sae_mcp.engine.steering_result import assemble
from sae_mcp.errors import InvalidInput
from sae_mcp.results.causal import SteerResult


def _steering_vectors(
    rows: SteerRows, W_dec: torch.Tensor, features: list[int], coefficients: list[float]
) -> torch.Tensor:
    """One vector per run [n_runs, d_in]: zero (unsteered), scale * sum_f c_f W_dec[f] per dose, and per control
    dose, per control set, the same coefficients on its features at that dose."""
    coef = torch.tensor(coefficients, device=W_dec.device, dtype=W_dec.dtype)  # [n_feats]

    def direction(feats: list[int]) -> torch.Tensor:  # [d_in]
        return coef @ W_dec[torch.tensor(feats, device=W_dec.device)]

    target = direction(features)  # [d_in]: the scale-1 steering vector
    vectors = [torch.zeros_like(target)] + [x * target for x in rows.scales]
    vectors += [x * direction(cs) for x in rows.control_scales for cs in rows.control_sets]  # order of control_row
    return torch.stack(vectors)  # [n_runs, d_in]


def _rows(plan: SteerPlan, norms: torch.Tensor) -> tuple[SteerRows, str | None]:
    """The runs: controls drawn once by the first seed (the same control features at every dose, so the doses'
    blocks differ only by the dose), matched in decoder norm."""
    control_sets: list[list[int]] = []
    note = None
    if plan.controls:
        eligible = torch.ones(plan.sae.d_sae, dtype=torch.bool)  # [d_sae]
        control_sets, note = matched_controls(norms, plan.features, plan.n_controls, plan.sampling.seeds[0], eligible)
    return SteerRows(plan.scales, plan.control_scales, control_sets, len(plan.sampling.seeds)), note


def _generate(
    engine: Engine, tokens: torch.Tensor, plan: SteerPlan, rows: SteerRows, vectors: torch.Tensor, use_cache: bool,
    cancel: CancelToken | None, progress: ProgressFn | None,
) -> tuple[torch.Tensor, PromptStats, list[bool]]:
    """All runs x seeds as one batch, seed-major (SteerRows.batch_row). The prompt statistics come from the first
    seed's rows only: the prompt's forward does not depend on the seed."""
    sampling, layout = plan.sampling, rows.batch_layout()
    batch = RowBatch(
        tokens=tokens, hook_name=plan.sae.hook_name,
        vectors=vectors[torch.tensor([run for run, _ in layout], device=vectors.device)],  # [n_seeds * n_runs, d_in]
        seeds=tuple(sampling.seeds[k] for _, k in layout),  # [n_seeds * n_runs]
        decoding=sampling.decoding, metric=plan.metric, stats_rows=rows.n_runs,
    )
    return generate_rows(engine, batch, use_cache, cancel, progress)


def _run(
    engine: Engine, prompt: str, plan: SteerPlan, use_cache: bool, cancel: CancelToken | None,
    progress: ProgressFn | None,
) -> SteerOutcome:
    """Tokens, controls, one steering vector per run (weights only), one batched generation (a device turn per
    step), one device turn for the readout and the losses."""
    s, sampling = plan.sae, plan.sampling
    tokens = engine.to_tokens(prompt, prepend_bos=s.prepend_bos)  # [1, S]
    if tokens.shape[1] + sampling.max_new_tokens > engine.model.cfg.n_ctx:
        raise InvalidInput(
            f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's "
            f"context of {engine.model.cfg.n_ctx}; shorten one"
        )
    norms = s.sae.W_dec.norm(dim=-1)  # [d_sae]
    rows, note = _rows(plan, norms)
    vectors = _steering_vectors(rows, s.sae.W_dec, plan.features, plan.coefficients)  # [n_runs, d_in]
    new, stats, stopped = _generate(engine, tokens, plan, rows, vectors, use_cache, cancel, progress)  # new [B, T]
    if cancel is not None:
        cancel.check()  # cancelled during the last step: skip the readout
    eos = engine.tokenizer.eos_token_id
    lengths = [len(generated_ids(row, eos)) for row in new]  # per batch row, before EOS
    with engine.device_work():  # the plain model: no hook attached
        readouts = concept_readout(engine, s, tokens, new, lengths, plan.features)
        losses, entropies = continuation_losses(engine, tokens, new, lengths)
    variant = None
    if plan.answer is not None and plan.answer_ids:
        variant = answer_variant_warning(engine, stats.last_logits[SteerRows.UNSTEERED], plan.answer, plan.answer_ids)
    return SteerOutcome(
        rows=rows, new_tokens=new.cpu(), stopped_at_eos=stopped, stats=stats, readouts=readouts, losses=losses,
        entropies=entropies, control_note=note,
        decoder_norms=[float(norms[f]) for f in plan.features], prompt_tokens=engine.str_tokens(tokens),
        answer_tokens=engine.str_tokens(torch.tensor(plan.answer_ids)) if plan.answer_ids else None,
        answer_warning=variant,
    )


def steer_generate(
    engine: Engine,
    request: SteeringRequest,
    max_activation_fn: MaxActivationFn | None = None,
    known_max_fn: KnownMaxFn | None = None,
    use_cache: bool = True,
    cancel: CancelToken | None = None,
    progress: ProgressFn | None = None,
) -> SteerResult:
    """Generate unsteered and steered continuations side by side, as `request` asks (SteeringRequest: coefficient
    = strength * max_activation(feature) under 'max_activation', the strength under 'absolute'; every run once per
    seed; controls at every nonzero dose or at the one dose asked for; with an answer each dose scored on the
    metric). `max_activation_fn` calibrates; `known_max_fn` gives a feature's max activation when one is already
    known, for the warning on coefficients far above it. All rows are generated as one batch (at most MAX_BATCH_ROWS
    runs x seeds), with transformer-lens' KV cache unless `use_cache` is False: `cancel` stops it between steps
    (Cancelled), `progress(step, max_new_tokens)` follows it."""
    plan = plan_call(engine, request, max_activation_fn, known_max_fn)
    outcome = _run(engine, request.prompt, plan, use_cache, cancel, progress)  # takes the device step by step
    return assemble(engine, plan, outcome)
