"""patch_features: an interchange intervention on a minimal pair: features of `prompt` set to their values on
`source_prompt` (error term on), the metric clean, patched and on the source, the share of the difference
recovered; without `features`, every differing feature patched alone and ranked. The math is in
circuits/patching.py.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from pydantic import Field

from sae_mcp.circuits import patching
from sae_mcp.engine.controls import MAX_CONTROLS
from sae_mcp.engine.runtime import CancelToken
from sae_mcp.ledger.export.preamble import METRIC_HELPER
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.circuits import PatchCondition, PatchResult
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.text import controls_lines, fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., PatchResult]:
    engine, A = deps.engine, deps.args
    max_k = engine.limits.max_top_k
    Positions = Annotated[
        Annotated[int, A.position] | Annotated[list[Annotated[int, A.position]], Field(max_length=A.n_ctx)] | None,
        Field(description="Default: every aligned one but BOS"),
    ]

    def patch_features(
        prompt: Annotated[str, A.prompt],
        source_prompt: Annotated[str, A.prompt],
        answer: Annotated[str, A.answer],
        counterfactual: Annotated[str, A.answer] | None = None,
        features: Annotated[
            Annotated[list[Annotated[int, A.feature]], A.features] | None,
            Field(min_length=1, description="Patched together; default: sweep every differing feature alone"),
        ] = None,
        position: Positions = None,
        sae: Annotated[str | None, A.sae] = None,
        align: Annotated[Literal["none", "end"], Field(description="'end': align from the end if lengths differ")] = (
            "none"),
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        controls: Annotated[bool, Field(description="Matched features patched alike")] = False,
        n_controls: Annotated[int, Field(ge=1, le=MAX_CONTROLS)] = 5,
        seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0,
        mcp_context: Context | None = None,
    ) -> PatchResult:
        """On a minimal pair, patch features to their source_prompt values: the metric's gap recovered."""
        cancel = CancelToken()
        progress_reporter(mcp_context, cancel, "patches")  # watches the client: a cancel stops between forwards
        request = patching.PatchRequest(
            prompt=prompt, source_prompt=source_prompt, answer=answer, counterfactual=counterfactual,
            features=None if features is None else tuple(features),
            position=tuple(position) if isinstance(position, list) else position, sae=sae, align=align, top_k=top_k,
            controls=controls, n_controls=n_controls, seed=seed,
        )
        return patching.patch_features(engine, request, cancel=cancel)

    return patch_features


def _tokens_line(name: str, c: PatchCondition) -> str:
    return f"{name}: " + ", ".join(f"{tok(t.token)} {fmt(t.probability)}" for t in c.top)


def render(r: PatchResult) -> str:
    gap = r.source.metric - r.clean.metric
    pairs = " ".join(f"{p}:{q}" if p != q else str(p) for p, q in r.positions)
    lines = [f"sae {r.sae}, metric {r.metric}: clean {fmt(r.clean.metric)}, source {fmt(r.source.metric)} (difference "
             f"{gap:+.4g}); positions patched (prompt:source) {pairs}; {r.n_differing} features differ there"]
    if r.patched is not None:
        lines.append(f"patched together: metric {fmt(r.patched.metric)}, effect {r.effect:+.4g}, recovered "
                     f"{'n/a' if r.recovered is None else fmt(r.recovered)} of the difference, KL "
                     f"{'n/a' if r.kl is None else fmt(r.kl)}")
        lines.append("features (clean -> source activation, summed over the positions): " + "; ".join(
            f"{f.feature} {fmt(f.clean_activation)} -> {fmt(f.source_activation)}" for f in r.features or []))
    if r.sweep is not None:
        lines.append(f"each differing feature patched alone ({r.n_swept} of {r.n_differing}), by |effect|: feature: "
                     "effect, recovered, KL, clean -> source activation")
        lines += [f"{e.feature}: {e.effect:+.4g}, {'n/a' if e.recovered is None else fmt(e.recovered)}, {fmt(e.kl)}, "
                  f"{fmt(e.clean_activation)} -> {fmt(e.source_activation)}" for e in r.sweep]
    lines += [_tokens_line("next token clean", r.clean), _tokens_line("source", r.source)]
    if r.patched is not None:
        lines.append(_tokens_line("patched", r.patched))
    if r.controls is not None:
        lines += controls_lines(r.controls)
    return join(lines + warnings_lines(r.warnings))


def features(r: JSON) -> set[int]:
    return {e["feature"] for e in r.get("sweep") or []}


PATCH_HELPERS = '''\
def patched_logits(key, tokens, pairs, features, source_acts):
    """Next-token logits with SAE `key` spliced (error term on) and `features` set, at each (prompt, source)
    position pair, to their activations on the source."""
    def hook(acts, hook):
        acts = acts.clone()
        for p, q in pairs:
            acts[:, p, features] = source_acts[q, features].to(acts.dtype)
        return acts

    with model.saes(saes=[SAES[key]], use_error_term=True), model.hooks(fwd_hooks=[
            (f"{hook_of(key)}.hook_sae_acts_post", hook)]):
        return model(tokens)[0, -1]
'''


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    a, c = (r.get("answer_ids") or [None])[0], (r.get("counterfactual_ids") or [None])[0]
    listed = res.get("patched") is not None
    sweep = [(e["feature"], e["effect"]) for e in items(res.get("sweep"))]
    return f"""\
key = {r['sae']!r}
tokens = tokens_of({r['prompt']!r}, prepend_bos={r['prepend_bos']})
source_tokens = tokens_of({r['source_prompt']!r}, prepend_bos={r['prepend_bos']})
pairs, answer_id, cf_id = {lit(res['positions'])}, {a}, {c}
source_acts = SAES[key].encode(model.run_with_cache(source_tokens, names_filter=[hook_of(key)])[1][hook_of(key)])[0]
clean = metric_of(model(tokens)[0, -1], answer_id, cf_id)
close(clean, {res['clean']['metric']}, "clean metric")
close(metric_of(model(source_tokens)[0, -1], answer_id, cf_id), {res['source']['metric']}, "source metric")
""" + (f"""\
patched = metric_of(patched_logits(key, tokens, pairs, {lit(r.get('features'))}, source_acts), answer_id, cf_id)
close(patched, {res['patched']['metric']}, "patched metric")
""" if listed else f"""\
for feature, effect in {lit(sweep, 4)}:  # each patched alone
    close(metric_of(patched_logits(key, tokens, pairs, [feature], source_acts), answer_id, cf_id) - clean, effect,
          f"feature {{feature}} patched alone")
""") + f"print({run.id!r}, 'patch_features reproduced')\n"


SPEC = ToolSpec(
    name="patch_features",
    make=make,
    result=PatchResult,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=None, volatile=(), bos="sae", resolve=None, features=features, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(METRIC_HELPER, PATCH_HELPERS), note=None, details=None, label=None,
                      score=None),
    replay=AS_GIVEN,
)
