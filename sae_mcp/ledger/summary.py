"""One line per recorded run: its arguments and its key numbers, read from the ledger's copy of the result (each
tool's summary is its ledger rule's: sae_mcp/server/tools/<tool>.py).

Used where runs are listed (the ledger tool and its resources, `sae-mcp ledger sessions`, the markdown report, the
feature page). Pure functions of JSON data: a result copy cut by the ledger still summarises (what a summary
misses, it says as the result's JSON instead).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from sae_mcp.ledger.records import Run, Session
from sae_mcp.ledger.rule import LedgerRule, Recorded, rule_of
from sae_mcp.ledger.store import LedgerStore

SHOWN = 60  # characters of a string argument shown


def fmt(x: object) -> str:
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


def summarize(rule: LedgerRule, result: dict | None, ok: bool = True, error: str | None = None) -> str:
    """The run's key numbers in one line, by its tool's rule (its error when it failed)."""
    if not ok:
        return f"error: {(error or '')[:200]}"
    if not result:
        return ""
    try:
        return rule.summary(result) if rule.summary is not None else \
            json.dumps(result, ensure_ascii=False, separators=(",", ":"))[:160]
    except (KeyError, TypeError, IndexError, AttributeError):  # a cut copy: say what there is
        return json.dumps(result, ensure_ascii=False, separators=(",", ":"))[:160]


def summary_of(run: Run, tools: Mapping[str, Recorded]) -> str:
    """A store Run's key numbers: the line written with it, else (a run recorded before those were) computed from
    its result by its tool's rule."""
    return run.summary if run.summary is not None else summarize(rule_of(tools, run.tool), run.result, run.ok,
                                                                 run.error)


def run_line(run: Run, tools: Mapping[str, Recorded]) -> str:
    """A store Run as one line: id, time, tool, arguments -> key numbers."""
    return f"{run.id} {when(run.time)} {run.tool}({args_line(run.given)}) -> {summary_of(run, tools)}"


def session_line(store: LedgerStore, s: Session) -> str:
    """A store Session as one line: id, time span, runs, model, client, first prompt (or search query)."""
    env = store.env(s.env) or {}
    model = (env.get("model") or {}).get("name", "?")
    prompt = next((p for r in store.runs(session=s.id, limit=20, light=True) if (p := first_prompt(r.given))), None)
    return (f"{s.id} {when(s.started)} .. {when(s.last)}: {s.n_runs} runs, model {model}"
            + (f", client {s.client}" if s.client else "")
            + (f"; first prompt or query {prompt[:80]!r}" if prompt else ""))
