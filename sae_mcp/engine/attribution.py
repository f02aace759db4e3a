"""Gradient x activation attribution of SAE features and SAE error nodes, several SAEs in one backward pass.

metric = logit[answer] - logit[counterfactual] at `position`, or log P(answer) without a counterfactual (the one
metric of every causal tool: engine/metric.py; the first token of each is scored, and the result says when there
are more: answer_tokens, multi_token). An attribution estimates a node's contribution, metric - metric with the
node zeroed: positive = it raises the metric. Every SAE is spliced in WITH the error term, so the forward pass
gives the plain model's logits; one SaeCapture per SAE (engine/attribution_hooks.py) keeps its activations and its
error as leaves that require grad, the error with an identity path to x, so each SAE's attributions are the same
alone or together (that module says why). Model parameters keep requires_grad=False (the Engine turns it off).

Error share, honestly: at position p the first-order contribution of the error to the metric is g_p . e_p, that
of the reconstruction g_p . x_hat_p (g_p = gradient at the hook). The share is

    sum_p |g_p . e_p| / (sum_p |g_p . e_p| + sum_p |g_p . x_hat_p|)   over p = 1 .. metric position

absolute per position, so contributions of opposite sign at different positions cannot cancel into a small
share, and without BOS (position 0 when the SAE prepends it: its large norms would dominate, and an SAE is not
meant to reconstruct it); later positions have zero gradient. The per-position g_p . e_p is reported too
(error_attribution_per_token), to show where the SAE fails. error_attribution / reconstruction_attribution stay
the signed totals over all positions (BOS included), so features + g.b_dec + error = g.x holds exactly. A ratio
of gradient norms would be useless here: both nodes receive the same gradient g, so such a ratio is always 0.5.

Checks (attribution_checks.py), because first-order attribution is silent about its own failure: with `verify`
(default on) every returned entry gets its exact contribution (the feature zeroed at its position, one batch row
each) and a warning names those far from their attribution.

method="integrated_gradients" computes every number under integrated gradients instead: the feature attributions
(top, per_token, totals) along the features' path (errors held), the error's (error_attribution, per token) along
the error's path (features held), and the error share from those; each path is checked against its endpoint
difference. The reconstruction's part is then its features' (b_dec is on both ends of the features' path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_mcp.engine import attribution_checks as checks
from sae_mcp.engine.attribution_checks import CleanSae, MetricAt
from sae_mcp.engine.attribution_hooks import SaeCapture
from sae_mcp.engine.logits import answer_token_ids, answer_variant_warning
from sae_mcp.engine.metric import Metric, metric_for
from sae_mcp.engine.runtime import CancelToken, Engine, context_warning, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.causal import Attribution, AttributionEntry, IntegratedGradientsCheck


class Candidate(NamedTuple):
    """One (position, feature) of an SAE's top_k, before the top across SAEs is taken."""

    magnitude: float  # |attribution|: the sort key
    sae: str
    position: int
    feature: int
    activation: float
    attribution: float


@dataclass(frozen=True)
class SaeAttribution:
    """One SAE's numbers, rounded as served."""

    per_token: list[float]  # sum of feature attributions at each position
    error_per_token: list[float]  # g_p . e_p
    error_total: float  # signed totals over all positions, BOS included
    reconstruction_total: float
    error_share: float  # over error_share_positions
    feature_total: float  # sum of all its feature attributions
    candidates: list[Candidate]


@dataclass(frozen=True)
class AttributionPlan:
    """A validated attribute call."""

    saes: list[LoadedSAE]  # one per hook, by layer
    answer: str
    answer_ids: list[int]
    counterfactual_ids: list[int] | None
    metric: Metric
    prepend_bos: bool
    top_k: int
    position: int  # as given; resolved against the prompt's length under device_work
    method: str  # one of checks.METHODS
    steps: int  # integrated gradients only
    verify: bool  # the exact contribution of every returned entry


@dataclass(frozen=True)
class AttributionOutcome:
    """What the device work gives back."""

    tokens: list[str]
    position: int  # the metric's position, non-negative
    share_start: int  # the error share is taken over share_start..position
    metric_value: float
    last_logits: torch.Tensor  # [V] at the metric's position, the plain model's (error term on)
    per_sae: list[SaeAttribution]  # in the order of plan.saes
    top: list[Candidate]  # across SAEs, by |attribution|
    exact: list[float]  # exact contributions of top (empty without verify)
    ig: IntegratedGradientsCheck | None


# ---------------------------------------------------------------------------------------------------------------
# Validation


