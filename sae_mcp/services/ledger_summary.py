"""One line per recorded run: its arguments and its key numbers, read from the ledger's copy of the result.

Used where runs are listed (the `ledger` tool, the ledger:// resources, `sae-mcp ledger sessions`, the markdown
report). Pure functions of JSON data: a result copy cut by the ledger still summarises (missing keys are skipped).
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Callable
from typing import Any

SHOWN = 60  # characters of a string argument shown


def fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def args_line(args: dict) -> str:
    """{'prompt': 'Once upon', 'top_k': 3} -> "prompt='Once upon' top_k=3" (long values cut)."""
    parts = []
    for k, v in args.items():
        if v is None:
            continue
        text = repr(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        parts.append(f"{k}={text if len(text) <= SHOWN else text[:SHOWN] + '...'}")
    return " ".join(parts)


def first_prompt(args: dict) -> str | None:
    for key in ("prompt", "prompt_a", "prompts_a", "query"):
        v = args.get(key)
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, str) and v:
            return v
    return None


def _feature_acts(r: dict) -> str:
    cells = ((a["activation"], p["position"], p["token"], a["feature"]) for p in r.get("positions", [])
             if p.get("position", 0) > 0 for a in p.get("top", []))
    best = heapq.nlargest(3, cells)  # written with every run: no sort of every cell
    return f"{len(r.get('tokens', []))} tokens; strongest: " + ", ".join(
        f"{pos} {tok!r} {f}={fmt(a)}" for a, pos, tok, f in best)


def _compare(r: dict) -> str:
    which = f"{r.get('token_a')!r} vs {r.get('token_b')!r}" if r.get("mode") == "pair" else \
        f"{r.get('n_a')} vs {r.get('n_b')} prompts"
    return which + ": " + ", ".join(f"{d['feature']} {fmt(d['difference'])}" for d in r.get("diffs", [])[:4])


def _next_token(r: dict) -> str:
    top = ", ".join(f"{t['token']!r} {fmt(t['probability'])}" for t in r.get("top", [])[:3])
    a = r.get("answer")
    return top + (f"; answer {a['token']!r} rank {a['rank']} p {fmt(a['probability'])}" if a else "")


def _project(r: dict) -> str:
    return (f"feature {r.get('feature')} promotes " + " ".join(repr(t["token"]) for t in r.get("top_positive", [])[:5])
            + "; suppresses " + " ".join(repr(t["token"]) for t in r.get("top_negative", [])[:3]))


def _top_examples(r: dict) -> str:
    ex = (r.get("examples") or [None])[0]
    shown = "".join(f"«{t}»" if i == ex["position"] else t for i, t in enumerate(ex["tokens"])) if ex else ""
    return (f"max {fmt(r.get('max_activation'))}, density {fmt(r.get('density'))} over {r.get('tokens_scanned')} "
            f"tokens ({r.get('source')})" + (f"; top: {shown!r}" if ex else ""))


def _steer(r: dict) -> str:
    runs = "; ".join(f"x{fmt(s['scale'])}: KL {fmt(s['kl_next_token'])}, changed {fmt(s['changed_fraction'])}"
                     + (f", P(answer) {fmt(s['answer_probability'])}" if s.get("answer_probability") is not None
                        else "") for s in r.get("steered", [])[:4])
    text = (r.get("steered") or [{}])[0].get("continuations", [{}])[0].get("text", "")
    return f"{runs}; steered text {text[:60]!r}"


def _ablate(r: dict) -> str:
    a = r.get("ablated", {})
    metric = f", metric {fmt(a['metric_change'])}" if a.get("metric_change") is not None else ""
    return (f"ablated vs baseline: P(answer) {fmt(a.get('answer_probability_change'))}, logit "
            f"{fmt(a.get('answer_logit_change'))}{metric}, KL {fmt(a.get('kl_from_baseline'))}")


def _attribute(r: dict) -> str:
    top = ", ".join(f"{t['position']} {t['token']!r} {t['feature']}: {fmt(t['attribution'])}"
                    for t in r.get("top", [])[:3])
    return f"{r.get('metric')} = {fmt(r.get('metric_value'))}; top {top}; error share {r.get('error_share')}"


def _search(r: dict) -> str:
    return f"{len(r.get('matches', []))} matches: " + ", ".join(
        f"{m['feature']} {m['description'][:30]!r}" for m in r.get("matches", [])[:3])


def _score(s: dict) -> str:
    m = s.get("metrics") or {}
    lo, hi = (m.get("interval_95") or [None, None])[:2]
    return (f"{s.get('method')} score of {s.get('explanation', '')[:40]!r} on feature {s.get('feature')}: balanced "
            f"accuracy {fmt(m.get('balanced_accuracy'))} [{fmt(lo)}, {fmt(hi)}] over {s.get('n')} contexts")


def _score_explanation(r: dict) -> str:
    if r.get("score"):
        return _score(r["score"])
    c = r.get("challenge") or {}
    return (f"blind set {c.get('challenge_id')}: {len(c.get('contexts') or [])} contexts ({c.get('method')}, seed "
            f"{c.get('seed')}) for {c.get('explanation', '')[:40]!r}")


SUMMARIES: dict[str, Callable[[dict], str]] = {
    "get_feature_acts": _feature_acts, "compare_prompts": _compare, "next_token": _next_token,
    "project_to_vocab": _project, "top_examples": _top_examples, "steer_generate": _steer,
    "ablate_and_test": _ablate, "attribute": _attribute, "search_explanations": _search,
    "label_feature": lambda r: f"label {r.get('label_id')} on feature {r.get('feature')}",
    "build_index": lambda r: f"{r.get('tokens_scanned')} tokens in {r.get('windows')} windows",
    "feature_card": lambda r: (r.get("markdown") or "").split("\n", 1)[0].lstrip("# "),
    "feature_stats": lambda r: f"by {r.get('sort_by')}: " + ", ".join(
        f"{f['feature']} ({fmt(f.get(r.get('sort_by')))})" for f in r.get("features", [])[:5]),
    "token_set_enrichment": lambda r: "; ".join(
        f"{x['name']}: " + " ".join(str(e["feature"]) for e in x.get("promoted", [])[:3])
        for x in r.get("sets", [])[:4]),
    "score_explanation": _score_explanation, "submit_predictions": _score,
    "model_info": lambda r: f"{r.get('model')}, SAEs " + ", ".join(s.get("key", "") for s in r.get("saes", [])),
}


def summarize(tool: str, result: dict | None, ok: bool = True, error: str | None = None) -> str:
    """The run's key numbers in one line (its error when it failed)."""
    if not ok:
        return f"error: {(error or '')[:200]}"
    if not result:
        return ""
    try:
        return SUMMARIES[tool](result) if tool in SUMMARIES else \
            json.dumps(result, ensure_ascii=False, separators=(",", ":"))[:160]
    except (KeyError, TypeError, IndexError, AttributeError):  # a cut copy: say what there is
        return json.dumps(result, ensure_ascii=False, separators=(",", ":"))[:160]


def summary_of(run: Any) -> str:
    """A store Run's key numbers: the line written with it, else (a run recorded before those were) computed."""
    return run.summary if run.summary is not None else summarize(run.tool, run.result, run.ok, run.error)


def run_line(run: Any) -> str:
    """A store Run as one line: id, time, tool, arguments -> key numbers."""
    return f"{run.id} {when(run.time)} {run.tool}({args_line(run.given)}) -> {summary_of(run)}"


def session_line(store: Any, s: Any) -> str:
    """A store Session as one line: id, time span, runs, model, client, first prompt (or search query)."""
    env = store.env(s.env) or {}
    model = (env.get("model") or {}).get("name", "?")
    prompt = next((p for r in store.runs(session=s.id, limit=20, light=True) if (p := first_prompt(r.given))), None)
    return (f"{s.id} {when(s.started)} .. {when(s.last)}: {s.n_runs} runs, model {model}"
            + (f", client {s.client}" if s.client else "")
            + (f"; first prompt or query {prompt[:80]!r}" if prompt else ""))
