"""next_token: the plain model's next-token prediction (the tutorial's test_prompt), and an answer's rank,
probability and logit.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from pydantic import Field

from sae_mcp.engine import logits as lg
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results import NextToken
from sae_mcp.server.text import fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., NextToken]:
    engine, A = deps.engine, deps.args
    max_k = engine.limits.max_top_k

    def next_token(
        prompt: Annotated[str, A.prompt],
        answer: Annotated[str, A.answer] | None = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
    ) -> NextToken:
        """The plain model's next-token prediction, and an answer's rank, probability and logit."""
        return lg.next_token(engine, prompt, answer=answer, top_k=top_k)

    return next_token


def render(r: NextToken) -> str:
    lines = ["next token (probability, logit): " + ", ".join(
        f"{tok(t.token)} {fmt(t.probability)} ({fmt(t.logit)})" for t in r.top)]
    if r.answer is not None:
        a = r.answer
        lines.append(f"answer {tok(a.token)}: rank {a.rank} (0-based), probability {fmt(a.probability)}, logit "
                     f"{fmt(a.logit)}"
                     + (f"; tokens {a.answer_tokens}, only the first scored; whole answer log-probability "
                        f"{fmt(a.sequence_log_probability)}" if a.multi_token and a.sequence_log_probability is not None
                        else ""))
    lines.append("prompt tokens: " + " ".join(tok(t) for t in r.tokens))
    return join(lines + warnings_lines(r.warnings))


def summary(r: JSON) -> str:
    top = ", ".join(f"{t['token']!r} {ls.fmt(t['probability'])}" for t in r.get("top", [])[:3])
    a = r.get("answer")
    return top + (f"; answer {a['token']!r} rank {a['rank']} p {ls.fmt(a['probability'])}" if a else "")


def cell(run: Redone) -> str:
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


SPEC = ToolSpec(
    name="next_token",
    make=make,
    result=NextToken,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos="model", resolve=None, features=None, keeps_runs=False,
                      looks_up=False, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(), note=None, details=None, label=None, score=None),
    replay=AS_GIVEN,
)
