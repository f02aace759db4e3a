"""Code cells that redo the reading tools' runs: get_feature_acts, compare_prompts, next_token, project_to_vocab,
top_examples. Each takes a recorded Run and returns Python source that recomputes the numbers with plain
transformer-lens + sae-lens and asserts them against the recorded ones (the helpers are in preamble.py; the
corpus helpers of top_examples are CORPUS_HELPERS below).
"""

from __future__ import annotations

from sae_mcp.export.session import lit
from sae_mcp.store.ledger import Run


def items(xs: list | None) -> list:
    """A recorded list without the ledger's '{left_out: n}' marker (a cut copy checks what it kept)."""
    return [x for x in xs or [] if not (isinstance(x, dict) and set(x) == {"left_out"})]


def feature_acts(run: Run) -> str:
    r, res = run.resolved, run.result
    rows = [(p["position"], p["l0"], [(a["feature"], a["activation"]) for a in items(p["top"])])
            for p in items(res["positions"])]
    traces = {int(f): v for f, v in (res.get("features") or {}).items()}
    # A cut copy kept each list's first (largest) entries: nothing left out exceeds the last one kept.
    k = "len(top)" if run.truncated else r["top_k"]
    return f"""\
acts = sae_acts({r['sae']!r}, {r['prompt']!r}, prepend_bos={r['prepend_bos']})  # [seq, d_sae]
assert acts.shape[0] == {len(res['tokens'])}, "the prompt tokenizes differently than when recorded"
recorded = {lit(rows, 11)}  # (position, L0, [(feature, activation), ...])
for position, l0, top in recorded:
    for feature, activation in top:
        close(acts[position, feature], activation, f"position {{position}} feature {{feature}}")
    check_top(acts[position], top, {k}, f"position {{position}}")
    assert abs(int((acts[position] > 0).sum()) - l0) <= 1, f"position {{position}}: L0, recorded {{l0}}"
traces = {lit(traces, 9)}  # feature -> its activation at each position above
for feature, trace in traces.items():
    for (position, _, _), activation in zip(recorded, trace):
        close(acts[position, feature], activation, f"feature {{feature}} at position {{position}}")
print({run.id!r}, "get_feature_acts reproduced:", len(recorded), "positions")
"""


def compare_prompts(run: Run) -> str:
    r, res = run.resolved, run.result
    pos, key, bos = r["position"], r["sae"], r["prepend_bos"]
    if res["mode"] == "pair":
        rows = [(d["feature"], d["activation_a"], d["activation_b"], d["difference"]) for d in items(res["diffs"])]
        return f"""\
a = sae_acts({key!r}, {r['prompt_a']!r}, prepend_bos={bos})[{pos}]  # [d_sae] at the compared position
b = sae_acts({key!r}, {r['prompt_b']!r}, prepend_bos={bos})[{pos}]
recorded = {lit(rows, 11)}  # (feature, activation_a, activation_b, difference)
for feature, x, y, d in recorded:
    close(a[feature], x, f"feature {{feature}} in prompt_a")
    close(b[feature], y, f"feature {{feature}} in prompt_b")
    close(a[feature] - b[feature], d, f"feature {{feature}}: difference")
if len(recorded) == {r['top_k']}:  # nothing left out differs more than the last one listed
    check_top((a - b).abs(), [(f, abs(d)) for f, _, _, d in recorded], {r['top_k']}, "|difference|")
print({run.id!r}, "compare_prompts reproduced:", len(recorded), "features")
"""
    rows = [(d["feature"], d["mean_a"], d["mean_b"], d["difference"], d["rank_biserial"]) for d in items(res["diffs"])]
    return f"""\
A = torch.stack([sae_acts({key!r}, p, prepend_bos={bos})[{pos}] for p in {lit(r['prompts_a'], 29)}])
B = torch.stack([sae_acts({key!r}, p, prepend_bos={bos})[{pos}] for p in {lit(r['prompts_b'], 29)}])
recorded = {lit(rows, 11)}  # (feature, mean_a, mean_b, difference, rank_biserial)
for feature, mean_a, mean_b, d, rb in recorded:
    a, b = A[:, feature], B[:, feature]
    close(a.mean(), mean_a, f"feature {{feature}}: mean over prompts_a")
    close(b.mean(), mean_b, f"feature {{feature}}: mean over prompts_b")
    close(a.mean() - b.mean(), d, f"feature {{feature}}: difference")
    tol = 1e-6 * (a.mean().abs() + b.mean().abs()) + 1e-9  # equal up to float noise, as recorded
    delta = a[:, None] - b[None, :]
    close((2 * (delta > tol).sum() + (delta.abs() <= tol).sum()) / delta.numel() - 1, rb,
          f"feature {{feature}}: rank-biserial")
print({run.id!r}, "compare_prompts (sets) reproduced:", len(recorded), "features")
"""


