"""A run's arguments as resolved, and the features it was about, for the ledger.

resolve(rule, given, defaults, result, ctx) -> the arguments the call actually ran with: the schema's defaults
filled in, the SAE's key (from the result), BOS as prepended (rule.bos), the answer's token ids, then what the
tool's own rule adds for an exported notebook to redo the run without sae-mcp (rule.resolve, in the tool's module:
steering's exact coefficients and seeds, the ablated positions, the corpus windows of top_examples, the seed a
blind set was drawn with, ...).

features_of(rule, resolved, result) -> [feature]: the features named in the arguments and those its result lists
(rule.features), so ledger(feature=...) finds every run that touched one.
Everything here reads what the call already computed (no device work): it runs before the answer is sent.
"""

from __future__ import annotations

from typing import Any

from sae_mcp.engine.logits import answer_token_ids
from sae_mcp.errors import SaeMcpError
from sae_mcp.ledger.rule import LedgerRule, ResolveContext


def _ids(ctx: ResolveContext, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return answer_token_ids(ctx.engine, text)
    except SaeMcpError:
        return None


def resolve(rule: LedgerRule, given: dict, defaults: dict, result: dict | None, ctx: ResolveContext) -> dict:
    r: dict[str, Any] = {**defaults, **given}
    result = result or {}
    if isinstance(result.get("sae"), str):
        r["sae"] = result["sae"]
    s = ctx.sae(r.get("sae")) if rule.bos == "sae" else None
    if s is not None:
        r["sae"] = s.key
        r["prepend_bos"] = s.prepend_bos
    if rule.bos == "model":
        r["prepend_bos"] = bool(getattr(ctx.engine.model.cfg, "default_prepend_bos", True))
    for name in ("answer", "counterfactual"):
        if r.get(name) is not None:
            r[f"{name}_ids"] = _ids(ctx, r[name])
    if rule.resolve is not None and result:
        r.update(rule.resolve(r, result, ctx))
    return r


def _arg_features(resolved: dict) -> list[int]:
    out = []
    if isinstance(resolved.get("feature"), int):
        out.append(resolved["feature"])
    for f in resolved.get("features") or []:
        if isinstance(f, int):
            out.append(f)
        elif isinstance(f, dict) and isinstance(f.get("feature"), int):
            out.append(f["feature"])
    return out


def features_of(rule: LedgerRule, resolved: dict, result: dict | None) -> list[int]:
    args = _arg_features(resolved)
    listed = set(rule.features(result)) if rule.features is not None and result else set()
    return args + sorted(listed.difference(args))
