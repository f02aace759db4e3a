"""compare_prompts: the features whose activation differs most between two prompts, or between two sets of
prompts (minimal pairs: means, difference, Cohen's d, rank-biserial, separated).

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from sae_mcp.engine import features as feat
from sae_mcp.engine import prompt_sets
from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.export.rules import AS_GIVEN, ExportRule, Redone
from sae_mcp.ledger.export.session import items, lit
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results import FeatureDiff, FeatureSetDiff, PromptComparison
from sae_mcp.server.text import fmt, join, tok, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only


def make(deps: ToolDeps) -> Callable[..., PromptComparison]:
    engine, A = deps.engine, deps.args
    max_k = engine.limits.max_top_k
    max_sets = engine.limits.max_prompts_per_set

    def compare_prompts(
        prompt_a: Annotated[str, A.prompt] | None = None,
        prompt_b: Annotated[str, A.prompt] | None = None,
        prompts_a: Annotated[list[Annotated[str, A.prompt]] | None, Field(max_length=max_sets)] = None,
        prompts_b: Annotated[list[Annotated[str, A.prompt]] | None, Field(max_length=max_sets)] = None,
        sae: Annotated[str | None, A.sae] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        position: Annotated[int, A.position] = -1,
        sort_by: Literal["difference", "effect_size"] = "difference",
    ) -> PromptComparison:
        """Features whose activation differs most between two prompts, or two sets of minimal pairs."""
        single = prompt_a is not None or prompt_b is not None
        sets = prompts_a is not None or prompts_b is not None
        if single == sets:
            raise ToolError("pass either prompt_a and prompt_b, or prompts_a and prompts_b (not both, not neither)")
        if single:
            if prompt_a is None or prompt_b is None:
                raise ToolError("pass both prompt_a and prompt_b")
            return feat.compare_prompts(engine, prompt_a, prompt_b, sae=sae, top_k=top_k, position=position)
        if prompts_a is None or prompts_b is None:
            raise ToolError("pass both prompts_a and prompts_b")
        return prompt_sets.compare_prompt_sets(
            engine, prompts_a, prompts_b, sae=sae, top_k=top_k, position=position, sort_by=sort_by
        )

    return compare_prompts


def render(r: PromptComparison) -> str:
    if r.mode == "pair":
        head = (f"sae {r.sae}, position {r.position}: a={tok(r.token_a or '')} b={tok(r.token_b or '')}; "
                "feature: activation a, b, difference a-b")
        rows = [f"{d.feature}: {fmt(d.activation_a)}, {fmt(d.activation_b)}, {fmt(d.difference)}" for d in r.diffs
                if isinstance(d, FeatureDiff)]
    else:
        head = (f"sae {r.sae}, position {r.position}, {r.n_a} vs {r.n_b} prompts, sorted by {r.sort_by}; compared "
                f"tokens a: {' '.join(map(tok, r.tokens_a or []))}; b: {' '.join(map(tok, r.tokens_b or []))}\n"
                "feature: mean a, mean b, difference, Cohen's d, rank-biserial[, separated]")
        rows = [f"{d.feature}: {fmt(d.mean_a)}, {fmt(d.mean_b)}, {fmt(d.difference)}, "
                f"{'n/a' if d.effect_size is None else fmt(d.effect_size)}, {fmt(d.rank_biserial)}"
                + (", separated" if d.separated else "") for d in r.diffs if isinstance(d, FeatureSetDiff)]
    return join([head, *rows, *warnings_lines(r.warnings)])


def summary(r: JSON) -> str:
    which = f"{r.get('token_a')!r} vs {r.get('token_b')!r}" if r.get("mode") == "pair" else \
        f"{r.get('n_a')} vs {r.get('n_b')} prompts"
    return which + ": " + ", ".join(f"{d['feature']} {ls.fmt(d['difference'])}" for d in r.get("diffs", [])[:4])


def features(r: JSON) -> set[int]:
    return {d["feature"] for d in r.get("diffs") or []}


def cell(run: Redone) -> str:
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
    means = [(d["feature"], d["mean_a"], d["mean_b"], d["difference"], d["rank_biserial"]) for d in items(res["diffs"])]
    return f"""\
A = torch.stack([sae_acts({key!r}, p, prepend_bos={bos})[{pos}] for p in {lit(r['prompts_a'], 29)}])
B = torch.stack([sae_acts({key!r}, p, prepend_bos={bos})[{pos}] for p in {lit(r['prompts_b'], 29)}])
recorded = {lit(means, 11)}  # (feature, mean_a, mean_b, difference, rank_biserial)
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


SPEC = ToolSpec(
    name="compare_prompts",
    make=make,
    result=PromptComparison,
    render=render,
    annotations=read_only,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=(), bos="sae", resolve=None, features=features, keeps_runs=False,
                      looks_up=True, on_feature_page=False),
    export=ExportRule(cell=cell, helpers=(), note=None, details=None, label=None, score=None),
    replay=AS_GIVEN,
)