def next_token(run: Run) -> str:
    r, res = run.resolved, run.result
    top = [(t["token_id"], t["probability"], t["logit"]) for t in items(res["top"])]
    ans = res.get("answer")
    lines = [
        f"tokens = tokens_of({r['prompt']!r}, prepend_bos={r['prepend_bos']})",
        "logits = model(tokens, attention_mask=torch.ones_like(tokens))[0, -1].float()  # [d_vocab]: the next token",
        "probs = logits.softmax(-1)",
        f"recorded = {lit(top, 11)}  # (token id, probability, logit), most likely first",
        "for rank, (token_id, p, logit) in enumerate(recorded):",
        "    check_rank(logits, token_id, rank, f'token {token_id}')",
        "    close(probs[token_id], p, f'P(token {token_id})')",
        "    close(logits[token_id], logit, f'logit of token {token_id}')",
    ]
    if ans:
        a = ans["token_id"]
        lines += [f"check_rank(logits, {a}, {ans['rank']}, 'the answer')",
                  f"close(probs[{a}], {ans['probability']}, 'P(answer)')",
                  f"close(logits[{a}], {ans['logit']}, 'logit of the answer')"]
        ids = r.get("answer_ids") or []
        if ans.get("sequence_log_probability") is not None and len(ids) > 1:
            lines += [f"answer_ids = torch.tensor([{lit(ids)}], device=tokens.device)  # teacher forcing",
                      "full = torch.cat([tokens, answer_ids[:, :-1]], dim=1)",
                      "logits_all = model(full, attention_mask=torch.ones_like(full))[0]",
                      "logp = logits_all[tokens.shape[1] - 1:].log_softmax(-1)  # [n_answer, d_vocab]",
                      f"close(logp.gather(1, answer_ids[0][:, None]).sum(), {ans['sequence_log_probability']}, "
                      "'log P(whole answer)')"]
    lines.append(f"print({run.id!r}, 'next_token reproduced')")
    return "\n".join(lines) + "\n"


def project_to_vocab(run: Run) -> str:
    r, res = run.resolved, run.result
    pos = [(t["token_id"], t["logit"]) for t in items(res["top_positive"])]
    neg = [(t["token_id"], t["logit"]) for t in items(res["top_negative"])]
    exact = "" if r.get("skip_special") else f"""\
check_top(logits, promotes, {len(pos)}, "promoted tokens")
check_top(-logits, [(t, -x) for t, x in suppresses], {len(neg)}, "suppressed tokens")
"""
    return f"""\
logits = (decoder_in_resid({r['sae']!r}, [{r['feature']}])[0] @ model.W_U).float()  # W_dec[f] @ W_U: [d_vocab]
promotes = {lit(pos, 11)}  # (token id, logit)
suppresses = {lit(neg, 13)}
for token_id, logit in promotes + suppresses:
    close(logits[token_id], logit, f"logit of token {{token_id}}")
{exact}print({run.id!r}, "project_to_vocab reproduced")
"""


