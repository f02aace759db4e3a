"""Code cells that redo the causal tools' runs with hooks and the gradient: ablate_and_test, attribute,
steer_generate; and the helper code they call (HELPERS, included in the preamble when a session used the tool).
"""

from __future__ import annotations

from sae_mcp.export.cells_read import items
from sae_mcp.export.session import lit
from sae_mcp.store.ledger import Run

METRIC_HELPER = '''\
def metric_of(logits, answer_id, cf_id):
    """logit[answer] - logit[counterfactual]; without a counterfactual log P(answer)."""
    logits = logits.float()
    return logits[answer_id] - logits[cf_id] if cf_id is not None else logits.log_softmax(-1)[answer_id]
'''

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

STEERING_HELPERS = '''\
def steering_hook(vector):
    """Adds `vector` at every position (prompt and generated); at hook_z it is reshaped to [n_heads, d_head]."""
    def hook(act, hook):
        v = vector.to(act.dtype)
        return act + (v.reshape(act.shape[2], act.shape[3]) if act.ndim == 4 else v)

    return hook


def sample(logits, temperature, top_p, generator):
    """sae-mcp's sampler for one row: greedy below temperature 1e-4; else softmax(logits / temperature), the
    smallest nucleus of mass top_p (its first token always kept), one draw from the row's own generator."""
    if temperature < 1e-4:
        return int(logits.argmax())
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep_sorted[0] = True
        probs = probs * torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def generate(key, tokens, vector, max_new_tokens, temperature, top_p, seed, eos_id):
    """One continuation (its text before EOS), `vector` added at the SAE's hook, drawn from a generator seeded with
    `seed` as sae-mcp seeds each batch row's (it uses a KV cache, this a full forward per step: the same logits up
    to float rounding, so a sampled draw can differ where two tokens' probabilities nearly tie)."""
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    seq, out = tokens, []
    with model.hooks(fwd_hooks=[(hook_of(key), steering_hook(vector))]):
        for _ in range(max_new_tokens):
            nxt = sample(model(seq, attention_mask=torch.ones_like(seq))[0, -1], temperature, top_p, generator)
            if eos_id is not None and nxt == eos_id:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], dim=1)
    return model.tokenizer.decode(out)
'''

# tool -> the helper blocks its cells call (a block two tools share is written once: preamble.py)
HELPERS = {"ablate_and_test": [METRIC_HELPER, ABLATION_HELPERS], "attribute": [ATTRIBUTION_HELPERS],
           "steer_generate": [STEERING_HELPERS]}


def ablate_and_test(run: Run) -> str:
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


def attribute(run: Run) -> str:
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


def steer_generate(run: Run) -> str:
    r, res = run.resolved, run.result
    ans = (r.get("answer_ids") or [None])[0]
    runs = [(s["scale"], s["kl_next_token"], s["mean_kl_prompt"], s.get("answer_probability"),
             [c["text"] for c in items(s["continuations"])]) for s in items(res["steered"])]
    unsteered = [c["text"] for c in items(res["unsteered"])]
    greedy = float(r["temperature"]) < 1e-4
    return f"""\
key, tokens = {r['sae']!r}, tokens_of({r['prompt']!r}, prepend_bos={r['prepend_bos']})
features, coefficients = {lit(r['features'] and [f['feature'] for f in r['features']])}, {lit(r['coefficients'])}
W_dec = SAES[key].W_dec
direction = torch.tensor(coefficients, dtype=W_dec.dtype, device=W_dec.device) @ W_dec[features]  # at scale 1
settings = dict(max_new_tokens={r['max_new_tokens']}, temperature={r['temperature']}, top_p={r['top_p']}, \
eos_id={r.get('eos_token_id')})
seeds, answer_id = {lit(res['seeds'])}, {ans}
plain = model(tokens, attention_mask=torch.ones_like(tokens))[0]  # the unsteered prompt's logits [seq, d_vocab]
same = total = 0
for seed, text in zip(seeds, {lit(unsteered, 22)}):
    same, total = same + (generate(key, tokens, 0 * direction, seed=seed, **settings) == text), total + 1
runs = {lit(runs, 7)}  # (scale, KL next token, mean KL over the prompt, P(answer), text per seed)
for scale, kl_next, kl_mean, p_answer, texts in runs:
    with model.hooks(fwd_hooks=[(hook_of(key), steering_hook(scale * direction))]):
        steered = model(tokens, attention_mask=torch.ones_like(tokens))[0]
    close(kl(plain[-1], steered[-1]), kl_next, f"scale {{scale}}: KL of the next token")
    close(kl(plain, steered).mean(), kl_mean, f"scale {{scale}}: mean KL over the prompt")
    if p_answer is not None:
        close(steered[-1].float().softmax(-1)[answer_id], p_answer, f"scale {{scale}}: P(answer)")
    for seed, text in zip(seeds, texts):
        same, total = same + (generate(key, tokens, scale * direction, seed=seed, **settings) == text), total + 1
{'assert same == total, f"greedy texts: {same} of {total} reproduced"' if greedy else
 '# sampled: the seed-independent numbers (KL, P(answer)) are asserted above; texts are compared, not asserted'}
print({run.id!r}, "steer_generate reproduced;", same, "of", total, "texts identical")
"""
