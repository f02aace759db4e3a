"""attribute: gradient x activation (or integrated gradients) of every feature and of each SAE's error on the
metric, each top entry beside its exact contribution (metric - metric with it zeroed). The math is in
engine/attribution.py.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import Field

from sae_mcp.engine import attribution as attr
from sae_mcp.engine.attribution_checks import IG_TOLERANCE
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import ExportRule, Handed, Redone, ReplayRule
from sae_mcp.ledger.export.session import items, lit, md_text
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.causal import Attribution
from sae_mcp.server.text import first_only, fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., Attribution]:
    engine, A = deps.engine, deps.args
    max_k = engine.limits.max_top_k

    def attribute(
        prompt: Annotated[str, A.prompt],
        answer: Annotated[str, A.answer],
        counterfactual: Annotated[str, A.answer] | None = None,
        sae: Annotated[str | None, A.sae] = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="Default: every SAE, one per hook"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 20,
        position: Annotated[Annotated[int, A.position], Field(description="Where the metric is read")] = -1,
        method: Literal["gradient", "integrated_gradients"] = "gradient",
        steps: Annotated[int, Field(ge=1, le=attr.checks.MAX_STEPS)] = 8,
        verify: Annotated[bool, Field(description="Exact effect of zeroing each entry")] = True,
    ) -> Attribution:
        """Which features and error terms drive the metric: attribution beside the exact effect of zeroing."""
        return attr.attribute(
            engine, prompt, answer, counterfactual=counterfactual, sae=sae, saes=saes, top_k=top_k, position=position,
            method=method, steps=steps, verify=verify,
        )

    return attribute


def render(r: Attribution) -> str:
    ig = r.integrated_gradients
    method = (f"integrated gradients, {ig.steps} steps; features along their path, errors along theirs"
              if ig is not None else "gradient x activation, first order")
    lines = [f"metric {r.metric} = {fmt(r.metric_value)} ({method})"
             + first_only("answer", r.answer_tokens) + first_only("counterfactual", r.counterfactual_tokens)]
    for key in r.per_token:
        lines.append(f"sae {key}: error share {fmt(r.error_share[key])} over positions "
                     f"{r.error_share_positions[0]}..{r.error_share_positions[1]}; totals: features "
                     f"{fmt(r.feature_attribution_total[key])}, error {fmt(r.error_attribution[key])}")
    if ig is None:
        lines.append(f"all features + errors: {fmt(r.attribution_total)} (first order; need not equal the metric)")
    elif max(ig.relative_error, ig.error_relative_error) <= IG_TOLERANCE:  # beyond it, a warning says these numbers
        lines.append(f"path sums vs endpoint differences: features {fmt(ig.attribution_sum)} vs "
                     f"{fmt(ig.endpoint_difference)}, errors {fmt(ig.error_attribution_sum)} vs "
                     f"{fmt(ig.error_endpoint_difference)}")
    one = len(r.per_token) == 1  # one SAE: its key is said once, not on every row
    verified = any(t.exact_contribution is not None for t in r.top)
    lines.append(("top (position token feature): " if one else "top (sae position token feature): ")
                 + "activation, attribution" + (" (exact contribution)" if verified else "")
                 + "; contribution = metric - metric with it zeroed: > 0 raises the metric")
    for t in r.top:
        exact = f" ({fmt(t.exact_contribution)})" if t.exact_contribution is not None else ""
        lines.append(("" if one else f"{t.sae} ") + f"{t.position} {tok(t.token)} {t.feature}: {fmt(t.activation)}, "
                     f"{fmt(t.attribution)}{exact}")
    for key, sums in r.per_token.items():
        errs = r.error_attribution_per_token[key]
        lines.append(f"per position for {key} (token: features, error): " + "; ".join(
            f"{p} {tok(r.tokens[p])}: {fmt(f)}, {fmt(e)}" for p, (f, e) in enumerate(zip(sums, errs))))
    return join(lines + warnings_lines(r.warnings))


def summary(r: JSON) -> str:
    top = ", ".join(f"{t['position']} {t['token']!r} {t['feature']}: {ls.fmt(t['attribution'])}"
                    for t in r.get("top", [])[:3])
    return f"{r.get('metric')} = {ls.fmt(r.get('metric_value'))}; top {top}; error share {r.get('error_share')}"


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """The SAEs used, the metric's position, and BOS as the first of those SAEs prepends it."""
    keys = list((result.get("per_token") or {}).keys())
    return {"saes": keys, "position": result.get("position"),
            "prepend_bos": ctx.engine.saes[keys[0]].prepend_bos if keys and keys[0] in ctx.engine.saes else None}


def features(r: JSON) -> set[int]:
    return {t["feature"] for t in r.get("top") or []}


