"""ablate_and_test: features zeroed at chosen positions and the next token read, with the SAE's error term (the
causal effect) and without it, beside the baseline and the reconstruction alone; controls matched in activation
that are not known causes. The math is in engine/ablation.py.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.engine import ablation
from sae_mcp.engine.controls import MAX_CONTROLS
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.preamble import METRIC_HELPER
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit, md_text
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.causal import AblationResult, NextTokenTable
from sae_mcp.server.text import controls_lines, first_only, fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., AblationResult]:
    engine, A = deps.engine, deps.args
    max_k = engine.limits.max_top_k

    def ablate_and_test(
        prompt: Annotated[str, A.prompt],
        answer: Annotated[str, A.answer],
        features: Annotated[Annotated[list[Annotated[int, A.feature]], A.features], Field(min_length=1)],
        sae: Annotated[str | None, A.sae] = None,
        position: Annotated[
            Annotated[int, A.position] | Annotated[list[Annotated[int, A.position]], Field(max_length=A.n_ctx)] | None,
            Field(description="Default: all"),
        ] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        controls: Annotated[bool, Field(description="Matched random features")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
        counterfactual: Annotated[str, A.answer] | None = None,
    ) -> AblationResult:
        """Zero features and read the next token, with the error term (the causal effect) and without it."""
        return ablation.ablate_and_test(
            engine, prompt, answer, features, sae=sae, position=position, top_k=top_k, controls=controls,
            n_controls=n_controls, seed=seed, counterfactual=counterfactual,
        )

    return ablate_and_test


def _condition(name: str, t: NextTokenTable) -> str:
    return (f"{name}: metric {fmt(t.metric)} ({t.metric_change:+.4g}), P {fmt(t.answer_probability)} "
            f"({t.answer_probability_change:+.4g}), logit {fmt(t.answer_logit)} ({t.answer_logit_change:+.4g}), KL "
            f"{fmt(t.kl_from_baseline)}, rank {t.answer_rank}; top " + " ".join(f"{tok(x.token)} {fmt(x.probability)}"
                                                                            for x in t.top))


def render(r: AblationResult) -> str:
    cf = r.counterfactual
    where = "every position" if r.positions is None else f"positions {r.positions}"
    lines = [
        f"sae {r.sae}: ablated at {where}; metric {r.metric}"
        + first_only("answer", r.answer.tokens) + (first_only("counterfactual", cf.tokens) if cf else "")
        + "; per condition: metric (change vs baseline), P(answer) (change), raw logit (change), KL from baseline, "
        "answer rank (0-based), top tokens",
        "features: " + "; ".join(
            f"{f.feature} " + (f"fired: sum {fmt(f.activation_sum)}, max {fmt(f.max_activation)}" if f.fired
                               else "silent") for f in r.features),
    ]
    for name in ("baseline", "reconstruction_only", "ablated"):
        lines.append(_condition(name, getattr(r, name)))
    w = r.ablated_without_error_term
    lines.append(_condition("ablated_without_error_term", w) + f"; vs reconstruction_only: metric "
                 f"{w.metric_change_vs_reconstruction:+.4g}, P {w.answer_probability_change_vs_reconstruction:+.4g}, "
                 f"KL {fmt(w.kl_from_reconstruction)}")
    if r.controls is not None:
        lines += controls_lines(r.controls)
    return join(lines + warnings_lines(r.warnings))


def summary(r: JSON) -> str:
    a = r.get("ablated", {})
    metric = f", metric {ls.fmt(a['metric_change'])}" if a.get("metric_change") is not None else ""
    return (f"ablated vs baseline: P(answer) {ls.fmt(a.get('answer_probability_change'))}, logit "
            f"{ls.fmt(a.get('answer_logit_change'))}{metric}, KL {ls.fmt(a.get('kl_from_baseline'))}")


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """The ablated positions (every one when none was named) and the control sets."""
    positions = result.get("positions")
    controls = result.get("controls")
    return {"positions": positions if positions is not None else list(range(len(result.get("tokens") or []))),
            "control_sets": [run["features"] for run in controls["runs"]] if controls else []}


ABLATION_HELPERS = '''\
def zero_features(positions, features):
    """A hook on <hook>.hook_sae_acts_post zeroing `features` at `positions` (the SAE spliced in)."""
    pos, feats = torch.tensor(positions)[:, None], torch.tensor(features)[None, :]

    def hook(acts, hook):  # acts [batch, seq, d_sae]
        acts = acts.clone()
        acts[:, pos, feats] = 0.0
        return acts

    return hook


def spliced_logits(key, tokens, error_term, hooks=()):
    """Next-token logits with the SAE spliced in (with or without its error term) and `hooks` attached."""
    with model.saes(saes=[SAES[key]], use_error_term=error_term), model.hooks(fwd_hooks=list(hooks)):
        return model(tokens)[0, -1].float()


def check_table(logits, ref, recorded, answer_id, cf_id, what, suffix=""):
    """One condition's answer numbers, and their change from `ref` (the recorded fields end with `suffix`)."""
    probs, ref_probs = logits.softmax(-1), ref.softmax(-1)
    a = answer_id
    close(probs[a] - ref_probs[a], recorded["answer_probability_change" + suffix], f"{what}: P(answer) change")
    close(logits[a] - ref[a], recorded["answer_logit_change" + suffix], f"{what}: logit change")
    if recorded.get("metric_change" + suffix) is not None:  # runs recorded before without a counterfactual: none
        close(metric_of(logits, a, cf_id) - metric_of(ref, a, cf_id), recorded["metric_change" + suffix],
              f"{what}: metric change")
    close(kl(ref, logits), recorded["kl_from_baseline" if not suffix else "kl_from_reconstruction"], f"{what}: KL")
    if not suffix:
        check_rank(logits, a, recorded["answer_rank"], f"{what}: answer rank")
        close(probs[a], recorded["answer_probability"], f"{what}: P(answer)")
        close(logits[a], recorded["answer_logit"], f"{what}: logit")
