"""trace_circuit: a sparse feature circuit across the loaded SAEs (Marks et al. 2024): feature and error nodes by
attribution, each checked by its exact contribution, edges between consecutive SAEs, faithfulness and
completeness, the strongest paths; each feature node with its newest label. The math is in circuits/.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from pydantic import Field

from sae_mcp.circuits import graph
from sae_mcp.engine.attribution_checks import MAX_STEPS
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.ledger.export.preamble import METRIC_HELPER
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.circuits import CircuitResult
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.text import fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only
from sae_mcp.services import Services

Threshold = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]


def label_nodes(services: Services, engine: Engine, result: CircuitResult) -> CircuitResult:
    """Each feature node with the newest label of its feature, when it has one (the explanation store)."""
    labels: dict[tuple[str, int], str | None] = {}
    for n in result.graph.nodes:
        if n.kind != "feature" or n.sae is None or n.feature is None:  # (a feature node names both)
            continue
        key = (n.sae, n.feature)
        if key not in labels:
            found = [x for x in services.explanations.for_feature(engine.sae(n.sae).store_key, n.feature)
                     if x.source == "label"]
            labels[key] = found[0].description if found else None
        n.label = labels[key]
    return result


def make(deps: ToolDeps) -> Callable[..., CircuitResult]:
    engine, services, A = deps.engine, deps.services, deps.args

    def trace_circuit(
        prompt: Annotated[str, A.prompt],
        answer: Annotated[str, A.answer],
        counterfactual: Annotated[str, A.answer] | None = None,
        saes: Annotated[
            list[Annotated[str, Field(max_length=256)]] | None,
            Field(max_length=64, description="Default: all, one per hook"),
        ] = None,
        node_threshold: Annotated[Threshold, Field(description="Min |attribution|")] = 0.0,
        max_nodes: Annotated[int, Field(ge=1, le=graph.MAX_NODES)] = 40,
        edge_threshold: Annotated[Threshold, Field(description="Min |weight|")] = 0.0,
        position: Annotated[Annotated[int, A.position], Field(description="Where the metric is read")] = -1,
        method: Literal["gradient", "integrated_gradients"] = "gradient",
        steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 8,
        ablation: Literal["zero", "mean"] = "zero",
        mcp_context: Context | None = None,
    ) -> CircuitResult:
        """Sparse feature circuit (Marks et al.): nodes, edges, faithfulness, paths."""
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "steps (nodes, checks, each SAE pair, faithfulness)")
        request = graph.CircuitRequest(
            prompt=prompt, answer=answer, counterfactual=counterfactual, saes=None if saes is None else tuple(saes),
            node_threshold=node_threshold, max_nodes=max_nodes, edge_threshold=edge_threshold, position=position,
            method=method, steps=steps, ablation=ablation,
        )
        result = graph.trace_circuit(engine, request, progress=progress, cancel=cancel,
                                     means_of=services.ablation_means)
        return label_nodes(services, engine, result)

    return trace_circuit


def render(r: CircuitResult) -> str:
    layer_of = {n.sae: n.layer for n in r.graph.nodes if n.sae}
    short = {key: f"L{layer_of.get(key, i)}" for i, key in enumerate(r.saes)}
    nodes = {n.node_id: n for n in r.graph.nodes}

    def name(node_id: str) -> str:
        n = nodes.get(node_id)
        if n is None or n.kind == "metric" or n.sae is None:
            return "metric"
        what = "err" if n.kind == "error" else str(n.feature)
        return f"{short[n.sae]}/{what}@{n.position} {tok(n.token or '')}"

    f = r.faithfulness
    lines = [
        f"metric {r.metric} = {fmt(r.metric_value)}; SAEs " + ", ".join(f"{short[k]} = {k}" for k in r.saes)
        + f"; {r.n_nodes} of {r.n_candidate_nodes} nodes kept ({r.attribution_kept:.0%} of |attribution|), "
        f"{r.n_edges} edges",
        f"faithfulness ({f.ablation} ablation{mean_over(f.mean_tokens)}) "
        f"{'n/a' if f.faithfulness is None else fmt(f.faithfulness)}, "
        f"completeness {'n/a' if f.completeness is None else fmt(f.completeness)}: metric of the model "
        f"{fmt(f.metric_full)}, circuit alone {fmt(f.metric_circuit)}, without it {fmt(f.metric_without_circuit)}, "
        f"nothing {fmt(f.metric_empty)}",
        "top paths (weight in metric units: layer/feature@position token -> ... -> metric):",
        *(f"{p.weight:+.4g}: " + " -> ".join(name(x) for x in p.nodes) for p in r.paths),
        "nodes (attribution (exact contribution)[, label]; contribution = metric - metric with it zeroed):",
    ]
    for n in r.graph.nodes:
        if n.kind == "metric":
            continue
        exact = f" ({fmt(n.exact_contribution)})" if n.exact_contribution is not None else ""
        label = f", {n.label[:80]!r}" if n.label else ""
        attribution = "n/a" if n.attribution is None else fmt(n.attribution)  # (None: the metric node only)
        lines.append(f"  {name(n.node_id)}: {attribution}{exact}{label}")
    lines.append("the whole graph (nodes, edges with weights) is in the structured content")
    return join(lines + warnings_lines(r.warnings))


def mean_over(tokens: int | None) -> str:
    return "" if tokens is None else f" over {tokens:,} corpus tokens"


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """The SAEs traced, and BOS as the first of them prepends it."""
    keys = list(result.get("saes") or [])
    return {"saes": keys,
            "prepend_bos": ctx.engine.saes[keys[0]].prepend_bos if keys and keys[0] in ctx.engine.saes else None}


def features(r: JSON) -> set[int]:
    return {n["feature"] for n in (r.get("graph") or {}).get("nodes") or [] if n.get("kind") == "feature"}


TRACE_HELPERS = '''\
def hook_gradient(tokens, name, position, answer_id, cf_id):
    """The plain model's residual at hook `name` and d metric / d it there ([seq, d] each)."""
    kept = {}

    def leaf(x, hook):
        kept["x"] = x.detach().requires_grad_(True)
        return kept["x"]

    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, leaf)])[0, position]
        (g,) = torch.autograd.grad(metric_of(logits, answer_id, cf_id), [kept["x"]])
    return kept["x"].detach()[0], g[0]