ATTRIBUTION_HELPERS = '''\
def metric_at(logits, position, answer_id, cf_id, log_prob):
    """logit[answer] - logit[counterfactual]; without one log P(answer) (log_prob), or the raw logit as runs
    recorded before sae-mcp's metric convention scored it."""
    at = logits[0, position].float()
    if cf_id is not None:
        return at[answer_id] - at[cf_id]
    return at.log_softmax(-1)[answer_id] if log_prob else at[answer_id]


def attribution_pass(keys, tokens, position, answer_id, cf_id, log_prob):
    """(metric, per SAE its activations and gradient x activation [seq, d_sae]), every SAE spliced with its error
    term so the output is the plain model's. The activations become leaves that require grad; each error term a
    leaf plus an identity path to its input (sae-lens computes it without a graph), so an upstream SAE gets the
    plain model's gradient whatever SAEs follow it."""
    store, hooks = {}, []
    for key in keys:
        def keep_input(x, hook, key=key):
            store[key, "x"] = x
            return x

        def leaf_acts(acts, hook, key=key):
            store[key, "acts"] = acts.detach().requires_grad_(True)
            return store[key, "acts"]

        def leaf_error(err, hook, key=key):
            with torch.enable_grad():
                store[key, "err"] = e = err.detach().requires_grad_(True)
                return e + (store[key, "x"] - store[key, "x"].detach()).reshape(e.shape)

        h = hook_of(key)
        hooks += [(f"{h}.hook_sae_input", keep_input), (f"{h}.hook_sae_acts_post", leaf_acts),
                  (f"{h}.hook_sae_error", leaf_error)]
    with torch.enable_grad(), model.saes(saes=[SAES[k] for k in keys], use_error_term=True):
        with model.hooks(fwd_hooks=hooks):
            metric = metric_at(model(tokens), position, answer_id, cf_id, log_prob)
            grads = torch.autograd.grad(metric, [store[k, "acts"] for k in keys], allow_unused=True)
    acts = {k: store[k, "acts"].detach()[0].float() for k in keys}
    return float(metric), acts, {k: acts[k] * (g[0].float() if g is not None else 0.0) for k, g in zip(keys, grads)}


def exact_contribution(keys, tokens, position, answer_id, cf_id, log_prob, key, at, feature):
    """metric - the metric with `feature` of SAE `key` zeroed at position `at` (every SAE spliced, error terms on)."""
    def zero(acts, hook):
        acts = acts.clone()
        acts[:, at, feature] = 0.0
        return acts

    def run(hooks):
        with model.saes(saes=[SAES[k] for k in keys], use_error_term=True), model.hooks(fwd_hooks=hooks):
            return float(metric_at(model(tokens), position, answer_id, cf_id, log_prob))

    return run([]) - run([(f"{hook_of(key)}.hook_sae_acts_post", zero)])
'''


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    a = (r.get("answer_ids") or [None])[0]
    c = (r.get("counterfactual_ids") or [None])[0]
    # runs recorded before the field was named for what it is called it exact_effect (the same number)
    rows = [(t["sae"], t["position"], t["feature"], t["activation"], t["attribution"],
             t.get("exact_contribution", t.get("exact_effect"))) for t in items(res["top"])]
    log_prob = res.get("metric_kind") == "log_probability"  # absent: recorded when it scored the raw logit
    check = ('    close(attributions[key][at, feature], attribution, f"{key} {at} {feature}: attribution")'
             if res.get("method") == "gradient" else
             "    # integrated gradients: the metric, activations and exact contributions are checked, not the path")
    return f"""\
keys, tokens = {lit(r['saes'])}, tokens_of({r['prompt']!r}, prepend_bos={r['prepend_bos']})
position, answer_id, cf_id, log_prob = {res['position']}, {a}, {c}, {log_prob}
metric, acts, attributions = attribution_pass(keys, tokens, position, answer_id, cf_id, log_prob)
close(metric, {res['metric_value']}, {('metric ' + res['metric'])!r})
recorded = {lit(rows, 11)}  # (sae, position, feature, activation, attribution, exact contribution)
for key, at, feature, activation, attribution, exact in recorded:
    close(acts[key][at, feature], activation, f"{{key}} {{at}} {{feature}}: activation")
{check}
    if exact is not None:
        close(exact_contribution(keys, tokens, position, answer_id, cf_id, log_prob, key, at, feature), exact,
              f"{{key}} {{at}} {{feature}}: exact contribution")
print({run.id!r}, "attribute ({res.get('method')}) reproduced")
"""


def details(r: JSON) -> list[str]:
    return [f"- {t['position']} {md_text(repr(t['token']))} feature {t['feature']}: attribution "
            f"{ls.fmt(t['attribution'])}" + (f", exact contribution {ls.fmt(x)}" if (x := t.get(
                "exact_contribution", t.get("exact_effect"))) is not None else "")
            for t in items(r.get("top"))[:5]]


def replay_arguments(given: JSON, resolved: JSON, handed: Handed) -> JSON:
    """verify as it is now: runs recorded when it counted the top entries checked are replayed checking all or
    none."""
    if isinstance(given.get("verify"), int) and not isinstance(given["verify"], bool):
        return {**given, "verify": given["verify"] > 0}
    return given


SPEC = ToolSpec(
    name="attribute",
    make=make,
    result=Attribution,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos=None, resolve=resolve, features=features, keeps_runs=False,
                      looks_up=True, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(ATTRIBUTION_HELPERS,), note=None, details=details, label=None,
                      score=None),
    replay=ReplayRule(skip_in_place=None, arguments=replay_arguments, hands_out=None),
)
