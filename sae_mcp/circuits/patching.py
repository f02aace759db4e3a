"""patch_features: interchange interventions on a minimal pair.

Run `prompt` with the SAE spliced in (error term on, so unpatched it is the plain model) and replace some features'
activations at some positions by their values on `source_prompt` (the SAE's activations when the plain model reads
it), then score the metric (engine/metric.py) after the prompt. Positions pair up one to one: prompts of the same
token length align position by position; prompts of different lengths are refused with both tokenizations shown,
or aligned from the end with align="end". BOS is never patched (both prompts start with it).

With `features`: they are patched together (and, with controls, control features patched the same way). Without:
the sweep patches each feature that differs between the prompts at those positions, one per batch row, and ranks
them by |effect|. Numbers: the metric clean / patched / on the source, the effect (patched - clean), the share of the
clean->source difference recovered, KL(clean || patched).

Why the error term: sae-lens recomputes it from the input the SAE actually sees (hooks off), so patched features
move the stream by exactly sum_f (a_source - a_clean) W_dec[f] at those positions and everything else is the plain
model's.
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
from sae_mcp.engine.logits import answer_token_ids, answer_variant_warning, next_token_table
from sae_mcp.engine.metric import Metric, metric_for, multi_token_warning
from sae_mcp.engine.runtime import CancelToken, Engine, context_warning, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.causal import ControlRun, Controls
from sae_mcp.results.circuits import PatchCondition, PatchedFeature, PatchResult, SweepEntry

MAX_SWEEP = 4096  # differing features the sweep patches (one batch row each); more are left out, largest |difference|
# first, and the result says so
ROW_ELEMENTS = 1 << 26  # floats of logits + SAE activations one forward may hold (as attribution's exact checks)
MAX_ROWS = 64
SIGNIFICANCE = ("metric_change", "kl_next_token")


@dataclass(frozen=True)
class PatchRequest:
    """One patch_features call as asked: the minimal pair, the metric, what is patched where, the controls."""

    prompt: str  # the clean run, whose features are patched
    source_prompt: str  # the run the patched values come from
    answer: str  # the metric: logit[answer] - logit[counterfactual], or log P(answer)
    counterfactual: str | None = None  # the metric's other token, when given
    features: tuple[int, ...] | None = None  # patched together; None = each differing feature alone (the sweep)
    position: int | tuple[int, ...] | None = None  # prompt positions (negative: from the end); None = every aligned one
    sae: str | None = None  # the SAE's key; None = the default SAE
    align: str = "none"  # 'none' (equal token lengths) or 'end' (positions paired from the end)
    top_k: int = 10  # next tokens listed per condition
    controls: bool = False  # matched features patched alike, for comparison
    n_controls: int = 5  # control sets
    seed: int = 0  # draws the control sets

    def check(self, max_top_k: int) -> None:
        """What needs no model (but the server's top_k ceiling): align, top_k, controls (they need features)."""
        if self.align not in ("none", "end"):
            raise InvalidInput(f"align={self.align!r}: use 'none' (equal token lengths) or 'end' (pair positions "
                               "from the end)")
        if not 1 <= self.top_k <= max_top_k:
            raise InvalidInput(f"top_k={self.top_k} is out of range; pass 1..{max_top_k}")
        if self.controls and self.features is None:
            raise InvalidInput("controls need features: without them the sweep ranks every differing feature (each "
                               "is the others' control)")
        check_n_controls(self.controls, self.n_controls)


@dataclass(frozen=True)
class PatchPlan:
    """A validated patch_features call: its SAE loaded, its features checked, its metric built."""

    sae: LoadedSAE
    metric: Metric
    answer: str
    answer_ids: list[int]
    counterfactual_ids: list[int] | None
    features: list[int] | None  # None: sweep
    position: int | Sequence[int] | None  # as given (prompt positions)
    align: str  # 'none' | 'end'
    top_k: int
    controls: bool
    n_controls: int
    seed: int


def aligned(n_prompt: int, n_source: int, align: str, prompt_tokens: list[str], source_tokens: list[str],
            first: int) -> list[tuple[int, int]]:
    """Every (prompt position, source position) pair that can be patched (from `first`: BOS is not)."""
    if n_prompt != n_source and align != "end":
        raise InvalidInput(
            f"the prompts have different token lengths ({n_prompt} vs {n_source}), so positions do not pair up: "
            f"prompt {prompt_tokens}, source_prompt {source_tokens}. Reword one to the same tokenization, or pass "
            "align='end' to pair positions from the end"
        )
    offset = n_source - n_prompt
    return [(p, p + offset) for p in range(first, n_prompt) if p + offset >= first]


def chosen(pairs: list[tuple[int, int]], position: int | Sequence[int] | None, n_prompt: int
           ) -> list[tuple[int, int]]:
    """The pairs at the asked prompt positions (negative counts from the end; default all)."""
    if position is None:
        return pairs
    asked = [position] if isinstance(position, int) else list(position)
    if not asked:
        raise InvalidInput("position is an empty list; omit it for every aligned position, or list some")
    by_prompt = dict(pairs)
    out = []
    for q in sorted({position_index(x, n_prompt) for x in asked}):
        if q not in by_prompt:
            raise InvalidInput(f"position {q} of the prompt has no partner in source_prompt (BOS, or before the "
                               "source's first token when aligned from the end); pick another")
        out.append((q, by_prompt[q]))
    return out


def _patch_hook(rows: list[list[int]], pairs: list[tuple[int, int]], source: torch.Tensor) -> Callable:
    """A hook for <hook>.hook_sae_acts_post setting, in batch row b, features rows[b] at the prompt positions of
    `pairs` to their values on the source (source [S_source, d_sae])."""
    dst = torch.tensor([p for p, _ in pairs], device=source.device)[:, None]  # [n_pos, 1]
    src = torch.tensor([s for _, s in pairs], device=source.device)[:, None]  # [n_pos, 1]
    idx = [torch.tensor(fs, device=source.device)[None, :] if fs else None for fs in rows]  # [1, n_feats]

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:  # acts [B, S, d_sae]
        acts = acts.clone()
        for b, fs in enumerate(idx):
            if fs is not None:
                acts[b, dst, fs] = source[src, fs].to(acts.dtype)
        return acts

    return hook


def _patched_logits(engine: Engine, s: LoadedSAE, tokens: torch.Tensor, rows: list[list[int]],
                    pairs: list[tuple[int, int]], source: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] with the SAE spliced (error term on) and row b's features patched."""
    model = engine.model
    with torch.inference_mode(), model.saes(saes=[s.sae], use_error_term=True):
        with model.hooks(fwd_hooks=[(f"{s.hook_name}.hook_sae_acts_post", _patch_hook(rows, pairs, source))]):
            return model(tokens.expand(len(rows), -1), return_type="logits")[:, -1]


def _first_order(engine: Engine, s: LoadedSAE, tokens: torch.Tensor, metric: Metric, pairs: list[tuple[int, int]],
                 delta: torch.Tensor) -> torch.Tensor:
    """Gradient x (source - clean activation) of every feature at the patched positions [d_sae]: the patch's
    first-order effect, with which the controls leave the known causes out. delta [n_pos, d_sae]."""
    model, kept = engine.model, {}

    def leaf(acts: torch.Tensor, hook) -> torch.Tensor:
        kept["acts"] = acts.detach().requires_grad_(True)
        return kept["acts"]

    with torch.enable_grad(), model.saes(saes=[s.sae], use_error_term=True):
        with model.hooks(fwd_hooks=[(f"{s.hook_name}.hook_sae_acts_post", leaf)]):
            (grad,) = torch.autograd.grad(metric.of(model(tokens, return_type="logits")[0, -1]), [kept["acts"]])
    rows = [p for p, _ in pairs]
    return (grad[0, rows].float() * delta).sum(0)  # [d_sae]


@dataclass(frozen=True)
class Runs:
    """What the device work gives back."""

    tokens: list[str]
    source_tokens: list[str]
    pairs: list[tuple[int, int]]
    clean: torch.Tensor  # [V] next-token logits of the prompt
    source: torch.Tensor  # [V] of the source prompt
    delta: torch.Tensor  # [d_sae]: summed source - clean activation over the pairs
    clean_sum: torch.Tensor  # [d_sae]
    source_sum: torch.Tensor  # [d_sae]
    differing: list[int]  # features whose activation differs at some pair
    swept: list[int]  # the differing features the sweep patched
    rows: list[list[int]]  # the batch rows patched: [targets, *controls] or one feature each (sweep)
    logits: torch.Tensor  # [len(rows), V]
    control_sets: list[list[int]]
    control_note: str | None
    prompt_len: int


def _acts(engine: Engine, s: LoadedSAE, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the plain model's next-token logits [V], the SAE's activations [S, d_sae]) for tokens [1, S]."""
    with torch.inference_mode():
        last = engine.model(tokens, return_type="logits")[0, -1]
        acts = engine.encode(s, engine.forward_to_hook(tokens, s))[0].float()
    return last, acts


def _rows_for(plan: PatchPlan, differing: list[int], delta: torch.Tensor, control_sets: list[list[int]]
              ) -> tuple[list[list[int]], list[int]]:
    if plan.features is not None:
        return [plan.features, *control_sets], []
    order = sorted(differing, key=lambda f: -abs(float(delta[f])))[:MAX_SWEEP]
    return [[f] for f in order], order


def _run(engine: Engine, request: PatchRequest, plan: PatchPlan, cancel: CancelToken | None) -> Runs:
    s = plan.sae
    tokens = engine.to_tokens(request.prompt, prepend_bos=s.prepend_bos)  # [1, S]
    source_tokens = engine.to_tokens(request.source_prompt, prepend_bos=s.prepend_bos)  # [1, S']
    str_p, str_s = engine.str_tokens(tokens), engine.str_tokens(source_tokens)
    first = 1 if s.prepend_bos else 0
    pairs = chosen(aligned(len(str_p), len(str_s), plan.align, str_p, str_s, first), plan.position, len(str_p))
    if not pairs:
        raise InvalidInput("no position pairs up between the prompts (both are BOS alone?); pass longer prompts")
    with engine.device_work():
        clean, acts_p = _acts(engine, s, tokens)
        source, acts_s = _acts(engine, s, source_tokens)
    p_idx, s_idx = [p for p, _ in pairs], [q for _, q in pairs]
    clean_at, source_at = acts_p[p_idx], acts_s[s_idx]  # [n_pos, d_sae] each
    delta_pos = source_at - clean_at  # [n_pos, d_sae]
    differing = (delta_pos != 0).any(0).nonzero().flatten().tolist()
    control_sets: list[list[int]] = []  # per control set, its features
    note: str | None = None
    if plan.features is not None and plan.controls:
        with engine.device_work():
            first_order = _first_order(engine, s, tokens, plan.metric, pairs, delta_pos)
        # matched on the patch's size: |summed source - clean activation|, among the features that differ
        size = delta_pos.sum(0).abs() * torch.isin(torch.arange(s.d_sae), torch.tensor(differing, dtype=torch.long))
        control_sets, note = activation_matched_controls(size, first_order, plan.features, plan.n_controls, plan.seed,
                                                         what="summed |source - clean activation|")
    rows, swept = _rows_for(plan, differing, delta_pos.sum(0), control_sets)
    per = max(1, min(MAX_ROWS, ROW_ELEMENTS // (tokens.shape[1] * (engine.model.cfg.d_vocab + s.d_sae))))
    logits = []
    for i in range(0, len(rows), per):
        if cancel is not None:
            cancel.check()
        with engine.device_work():
            logits.append(_patched_logits(engine, s, tokens, rows[i : i + per], pairs, acts_s))
    return Runs(
        tokens=str_p, source_tokens=str_s, pairs=pairs, clean=clean, source=source, delta=delta_pos.sum(0),
        clean_sum=clean_at.sum(0), source_sum=source_at.sum(0), differing=differing, swept=swept, rows=rows,
        logits=torch.cat(logits) if logits else torch.zeros((0, clean.shape[-1])), control_sets=control_sets,
        control_note=note, prompt_len=tokens.shape[1],
    )


# ---------------------------------------------------------------------------------------------------------------
# The result


def _condition(engine: Engine, plan: PatchPlan, logits: torch.Tensor) -> PatchCondition:
    top, ans = next_token_table(engine, logits, plan.top_k, plan.answer_ids)
    assert ans is not None  # scored: a patch has an answer
    return PatchCondition(metric=rounded(float(plan.metric.of(logits)), 6), answer_probability=ans.probability,
                          top=top)


def _recovered(effect: float, gap: float) -> float | None:
    return rounded(effect / gap, 4) if abs(gap) > 1e-9 else None


def _changes(metric: Metric, logits: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    a = metric.answer
    return {"metric_change": float(metric.of(logits) - metric.of(ref)), "kl_next_token": float(kl(ref, logits)),
            "answer_probability_change": float(logits.float().softmax(-1)[a] - ref.float().softmax(-1)[a])}


def _controls(plan: PatchPlan, runs: Runs) -> Controls:
    target = _changes(plan.metric, runs.logits[0], runs.clean)
    ctl = [ControlRun(features=cs, effects=rounded_effects(_changes(plan.metric, lg, runs.clean)))
           for cs, lg in zip(runs.control_sets, runs.logits[1:])]
    lo, hi = ACTIVATION_BAND
    return Controls(
        matched_on=f"features differing between the prompts there, their summed |source - clean activation| within "
        f"{lo:g}-{hi:g}x their target's, not a target nor among the {EXCLUDED_TOP} of largest first-order patch "
        "effect; drawn by seed, patched the same way",
        seed=plan.seed, runs=ctl, stats=control_stats({k: target[k] for k in SIGNIFICANCE}, ctl),
        note=runs.control_note or (None if ctl else "no control could be drawn"),
        caution=few_controls_caution(len(ctl)),
    )


def _sweep(plan: PatchPlan, runs: Runs, gap: float) -> list[SweepEntry]:
    m_clean = float(plan.metric.of(runs.clean))
    entries = []
    for f, lg in zip(runs.swept, runs.logits):
        effect = float(plan.metric.of(lg)) - m_clean
        entries.append(SweepEntry(
            feature=f, effect=rounded(effect, 6), recovered=_recovered(effect, gap),
            kl=rounded(float(kl(runs.clean, lg)), 6), clean_activation=rounded(float(runs.clean_sum[f])),
            source_activation=rounded(float(runs.source_sum[f]))))
    return sorted(entries, key=lambda e: -abs(e.effect))[: plan.top_k]


def _warnings(engine: Engine, plan: PatchPlan, runs: Runs) -> list[str] | None:
    silent = [f for f in plan.features or [] if f not in set(runs.differing)]
    return collect_warnings(
        answer_variant_warning(engine, runs.clean, plan.answer, plan.answer_ids),
        multi_token_warning(engine, "answer", plan.answer_ids),
        multi_token_warning(engine, "counterfactual", plan.counterfactual_ids),
        context_warning(plan.sae, runs.prompt_len),
        f"feature(s) {silent} have the same activation on both prompts at the patched positions: patching them "
        "changes nothing; pick features that differ (compare_prompts)" if silent else None,
        f"{len(runs.differing)} features differ, more than the sweep's {MAX_SWEEP}: it patched the {MAX_SWEEP} of "
        "largest |difference|; pass positions to narrow it" if len(runs.differing) > MAX_SWEEP else None,
        "no feature differs between the prompts at these positions: nothing to patch; pick positions where the "
        "prompts differ" if not runs.differing else None,
    )


def _assemble(engine: Engine, plan: PatchPlan, runs: Runs) -> PatchResult:
    m_clean, m_source = float(plan.metric.of(runs.clean)), float(plan.metric.of(runs.source))
    gap = m_source - m_clean
    listed = plan.features  # the features patched together (None: a sweep, each alone)
    patched = runs.logits[0] if listed is not None else None
    effect = float(plan.metric.of(patched)) - m_clean if patched is not None else None
    return PatchResult(
        sae=plan.sae.key, metric=plan.metric.name, metric_kind=plan.metric.kind, tokens=runs.tokens,
        source_tokens=runs.source_tokens, positions=[[p, q] for p, q in runs.pairs],
        clean=_condition(engine, plan, runs.clean),
        patched=_condition(engine, plan, patched) if patched is not None else None,
        source=_condition(engine, plan, runs.source),
        features=[PatchedFeature(feature=f, clean_activation=rounded(float(runs.clean_sum[f])),
                                 source_activation=rounded(float(runs.source_sum[f]))) for f in listed]
        if listed is not None else None,
        effect=rounded(effect, 6) if effect is not None else None,
        recovered=_recovered(effect, gap) if effect is not None else None,
        kl=rounded(float(kl(runs.clean, patched)), 6) if patched is not None else None,
        sweep=None if listed is not None else _sweep(plan, runs, gap),
        n_differing=len(runs.differing),
        n_swept=None if listed is not None else len(runs.swept),
        controls=_controls(plan, runs) if listed is not None and plan.controls else None,
        warnings=_warnings(engine, plan, runs),
    )


def patch_features(engine: Engine, request: PatchRequest, cancel: CancelToken | None = None) -> PatchResult:
    """Patch request.features (or, without them, each differing feature alone) at request.position (default every
    aligned position but BOS) of the prompt to their values on the source prompt, and score the metric. `cancel`
    stops it between forwards."""
    s = engine.sae(request.sae)
    feats = None
    if request.features is not None:
        feats = engine.check_features(s, list(request.features), required=True, unique=True)
    request.check(engine.limits.max_top_k)
    answer, counterfactual = request.answer, request.counterfactual
    a_ids = answer_token_ids(engine, answer)
    c_ids = answer_token_ids(engine, counterfactual) if counterfactual is not None else None
    plan = PatchPlan(sae=s, metric=metric_for(engine, a_ids, c_ids, answer, counterfactual), answer=answer,
                     answer_ids=a_ids, counterfactual_ids=c_ids, features=feats, position=request.position,
                     align=request.align, top_k=request.top_k, controls=request.controls,
                     n_controls=request.n_controls, seed=request.seed)
    return _assemble(engine, plan, _run(engine, request, plan, cancel))