def edge_by_hand(tokens, up, down, src, dst, g_down):
    """edge(src -> dst): `up`'s output written decode(a) + e with a, e leaves, the model run on to `down`'s hook,
    dst = encode(x)[f] (or the error x - decode(encode(x))) there, times the fixed gradient g_down, differentiated."""
    x_up = model.run_with_cache(tokens, names_filter=[hook_of(up)])[1][hook_of(up)][0]
    a_clean = SAES[up].encode(x_up)
    e_clean = x_up - SAES[up].decode(a_clean)
    a, e, kept = a_clean.clone().requires_grad_(True), e_clean.clone().requires_grad_(True), {}

    def keep(x, hook):
        kept["x"] = x
        return x

    with torch.enable_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook_of(up), lambda x, hook: (a @ SAES[up].W_dec + SAES[up].b_dec
                                                                             + e)[None]), (hook_of(down), keep)])
        x = kept["x"][0]
        acts = SAES[down].encode(x)
        d = (x - SAES[down].decode(acts))[dst[0]] if dst[1] is None else acts[dst[0], dst[1]]
        g_a, g_e = torch.autograd.grad((g_down * d).sum(), [a, e], allow_unused=True)
    p, f = src
    if f is None:
        return float((e_clean[p] * g_e[p]).sum()) if g_e is not None else 0.0
    return float(a_clean[p, f] * g_a[p, f]) if g_a is not None else 0.0


def masked_metric(tokens, keys, keep, position, answer_id, cf_id):
    """The metric with every traced SAE spliced, features and errors zeroed but those `keep` names per SAE
    (keep[key] = {(position, feature or None)}) and BOS."""
    def hooks_for(key):
        def feats(acts, hook):
            m = torch.zeros_like(acts)
            m[:, 0] = 1
            for p, f in keep[key]:
                if f is not None:
                    m[:, p, f] = 1
            return acts * m

        def errs(err, hook):
            m = torch.zeros_like(err)
            m[:, 0] = 1
            for p, f in keep[key]:
                if f is None:
                    m[:, p] = 1
            return err * m

        return [(f"{hook_of(key)}.hook_sae_acts_post", feats), (f"{hook_of(key)}.hook_sae_error", errs)]

    with model.saes(saes=[SAES[k] for k in keys], use_error_term=True), model.hooks(
            fwd_hooks=[h for k in keys for h in hooks_for(k)]):
        return float(metric_of(model(tokens)[0, position], answer_id, cf_id))