CORPUS_HELPERS = '''\
def corpus_documents(corpus):
    """(index, text) of the corpus' non-empty documents, in order, read as sae-mcp reads them (an empty document
    still counts in the index): .jsonl a `text` per non-blank line, .parquet a `text` column, .txt documents
    separated by blank lines (one per line when it has none), else a Hugging Face dataset (split train)."""
    path = Path(corpus["key"])
    if corpus["kind"] == "jsonl":
        lines = [line for line in path.read_text(encoding="utf-8").split("\\n") if line.strip()]
        texts = [str(json.loads(line)["text"]) for line in lines]
    elif corpus["kind"] == "parquet":
        texts = [t if isinstance(t, str) else "" for t in pd.read_parquet(path, columns=["text"])["text"]]
    elif corpus["kind"] == "txt":
        raw = path.read_text(encoding="utf-8")
        blocks = raw.split("\\n")
        blocks = blocks[:-1] if blocks and blocks[-1] == "" else blocks  # the file's last newline ends a line
        if any(b.strip() == "" for b in blocks):
            texts, buf = [], []
            for line in blocks:
                if line.strip() == "":
                    if buf:
                        texts.append("\\n".join(buf))
                    buf = []
                else:
                    buf.append(line)
            texts += ["\\n".join(buf)] if buf else []
        else:
            texts = blocks
    else:
        import datasets  # a dependency of sae-lens

        texts = (row["text"] or "" for row in datasets.load_dataset(corpus["key"], split="train", streaming=True))
    for index, text in enumerate(texts):
        if text and text.strip():
            yield index, text


def corpus_windows(corpus, context_size, bos_id):
    """(document, start, ids): each document tokenized alone, cut into BOS + context_size - 1 tokens."""
    step = context_size - (1 if bos_id is not None else 0)
    for document, text in corpus_documents(corpus):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), step):
            yield document, start, ([bos_id] if bos_id is not None else []) + ids[start:start + step]


def brute_force(key, feature, corpus, context_size, bos_id, budget):
    """Every positive activation of `feature` over the corpus' first windows until `budget` document tokens, one
    window per forward: {(document, offset): activation}, and the document tokens read (BOS is context only)."""
    hook, sae = hook_of(key), SAES[key]
    layer, first = int(hook.split(".")[1]), 1 if bos_id is not None else 0
    found, seen = {}, 0
    for document, start, ids in corpus_windows(corpus, context_size, bos_id):
        if seen >= budget:
            break
        tokens = torch.tensor([ids], device=DEVICE)
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], stop_at_layer=layer + 1,
                                                  names_filter=[f"{hook}.hook_sae_acts_post"])
        acts = cache[f"{hook}.hook_sae_acts_post"][0, first:, feature].float().tolist()
        found.update({(document, start + i): a for i, a in enumerate(acts) if a > 0})
        seen += len(ids) - first
    return found, seen
'''


def top_examples(run: Run) -> str:
    r, res = run.resolved, run.result
    examples = [(e["document"], e["offset"], e["activation"]) for e in items(res.get("examples"))]
    loose = (r.get("compute_dtype") or "float32") != "float32"
    return f"""\
corpus = {lit(r['corpus'], 9)}
found, seen = brute_force({r['sae']!r}, {r['feature']}, corpus, context_size={r['context_size']}, \
bos_id={r['bos_id']}, budget={r['tokens_scanned']})
atol, rtol = {'(2e-2, 2e-2)  # the scan ran in ' + str(r.get('compute_dtype')) if loose else '(ATOL, RTOL)'}
assert seen == {r['tokens_scanned']}, f"read {{seen}} document tokens, recorded {r['tokens_scanned']}"
close(max(found.values(), default=0.0), {res['max_activation']}, "max activation", atol, rtol)
n_fired = len(found)
assert abs(n_fired - {res['n_fired']}) <= {'max(2, 0.01 * ' + str(res['n_fired']) + ')' if loose else 1}, \
f"fired on {{n_fired}} tokens, recorded {res['n_fired']}"
examples = {lit(examples, 11)}  # (document, offset, activation), largest first
for document, offset, activation in examples:
    close(found.get((document, offset), 0.0), activation, f"document {{document}} offset {{offset}}", atol, rtol)
print({run.id!r}, "top_examples reproduced by brute force over", seen, "tokens")
"""
