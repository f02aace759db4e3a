"""Code cells that redo the circuit tools' runs with plain hooks and autograd: patch_features (the patch by hand)
and trace_circuit (node attributions from the plain model's gradient at each hook, the strongest edges by
differentiating the downstream node, faithfulness by masking the nodes). The recorded graph may be a cut copy:
the cells check what the ledger kept.
"""

from __future__ import annotations

from sae_mcp.export.cells_causal import METRIC_HELPER
from sae_mcp.export.cells_read import items
from sae_mcp.export.session import lit
from sae_mcp.store.ledger import Run

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

HELPERS = {"patch_features": [METRIC_HELPER, PATCH_HELPERS], "trace_circuit": [METRIC_HELPER, TRACE_HELPERS]}


def patch_features(run: Run) -> str:
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


def trace_circuit(run: Run) -> str:
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
close(masked_metric(tokens, keys, {{k: set() for k in keys}}, position, answer_id, cf_id), {f['metric_empty']},
      "every node ablated")
""" + ("" if run.truncated else f"""\
circuit = {{key: {{(p, f) for k, p, f, _ in nodes if k == key}} for key in keys}}
close(masked_metric(tokens, keys, circuit, position, answer_id, cf_id), {f['metric_circuit']}, "the circuit alone")
""") + f"print({run.id!r}, 'trace_circuit reproduced')\n"