def resolve_saes(engine: Engine, sae: str | None, saes: Sequence[str] | None) -> list[LoadedSAE]:
    if sae and saes:
        raise InvalidInput("pass sae= (one SAE) or saes= (several), not both")
    if saes:
        out = [engine.sae(k) for k in saes]
        if len({s.hook_name for s in out}) != len(out):
            raise InvalidInput(f"saes {list(saes)} name two SAEs at one hook; one SAE per hook can be spliced at once")
        return sorted(out, key=lambda s: s.layer)
    if sae:
        return [engine.sae(sae)]
    if not engine.saes:
        engine.sae(None)  # raises the 'no SAE loaded' error
    by_hook: dict[str, LoadedSAE] = {}
    for s in engine.saes.values():
        by_hook.setdefault(s.hook_name, s)
    return sorted(by_hook.values(), key=lambda s: s.layer)


def _check_options(method: str, steps: int, top_k: int, limit: int) -> None:
    if method not in checks.METHODS:
        raise InvalidInput(f"method {method!r} is unknown; pass method='gradient' (one backward pass) or "
                           "method='integrated_gradients' (with steps)")
    if not 1 <= steps <= checks.MAX_STEPS:
        raise InvalidInput(f"steps={steps} is out of range; pass 1..{checks.MAX_STEPS} (8 is usually enough)")
    if not 1 <= top_k <= limit:
        raise InvalidInput(f"top_k={top_k} is out of range; pass 1..{limit}")


def _plan(
    engine: Engine, answer: str, counterfactual: str | None, sae: str | None, saes: Sequence[str] | None,
    top_k: int, position: int, method: str, steps: int, verify: bool,
) -> AttributionPlan:
    _check_options(method, steps, top_k, engine.limits.max_top_k)
    loaded = resolve_saes(engine, sae, saes)
    a_ids = answer_token_ids(engine, answer)
    c_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    metric = metric_for(engine, a_ids, c_ids, answer, counterfactual)
    bos = {s.prepend_bos for s in loaded}
    if len(bos) > 1:
        raise InvalidInput("these SAEs disagree on prepending BOS; attribute them one at a time (sae=...)")
    return AttributionPlan(
        saes=loaded, answer=answer, answer_ids=a_ids, counterfactual_ids=c_ids, metric=metric,
        prepend_bos=bos.pop(), top_k=top_k, position=position, method=method, steps=steps, verify=bool(verify),
    )


# ---------------------------------------------------------------------------------------------------------------
# The device work: one forward, one backward, then each SAE's numbers