'''


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    a, c = res["answer"]["token_id"], (res.get("counterfactual") or {}).get("token_id")
    tables = {k: {f: v for f, v in res[k].items() if f != "top"} for k in
              ("baseline", "reconstruction_only", "ablated", "ablated_without_error_term")}
    controls = [(run_["features"], run_["effects"]) for run_ in items((res.get("controls") or {}).get("runs"))]
    return f"""\
key, tokens = {r['sae']!r}, tokens_of({r['prompt']!r}, prepend_bos={r['prepend_bos']})
answer_id, cf_id = {a}, {c}
ablate = [(f"{{hook_of(key)}}.hook_sae_acts_post", zero_features({lit(r['positions'])}, {lit(r['features'])}))]
baseline = model(tokens)[0, -1].float()
reconstruction = spliced_logits(key, tokens, error_term=False)
ablated = spliced_logits(key, tokens, error_term=True, hooks=ablate)
ablated_without_error_term = spliced_logits(key, tokens, error_term=False, hooks=ablate)
recorded = {lit(tables, 11)}
check_table(baseline, baseline, recorded["baseline"], answer_id, cf_id, "baseline")
check_table(reconstruction, baseline, recorded["reconstruction_only"], answer_id, cf_id, "reconstruction_only")
check_table(ablated, baseline, recorded["ablated"], answer_id, cf_id, "ablated")
check_table(ablated_without_error_term, baseline, recorded["ablated_without_error_term"], answer_id, cf_id,
            "ablated_without_error_term")
check_table(ablated_without_error_term, reconstruction, recorded["ablated_without_error_term"], answer_id, cf_id,
            "ablated_without_error_term vs reconstruction_only", suffix="_vs_reconstruction")
controls = {lit(controls, 11)}  # (control features, their effects with the error term, vs baseline)
for features, effects in controls:
    logits = spliced_logits(key, tokens, error_term=True,
                            hooks=[(ablate[0][0], zero_features({lit(r['positions'])}, features))])
    close(logits[answer_id] - baseline[answer_id], effects["answer_logit_change"], f"control {{features}}: logit")
    close(kl(baseline, logits), effects["kl_next_token"], f"control {{features}}: KL")
    if "metric_change" in effects:
        close(metric_of(logits, answer_id, cf_id) - metric_of(baseline, answer_id, cf_id), effects["metric_change"],
              f"control {{features}}: metric change")
print({run.id!r}, "ablate_and_test reproduced")
"""


def details(r: JSON) -> list[str]:
    return [f"- {md_text(r['summary'])}"] if r.get("summary") else []


SPEC = ToolSpec(
    name="ablate_and_test",
    make=make,
    result=AblationResult,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos="sae", resolve=resolve, features=None, keeps_runs=False,
                      looks_up=True, on_feature_page=True),
    export=ExportRule(cell=cell, helpers=(METRIC_HELPER, ABLATION_HELPERS), note=None, details=details, label=None,
                      score=None),
    replay=AS_GIVEN,
)