'''


def cell(run: Redone) -> str:
    r, res = run.resolved, run.result
    graph = res["graph"]
    a, c = (r.get("answer_ids") or [None])[0], (r.get("counterfactual_ids") or [None])[0]
    nodes = [n for n in items(graph["nodes"]) if n.get("kind") in ("feature", "error")]
    rows = [(n["sae"], n["position"], n.get("feature"), n["attribution"]) for n in nodes]
    by_id = {n["node_id"]: n for n in nodes}
    edges = sorted((e for e in items(graph["edges"]) if e["source"] in by_id and e["target"] in by_id),
                   key=lambda e: -abs(e["weight"]))[:5]
    checked = [(by_id[e["source"]]["sae"], [by_id[e["source"]]["position"], by_id[e["source"]].get("feature")],
                by_id[e["target"]]["sae"], [by_id[e["target"]]["position"], by_id[e["target"]].get("feature")],
                e["weight"]) for e in edges]
    f = res["faithfulness"]
    return f"""\
keys, position = {lit(res['saes'])}, {graph['position']}
tokens = tokens_of({graph['prompt']!r}, prepend_bos={r['prepend_bos']})
answer_id, cf_id = {a}, {c}
grads = {{key: hook_gradient(tokens, hook_of(key), position, answer_id, cf_id) for key in keys}}
nodes = {lit(rows, 8)}  # (sae, position, feature or None for the error node, attribution)
for key, p, f, attribution in nodes:  # attribution = the node's value x the plain model's gradient at its hook
    x, g = grads[key]
    acts = SAES[key].encode(x)
    err = x - SAES[key].decode(acts)
    got = acts[p, f] * (g[p] @ SAES[key].W_dec[f]) if f is not None else (err[p] * g[p]).sum()
    close(got, attribution, f"{{key}} node {{f}} at {{p}}")
for up, src, down, dst, weight in {lit(checked, 33)}:  # the strongest edges
    g = grads[down][1][dst[0]]
    g_down = g if dst[1] is None else g @ SAES[down].W_dec[dst[1]]
    close(edge_by_hand(tokens, up, down, src, dst, g_down), weight, f"edge {{up}} {{src}} -> {{down}} {{dst}}")
""" + _faithfulness_checks(f, run.truncated) + f"print({run.id!r}, 'trace_circuit reproduced')\n"


def _faithfulness_checks(f: JSON, truncated: bool) -> str:
    """The export's checks of m(empty) and m(C), by zero ablation; mean ablation's means (over corpus tokens the
    notebook does not load) are not in the ledger, so those runs say so instead."""
    if f.get("ablation") == "mean":
        return (f"# faithfulness by mean ablation over {f.get('mean_tokens')} corpus tokens: the means are not in the "
                "ledger, so m(empty) and m(C) are not redone here\n")
    out = f"""\
close(masked_metric(tokens, keys, {{k: set() for k in keys}}, position, answer_id, cf_id), {f['metric_empty']},
      "every node ablated")
"""
    if not truncated:
        out += f"""\
circuit = {{key: {{(p, f) for k, p, f, _ in nodes if k == key}} for key in keys}}
close(masked_metric(tokens, keys, circuit, position, answer_id, cf_id), {f['metric_circuit']}, "the circuit alone")
"""
    return out


SPEC = ToolSpec(
    name="trace_circuit",
    make=make,
    result=CircuitResult,
    render=render,
    annotations=read_only,
    page_in_text=True,  # a view a person opens: its circuit page
    resources=None,
    ledger=LedgerRule(summary=None, volatile=(), bos=None, resolve=resolve, features=features, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(METRIC_HELPER, TRACE_HELPERS), note=None, details=None, label=None,
                      score=None),
    replay=AS_GIVEN,
)
