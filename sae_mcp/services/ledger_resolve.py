"""A run's arguments as resolved, and the features it was about, for the ledger.

resolve(tool, given, defaults, result, ctx) -> the arguments the call actually ran with: the schema's defaults
filled in, the SAE's key (from the result), BOS as prepended, the answer's token ids, and per tool what an
exported notebook needs to redo the run without sae-mcp:
    steer_generate   seeds, the exact coefficients at scale 1 (strength x the feature's max activation, unrounded),
                     the doses, the control sets, the EOS id
    ablate_and_test  the ablated positions, the control sets
    attribute        the SAEs used, the metric's position
    top_examples     the corpus and its windows: context size, BOS and pad ids, tokens scanned (the windows are
                     the corpus' first ones up to that many tokens, re-read from the corpus)
    score_explanation  the seed drawn (the same seed gives the same blind set); label_feature with score likewise

features_of(tool, resolved, result) -> [feature]: the features named in the arguments and those a result lists,
so ledger(feature=...) finds every run that touched one.
Everything here reads what the call already computed (no device work): it runs before the answer is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sae_mcp.engine.logits import answer_token_ids
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import SaeMcpError

log = logging.getLogger(__name__)

SAE_TOOLS = ("get_feature_acts", "compare_prompts", "ablate_and_test", "steer_generate", "top_examples",
             "score_explanation", "patch_features")


@dataclass(frozen=True)
class ResolveContext:
    engine: Engine
    max_activation: Any = None  # (sae key, feature) -> (value, where): the example source's, for exact coefficients
    corpus_of: Any = None  # sae key -> the corpus dict of the environment, or None


def _ids(engine: Engine, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return answer_token_ids(engine, text)
    except SaeMcpError:
        return None


def _sae(ctx: ResolveContext, key: str | None):
    try:
        return ctx.engine.sae(key)
    except SaeMcpError:
        return None


def _steer(r: dict, result: dict, ctx: ResolveContext) -> None:
    r["seeds"] = result.get("seeds")
    r["scales"] = [float(x) for x in (r.get("strengths") or [1.0])]
    feats = result.get("features") or []
    coefficients = []
    for f in feats:
        m = None
        if r.get("calibration") == "max_activation" and ctx.max_activation is not None:
            try:  # the same cached value steering calibrated with: the result rounds it to 6 decimals
                found = ctx.max_activation(r["sae"], f["feature"])
                m = None if found is None else float(found[0])
            except Exception as exc:
                log.debug("max activation of %s not re-read: %s", f["feature"], exc)
        coefficients.append(f["strength"] * m if m is not None else f["coefficient"])
    r["coefficients"] = coefficients
    blocks = result.get("controls") or []
    r["control_sets"] = [run["features"] for run in blocks[0]["runs"]] if blocks else []
    r["eos_token_id"] = getattr(ctx.engine.model.tokenizer, "eos_token_id", None)


def _ablate(r: dict, result: dict) -> None:
    positions = result.get("positions")
    r["positions"] = positions if positions is not None else list(range(len(result.get("tokens") or [])))
    controls = result.get("controls")
    r["control_sets"] = [run["features"] for run in controls["runs"]] if controls else []


def _top_examples(r: dict, result: dict, ctx: ResolveContext, s) -> None:
    from sae_mcp.engine.scan import bos_id, windows_pad_id

    r["corpus"] = ctx.corpus_of(s.key) if ctx.corpus_of is not None else None
    r["context_size"] = result.get("context_size")
    r["bos_id"] = bos_id(ctx.engine, s)
    r["pad_id"] = windows_pad_id(ctx.engine)
    r["tokens_scanned"] = result.get("tokens_scanned")
    r["example_source"] = result.get("source")
    r["compute_dtype"] = result.get("compute_dtype")


def resolve(tool: str, given: dict, defaults: dict, result: dict | None, ctx: ResolveContext) -> dict:
    r: dict[str, Any] = {**defaults, **given}
    result = result or {}
    if isinstance(result.get("sae"), str):
        r["sae"] = result["sae"]
    s = _sae(ctx, r.get("sae")) if tool in SAE_TOOLS or tool == "label_feature" else None
    if s is not None:
        r["sae"] = s.key
        r["prepend_bos"] = s.prepend_bos
    if tool == "next_token":
        r["prepend_bos"] = bool(getattr(ctx.engine.model.cfg, "default_prepend_bos", True))
    for name in ("answer", "counterfactual"):
        if r.get(name) is not None:
            r[f"{name}_ids"] = _ids(ctx.engine, r[name])
    if tool == "steer_generate" and result:
        _steer(r, result, ctx)
    elif tool == "ablate_and_test" and result:
        _ablate(r, result)
    elif tool == "attribute" and result:
        r["saes"] = list((result.get("per_token") or {}).keys())
        r["position"] = result.get("position")
        keys = r["saes"]
        r["prepend_bos"] = ctx.engine.saes[keys[0]].prepend_bos if keys and keys[0] in ctx.engine.saes else None
    elif tool == "trace_circuit" and result:
        r["saes"] = list(result.get("saes") or [])
        keys = r["saes"]
        r["prepend_bos"] = ctx.engine.saes[keys[0]].prepend_bos if keys and keys[0] in ctx.engine.saes else None
    elif tool == "top_examples" and result and s is not None:
        _top_examples(r, result, ctx, s)
    elif tool == "score_explanation" and result:  # the seed drawn when none was given: replay asks for the same set
        drawn = (result.get("challenge") or result.get("score") or {}).get("seed")
        r["seed"] = drawn if drawn is not None else r.get("seed")
    elif tool == "label_feature" and isinstance(r.get("score"), dict) and (result.get("challenge") or {}).get(
            "seed") is not None:
        r["score"] = {**r["score"], "seed": result["challenge"]["seed"]}
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


def _result_features(tool: str, result: dict) -> set[int]:
    if tool == "get_feature_acts":
        return {a["feature"] for p in result.get("positions") or [] for a in p.get("top") or []}
    if tool == "compare_prompts":
        return {d["feature"] for d in result.get("diffs") or []}
    if tool == "submit_predictions" and isinstance(result.get("feature"), int):
        return {result["feature"]}
    if tool == "patch_features":
        return {e["feature"] for e in result.get("sweep") or []}
    if tool == "trace_circuit":
        return {n["feature"] for n in (result.get("graph") or {}).get("nodes") or [] if n.get("kind") == "feature"}
    if tool in ("attribute", "search_explanations"):
        return {d["feature"] for d in (result.get("top") if tool == "attribute" else result.get("matches")) or []}
    return set()


def features_of(tool: str, resolved: dict, result: dict | None) -> list[int]:
    args = _arg_features(resolved)
    return args + sorted(_result_features(tool, result or {}).difference(args))
