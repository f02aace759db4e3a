"""Gradient x activation attribution of SAE features and SAE error nodes, several SAEs in one backward pass.

metric = logit[answer] - logit[counterfactual] at `position` (or logit[answer] alone; the first token of each is
scored, and the result says when there are more: answer_tokens, multi_token). Every SAE is spliced in
WITH the error term, so the forward pass gives the plain model's logits. Hooks (inside context managers), one
SaeCapture per SAE:

  <hook>.hook_sae_input      keeps x, the SAE's input (in the autograd graph when an earlier SAE made it so)
  <hook>.hook_sae_acts_post  acts -> a leaf that requires grad: attribution = acts * d metric / d acts
  <hook>.hook_sae_error      err  -> a leaf e plus (x - x.detach()) (exactly 0): d metric / d e is the gradient
                             at the hook, and the gradient reaches x through the identity

Why the identity: sae-lens computes the error under torch.no_grad(), which would leave upstream SAEs a gradient
through this SAE's encoder/decoder only, so an upstream feature's attribution would change with which downstream
SAEs are loaded. With the identity path every node sees the plain model's gradient, and each SAE's attributions
are the same alone or together (tested). Model parameters keep requires_grad=False (the Engine turns it off).

Error share, honestly: at position p the first-order contribution of the error to the metric is g_p . e_p, that
of the reconstruction g_p . x_hat_p (g_p = gradient at the hook). The share is

    sum_p |g_p . e_p| / (sum_p |g_p . e_p| + sum_p |g_p . x_hat_p|)   over p = 1 .. metric position

absolute per position, so contributions of opposite sign at different positions cannot cancel into a small
share, and without BOS (position 0 when the SAE prepends it: its large norms would dominate, and an SAE is not
meant to reconstruct it); later positions have zero gradient. The per-position g_p . e_p is reported too
(error_attribution_per_token), to show where the SAE fails. error_attribution / reconstruction_attribution stay
the signed totals over all positions (BOS included), so features + g.b_dec + error = g.x holds exactly. A ratio
of gradient norms would be useless here: both nodes receive the same gradient g, so such a ratio is always 0.5.

Checks (attribution_checks.py), because first-order attribution is silent about its own failure: the top `verify`
entries get their exact effect (the feature zeroed at its position, one batched forward) and a warning names those
far from their attribution; with method="gradient" each SAE's features + error is compared with the metric (first
order, and only what flows through the hook, so it need not match; a warning says when it is far off).
method="integrated_gradients" replaces the feature attributions (top, per_token, totals) by integrated gradients
along alpha * a with the errors held, checked against its endpoint difference; the error fields stay first order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sae_mcp.engine import attribution_checks as checks
from sae_mcp.engine.attribution_checks import CleanSae, MetricIds
from sae_mcp.engine.logits import answer_token_ids, answer_variant_warning
from sae_mcp.engine.runtime import Engine, context_warning, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.causal import Attribution, AttributionEntry, IntegratedGradientsCheck


class SaeCapture:
    """One SAE's hooks for the attribution pass, and what they capture: x (its input), the activations as a leaf
    that requires grad, the error as a leaf with an identity path to x, and the output."""

    def __init__(self, sae: LoadedSAE):
        self.sae = sae
        self.x: torch.Tensor | None = None  # [1, S, d_in] (flattened at hook_z)
        self.acts: torch.Tensor | None = None  # [1, S, d_sae], a leaf
        self.err: torch.Tensor | None = None  # [1, S, d_in] or [1, S, n_heads, d_head], a leaf
        self.out: torch.Tensor | None = None  # x_hat + err, the value that flows on (detached)

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        h = self.sae.hook_name
        return [
            (f"{h}.hook_sae_input", self._keep_input),
            (f"{h}.hook_sae_acts_post", self._leaf_acts),
            (f"{h}.hook_sae_error", self._leaf_error),
            (f"{h}.hook_sae_output", self._keep_output),
        ]

    def _keep_input(self, x: torch.Tensor, hook) -> torch.Tensor:
        self.x = x
        return x

    def _leaf_acts(self, acts: torch.Tensor, hook) -> torch.Tensor:
        self.acts = acts.detach().requires_grad_(True)
        return self.acts

    def _leaf_error(self, err: torch.Tensor, hook) -> torch.Tensor:
        # called under sae-lens' torch.no_grad(); re-enable to build the identity path to x
        with torch.enable_grad():
            self.err = err.detach().requires_grad_(True)
            x = self.x
            return self.err + (x - x.detach()).reshape(self.err.shape)

    def _keep_output(self, out: torch.Tensor, hook) -> torch.Tensor:
        self.out = out.detach()
        return out


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
    prepend_bos: bool
    top_k: int
    position: int  # as given; resolved against the prompt's length under device_work
    method: str  # one of checks.METHODS
    steps: int  # integrated gradients only
    verify: int  # exact effects of the top `verify` entries


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
    exact: list[float]  # exact effects of top[:plan.verify]
    ig: IntegratedGradientsCheck | None


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _resolve_saes(engine: Engine, sae: str | None, saes: Sequence[str] | None) -> list[LoadedSAE]:
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


def _check_options(method: str, steps: int, verify: int) -> None:
    if method not in checks.METHODS:
        raise InvalidInput(f"method {method!r} is unknown; pass method='gradient' (one backward pass) or "
                           "method='integrated_gradients' (with steps)")
    if not 1 <= steps <= checks.MAX_STEPS:
        raise InvalidInput(f"steps={steps} is out of range; pass 1..{checks.MAX_STEPS} (8 is usually enough)")
    if not 0 <= verify <= checks.MAX_VERIFY:
        raise InvalidInput(f"verify={verify} is out of range; pass 0..{checks.MAX_VERIFY} (0 turns the check off)")


def _plan(
    engine: Engine, answer: str, counterfactual: str | None, sae: str | None, saes: Sequence[str] | None,
    top_k: int, position: int, method: str, steps: int, verify: int,
) -> AttributionPlan:
    _check_options(method, steps, verify)
    loaded = _resolve_saes(engine, sae, saes)
    a_ids = answer_token_ids(engine, answer)
    c_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    if c_ids and c_ids[0] == a_ids[0]:
        raise InvalidInput(
            f"answer {answer!r} and counterfactual {counterfactual!r} start with the same token; the metric would be 0"
        )
    bos = {s.prepend_bos for s in loaded}
    if len(bos) > 1:
        raise InvalidInput("these SAEs disagree on prepending BOS; attribute them one at a time (sae=...)")
    return AttributionPlan(
        saes=loaded, answer=answer, answer_ids=a_ids, counterfactual_ids=c_ids, prepend_bos=bos.pop(), top_k=top_k,
        position=position, method=method, steps=steps, verify=min(verify, top_k),
    )


# ---------------------------------------------------------------------------------------------------------------
# The device work: one forward, one backward, then each SAE's numbers


def _backward(
    engine: Engine, captured: list[SaeCapture], tokens: torch.Tensor, ids: MetricIds
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
                metric = checks.row_metric(logits, ids)[0]
                leaves = [leaf for c in captured for leaf in (c.acts, c.err)]
                grads = torch.autograd.grad(metric, leaves, allow_unused=True)
    pairs = []
    for i, c in enumerate(captured):
        g_acts = grads[2 * i] if grads[2 * i] is not None else torch.zeros_like(c.acts)
        g_err = grads[2 * i + 1] if grads[2 * i + 1] is not None else torch.zeros_like(c.err)
        pairs.append((g_acts, g_err))
    return float(metric.detach()), logits.detach()[0, ids.position], pairs


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


def _sae_attribution(
    c: SaeCapture, attr: torch.Tensor, g_err: torch.Tensor, share_start: int, pos: int, top_k: int
) -> SaeAttribution:
    """One SAE's numbers from its feature attributions attr [S, d_sae] (of the method that ran) and the gradient
    at its error: error attribution per position and in total, and error share."""
    acts = c.acts.detach()[0].float()  # [S, d_sae]
    S = acts.shape[0]
    attr = attr.float()  # [S, d_sae]
    g = g_err[0].float().reshape(S, -1)  # [S, d_in]: the gradient at the hook's output
    e = c.err.detach()[0].float().reshape(S, -1)  # [S, d_in]
    x_hat = c.out[0].float().reshape(S, -1) - e  # [S, d_in]: the reconstruction
    ea_p, ra_p = (g * e).sum(-1), (g * x_hat).sum(-1)  # [S] each: g_p . e_p, g_p . x_hat_p
    num = float(ea_p[share_start : pos + 1].abs().sum())
    den = num + float(ra_p[share_start : pos + 1].abs().sum())
    return SaeAttribution(
        per_token=[rounded(v, 6) for v in attr.sum(-1).tolist()],
        error_per_token=[rounded(v, 6) for v in ea_p.tolist()],
        error_total=rounded(float(ea_p.sum()), 6),
        reconstruction_total=rounded(float(ra_p.sum()), 6),
        error_share=rounded(num / den, 4) if den > 0 else 0.0,
        feature_total=rounded(float(attr.sum()), 6),
        candidates=_top_candidates(c.sae, acts, attr, top_k),
    )


def _feature_attributions(
    engine: Engine, plan: AttributionPlan, captured: list[SaeCapture], grads: list[tuple[torch.Tensor, torch.Tensor]],
    tokens: torch.Tensor, ids: MetricIds, metric: float,
) -> tuple[list[torch.Tensor], IntegratedGradientsCheck | None]:
    """Per SAE [S, d_sae]: gradient x activation, or integrated gradients and its completeness check."""
    if plan.method == "gradient":
        return [c.acts.detach()[0] * g_acts[0] for c, (g_acts, _) in zip(captured, grads)], None
    clean = [CleanSae(c.sae, c.acts.detach(), c.err.detach(), c.x.detach()) for c in captured]
    attrs, endpoint = checks.integrated_gradients(engine, clean, tokens, ids, plan.steps)
    return attrs, checks.ig_check(plan.steps, sum(float(a.sum()) for a in attrs), endpoint, metric)


def _run(engine: Engine, prompt: str, plan: AttributionPlan) -> AttributionOutcome:
    """Tokens, the metric's position, the backward pass, each SAE's numbers, the top entries' exact effects.
    Inside device_work."""
    tokens = engine.to_tokens(prompt, prepend_bos=plan.prepend_bos)  # [1, S]
    pos = position_index(plan.position, tokens.shape[1])
    # positions the error share is taken over: 1..pos without BOS (0..pos without a BOS, or when pos is BOS)
    share_start = 1 if plan.prepend_bos and pos >= 1 else 0
    c_ids = plan.counterfactual_ids
    ids = MetricIds(pos, plan.answer_ids[0], c_ids[0] if c_ids else None)
    captured = [SaeCapture(s) for s in plan.saes]
    metric_value, last_logits, grads = _backward(engine, captured, tokens, ids)
    attrs, ig = _feature_attributions(engine, plan, captured, grads, tokens, ids, metric_value)
    per_sae = [
        _sae_attribution(c, a, g_err, share_start, pos, plan.top_k)
        for c, a, (_, g_err) in zip(captured, attrs, grads)
    ]
    top = sorted((c for sae in per_sae for c in sae.candidates), key=lambda c: -c.magnitude)[: plan.top_k]
    cells = [checks.Cell(c.sae, c.position, c.feature) for c in top[: plan.verify]]
    exact = checks.exact_effects(engine, plan.saes, tokens, ids, cells) if cells else []
    return AttributionOutcome(
        tokens=engine.str_tokens(tokens), position=pos, share_start=share_start, metric_value=metric_value,
        last_logits=last_logits, per_sae=per_sae, top=top, exact=exact, ig=ig,
    )


# ---------------------------------------------------------------------------------------------------------------
# The result


def _entries(out: AttributionOutcome) -> list[AttributionEntry]:
    """The top entries, the first plan.verify with their exact effect."""
    exact = out.exact + [None] * (len(out.top) - len(out.exact))
    return [
        AttributionEntry(
            sae=c.sae, position=c.position, token=out.tokens[c.position], feature=c.feature,
            activation=rounded(c.activation), attribution=rounded(c.attribution, 6),
            exact_effect=rounded(x, 6) if x is not None else None,
        )
        for c, x in zip(out.top, exact)
    ]


def _warnings(
    engine: Engine, plan: AttributionPlan, out: AttributionOutcome, top: list[AttributionEntry]
) -> list[str] | None:
    # No warning on the totals against the metric: first order around a zeroed stream, they are far from the
    # metric on nearly every real prompt (3 of 3 measured on stories260K), and a warning that always fires teaches
    # the agent to skip warnings. They are reported; the per-entry exact_effect check is the actionable guard.
    return collect_warnings(
        answer_variant_warning(engine, out.last_logits, plan.answer, plan.answer_ids),
        *(context_warning(s, len(out.tokens)) for s in plan.saes),
        checks.linearity_warning(top, out.metric_value, plan.method),
        checks.completeness_warning(out.ig),
    )


def _assemble(engine: Engine, plan: AttributionPlan, out: AttributionOutcome) -> Attribution:
    a_ids, c_ids = plan.answer_ids, plan.counterfactual_ids
    top = _entries(out)
    a_tok = engine.str_tokens(torch.tensor(a_ids[:1]))[0]
    what = f"logit[{a_tok!r}]" + (f" - logit[{engine.str_tokens(torch.tensor(c_ids[:1]))[0]!r}]" if c_ids else "")
    by_key = {s.key: a for s, a in zip(plan.saes, out.per_sae)}
    return Attribution(
        metric=f"{what} at position {out.position}",
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
    verify: int = 3,
) -> Attribution:
    """Gradient x activation (or integrated gradients, method="integrated_gradients" with `steps`) of every SAE
    feature, and each SAE's error, on the metric; the top `verify` entries checked against their exact effect.
    A multi-token answer or counterfactual is scored on its first token only (answer_tokens / multi_token say so)."""
    plan = _plan(engine, answer, counterfactual, sae, saes, top_k, position, method, steps, verify)
    with engine.device_work():
        outcome = _run(engine, prompt, plan)
    return _assemble(engine, plan, outcome)