def backward_pass(
    engine: Engine, captured: list[SaeCapture], tokens: torch.Tensor, at: MetricAt
) -> tuple[float, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every SAE spliced with the error term; the metric differentiated to every SAE's leaves at once. Returns
    (the metric, the logits at its position [V], per SAE (d metric / d acts, d metric / d err), zeros where no
    gradient arrives)."""
    model = engine.model
    fwd_hooks = [hook for c in captured for hook in c.fwd_hooks()]
    with torch.enable_grad():
        with model.saes(saes=[c.sae.sae for c in captured], use_error_term=True):
            with model.hooks(fwd_hooks=fwd_hooks):
                logits = model(tokens, return_type="logits")  # [1, S, V]
                metric = at.of(logits)[0]
                leaves = [leaf for c in captured for leaf in (c.acts, c.err)]
                grads = torch.autograd.grad(metric, leaves, allow_unused=True)
    pairs = []
    for i, c in enumerate(captured):
        g_acts = grads[2 * i] if grads[2 * i] is not None else torch.zeros_like(c.acts)
        g_err = grads[2 * i + 1] if grads[2 * i + 1] is not None else torch.zeros_like(c.err)
        pairs.append((g_acts, g_err))
    return float(metric.detach()), logits.detach()[0, at.position], pairs


def _top_candidates(sae: LoadedSAE, acts: torch.Tensor, attr: torch.Tensor, top_k: int) -> list[Candidate]:
    """acts, attr [S, d_sae] -> the SAE's top_k (position, feature) by |attribution|, nonzero ones only."""
    k = min(top_k, attr.numel())
    vals, flat = attr.flatten().abs().topk(k)  # [k] each
    out = []
    for v, j in zip(vals.tolist(), flat.tolist()):
        p, f = divmod(j, sae.d_sae)
        if v > 0:
            out.append(Candidate(v, sae.key, p, f, float(acts[p, f]), float(attr[p, f])))
    return out


def _share(err_p: torch.Tensor, rec_p: torch.Tensor, share_start: int, pos: int) -> float:
    """sum_p |err_p| / (sum_p |err_p| + sum_p |rec_p|) over share_start..pos; err_p, rec_p [S]."""
    num = float(err_p[share_start : pos + 1].abs().sum())
    den = num + float(rec_p[share_start : pos + 1].abs().sum())
    return rounded(num / den, 4) if den > 0 else 0.0


def _sae_attribution(
    c: SaeCapture, attr: torch.Tensor, err_p: torch.Tensor, rec_p: torch.Tensor, share_start: int, pos: int,
    top_k: int,
) -> SaeAttribution:
    """One SAE's numbers from its feature attributions attr [S, d_sae], its error's attribution per position err_p
    [S] and its reconstruction's rec_p [S] (all of the method that ran): totals and the error share."""
    acts = c.acts.detach()[0].float()  # [S, d_sae]
    attr = attr.float()  # [S, d_sae]
    return SaeAttribution(
        per_token=[rounded(v, 6) for v in attr.sum(-1).tolist()],
        error_per_token=[rounded(v, 6) for v in err_p.tolist()],
        error_total=rounded(float(err_p.sum()), 6),
        reconstruction_total=rounded(float(rec_p.sum()), 6),
        error_share=_share(err_p, rec_p, share_start, pos),
        feature_total=rounded(float(attr.sum()), 6),
        candidates=_top_candidates(c.sae, acts, attr, top_k),
    )


def _gradient_parts(c: SaeCapture, g_acts: torch.Tensor, g_err: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient x activation: (feature attributions [S, d_sae], g_p . e_p [S], g_p . x_hat_p [S]) for one SAE."""
    S = c.acts.shape[1]
    g = g_err[0].float().reshape(S, -1)  # [S, d_in]: the gradient at the hook's output
    e = c.err.detach()[0].float().reshape(S, -1)  # [S, d_in]
    x_hat = c.out[0].float().reshape(S, -1) - e  # [S, d_in]: the reconstruction (b_dec included)
    return c.acts.detach()[0].float() * g_acts[0].float(), (g * e).sum(-1), (g * x_hat).sum(-1)


def _method_parts(
    engine: Engine, plan: AttributionPlan, captured: list[SaeCapture], grads: list[tuple[torch.Tensor, torch.Tensor]],
    tokens: torch.Tensor, at: MetricAt, metric: float,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], IntegratedGradientsCheck | None]:
    """Per SAE, under the method that ran: (feature attributions [S, d_sae], error per position [S], reconstruction
    per position [S]); with integrated gradients also its completeness check."""
    if plan.method == "gradient":
        return [_gradient_parts(c, ga, ge) for c, (ga, ge) in zip(captured, grads)], None
    clean = [CleanSae(c.sae, c.acts.detach(), c.err.detach(), c.x.detach()) for c in captured]
    paths, ends = checks.integrated_gradients(engine, clean, tokens, at, plan.steps)
    parts = [(p.features, p.error_per_token, p.features.sum(-1)) for p in paths]
    feature_sum = sum(float(p.features.sum()) for p in paths)
    error_sum = sum(float(p.error_per_token.sum()) for p in paths)
    return parts, checks.ig_check(plan.steps, feature_sum, error_sum, ends, metric)


def _run(engine: Engine, prompt: str, plan: AttributionPlan, cancel: CancelToken | None) -> AttributionOutcome:
    """Tokens, the metric's position, the backward pass, each SAE's numbers, every returned entry's exact
    contribution: one device turn for the backward pass, then one per integrated-gradients chunk and per chunk of
    exact contributions (calls queued meanwhile run between them; the captured tensors are this call's alone)."""
    tokens = engine.to_tokens(prompt, prepend_bos=plan.prepend_bos)  # [1, S]
    pos = position_index(plan.position, tokens.shape[1])
    # positions the error share is taken over: 1..pos without BOS (0..pos without a BOS, or when pos is BOS)
    share_start = 1 if plan.prepend_bos and pos >= 1 else 0
    at = MetricAt(plan.metric, pos)
    captured = [SaeCapture(s) for s in plan.saes]
    with engine.device_work():
        metric_value, last_logits, grads = backward_pass(engine, captured, tokens, at)
    parts, ig = _method_parts(engine, plan, captured, grads, tokens, at, metric_value)
    per_sae = [_sae_attribution(c, a, e, r, share_start, pos, plan.top_k) for c, (a, e, r) in zip(captured, parts)]
    top = sorted((c for sae in per_sae for c in sae.candidates), key=lambda c: -c.magnitude)[: plan.top_k]
    cells = [checks.Cell(c.sae, c.position, c.feature) for c in top] if plan.verify else []
    exact = checks.exact_contributions(engine, plan.saes, tokens, at, cells, cancel.check if cancel else None)
    return AttributionOutcome(
        tokens=engine.str_tokens(tokens), position=pos, share_start=share_start, metric_value=metric_value,
        last_logits=last_logits, per_sae=per_sae, top=top, exact=exact, ig=ig,
    )


# ---------------------------------------------------------------------------------------------------------------
# The result


def _entries(out: AttributionOutcome) -> list[AttributionEntry]:
    """The top entries, each with its exact contribution when verified."""
    exact = out.exact + [None] * (len(out.top) - len(out.exact))
    return [
        AttributionEntry(
            sae=c.sae, position=c.position, token=out.tokens[c.position], feature=c.feature,
            activation=rounded(c.activation), attribution=rounded(c.attribution, 6),
            exact_contribution=rounded(x, 6) if x is not None else None,
        )
        for c, x in zip(out.top, exact)
    ]


def _warnings(
    engine: Engine, plan: AttributionPlan, out: AttributionOutcome, top: list[AttributionEntry]
) -> list[str] | None:
    # No warning on the totals against the metric: first order around a zeroed stream, they are far from the
    # metric on nearly every real prompt (3 of 3 measured on stories260K), and a warning that always fires teaches
    # the agent to skip warnings. They are reported; the per-entry exact_contribution check is the actionable guard.
    return collect_warnings(
        answer_variant_warning(engine, out.last_logits, plan.answer, plan.answer_ids),
        *(context_warning(s, len(out.tokens)) for s in plan.saes),
        checks.linearity_warning(top, out.metric_value, plan.method, one_sae=len(plan.saes) == 1),
        checks.completeness_warning(out.ig),
    )


def _assemble(engine: Engine, plan: AttributionPlan, out: AttributionOutcome) -> Attribution:
    a_ids, c_ids = plan.answer_ids, plan.counterfactual_ids
    top = _entries(out)
    by_key = {s.key: a for s, a in zip(plan.saes, out.per_sae)}
    return Attribution(
        metric=f"{plan.metric.name} at position {out.position}",
        metric_kind=plan.metric.kind,
        answer_tokens=engine.str_tokens(torch.tensor(a_ids)),
        multi_token=len(a_ids) > 1,
        counterfactual_tokens=engine.str_tokens(torch.tensor(c_ids)) if c_ids else None,
        counterfactual_multi_token=len(c_ids) > 1 if c_ids else None,
        metric_value=rounded(out.metric_value, 6),
        position=out.position,
        tokens=out.tokens,
        top=top,
        per_token={k: a.per_token for k, a in by_key.items()},
        error_attribution={k: a.error_total for k, a in by_key.items()},
        error_attribution_per_token={k: a.error_per_token for k, a in by_key.items()},
        reconstruction_attribution={k: a.reconstruction_total for k, a in by_key.items()},
        error_share={k: a.error_share for k, a in by_key.items()},
        error_share_positions=[out.share_start, out.position],
        method=plan.method,
        feature_attribution_total={k: a.feature_total for k, a in by_key.items()},
        attribution_total=rounded(sum(a.feature_total + a.error_total for a in out.per_sae), 6),
        integrated_gradients=out.ig,
        warnings=_warnings(engine, plan, out, top),
    )


def attribute(
    engine: Engine,
    prompt: str,
    answer: str,
    counterfactual: str | None = None,
    sae: str | None = None,
    saes: Sequence[str] | None = None,
    top_k: int = 20,
    position: int = -1,
    method: str = "gradient",
    steps: int = 8,
    verify: bool = True,
    cancel: CancelToken | None = None,
) -> Attribution:
    """Gradient x activation (or integrated gradients, method="integrated_gradients" with `steps`) of every SAE
    feature, and each SAE's error, on the metric (logit difference with a counterfactual, else log P(answer));
    with `verify`, every returned entry's exact contribution beside its attribution. A multi-token answer or
    counterfactual is scored on its first token only (answer_tokens / multi_token say so)."""
    plan = _plan(engine, answer, counterfactual, sae, saes, top_k, position, method, steps, verify)
    outcome = _run(engine, prompt, plan, cancel)  # takes the device turn by turn
    return _assemble(engine, plan, outcome)
