"""project_to_vocab: the logit lens on a feature's decoder direction, W_dec[f] @ W_U: the tokens it promotes and
suppresses (special, byte-fallback and control tokens left out unless asked).

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.engine import logits as lg
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results import VocabProjection
from sae_mcp.server.text import fmt, join, tok
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., VocabProjection]:
    engine, services, A = deps.engine, deps.services, deps.args
    max_k = engine.limits.max_top_k

    def project_to_vocab(
        feature: Annotated[int, A.feature],
        sae: Annotated[str | None, A.sae] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Per side")] = 10,
        skip_special: Annotated[bool, Field(description="Without special and byte tokens")] = True,
    ) -> VocabProjection:
        """Logit lens: the tokens a feature's decoder direction promotes and suppresses most."""
        exclude = services.stats.builtin_excluded() if skip_special else frozenset()
        return lg.project_to_vocab(engine, feature, sae=sae, top_k=top_k, exclude=exclude)

    return project_to_vocab


def render(r: VocabProjection) -> str:
    return join([
        f"sae {r.sae} feature {r.feature}: W_dec[f] @ W_U (token logit)",
        "promotes: " + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in r.top_positive),
        "suppresses: " + ", ".join(f"{tok(t.token)} {fmt(t.logit)}" for t in r.top_negative),
    ])


def summary(r: JSON) -> str:
    return (f"feature {r.get('feature')} promotes " + " ".join(repr(t["token"]) for t in r.get("top_positive", [])[:5])
            + "; suppresses " + " ".join(repr(t["token"]) for t in r.get("top_negative", [])[:3]))


def cell(run: Redone) -> str:
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


SPEC = ToolSpec(
    name="project_to_vocab",
    make=make,
    result=VocabProjection,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos=None, resolve=None, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(), note=None, details=None, label=None, score=None),
    replay=AS_GIVEN,
)
