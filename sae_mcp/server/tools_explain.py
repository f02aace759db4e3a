"""Explanations, labels, feature cards, logit-weight statistics and the investigation prompts.

register(server, tool, engine, settings) adds:
    tools       search_explanations, label_feature (the one writing tool), feature_card, feature_stats,
                token_set_enrichment
    resource    feature://{sae}/{feature}   the feature card as markdown ({sae} is the key, dots and all:
                feature://blocks.7.hook_resid_pre/123)
    prompts     one per markdown file in prompts/ (see load_prompts)
    pages       /features/{sae}/{feature} when the server runs over HTTP (server/http.py)

No `from __future__ import annotations` here: the SDK reads the tools' annotations at registration.
"""

import logging
import re
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.mcpserver.prompts.base import Prompt, PromptArgument
from mcp.types import ToolAnnotations
from pydantic import Field

from sae_mcp import cards
from sae_mcp.engine import stats
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import SaeMcpError
from sae_mcp.results.explain import (
    ExplanationMatch,
    ExplanationSearch,
    FeatureCardResult,
    FeatureStats,
    LabelRecorded,
    TokenSetEnrichment,
)
from sae_mcp.server import http
from sae_mcp.server.args import engine_args
from sae_mcp.settings import Settings
from sae_mcp.store.db import store_key_of

log = logging.getLogger(__name__)

WRITES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)



def register(server: Any, tool: Any, engine: Engine, settings: Settings, store: Any = None) -> cards.ExplainContext:
    ctx = cards.ExplainContext(engine, settings, store)
    max_k = engine.limits.max_top_k
    max_feats = engine.limits.max_features_per_call
    A = engine_args(engine)
    SaeArg, FeatureArg = A.Sae, A.Feature

    def key_of_source() -> dict[str, str]:
        """Store key (source + weights id) -> the key tools address the SAE by."""
        return {store_key_of(s): s.key for s in engine.saes.values()}

    @tool()
    def search_explanations(
        query: Annotated[str, Field(min_length=1, max_length=500, description="Words to look for, e.g. 'bible verses'")],
        sae: SaeArg = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Matches to return")] = 10,
    ) -> ExplanationSearch:
        """Search feature explanations: those imported (`sae-mcp explanations import`, e.g. Neuronpedia's export)
        and the labels recorded with label_feature. Ranked by FTS5 bm25, fused with sentence-embedding similarity
        when the optional semantic extra is installed (`ranking` says which). Without sae, searches every loaded SAE."""
        saes = [engine.sae(sae)] if sae else list(engine.saes.values())
        found, ranking = ctx.store.search(query, [store_key_of(s) for s in saes], top_k=top_k)
        keys = key_of_source()
        matches = [
            ExplanationMatch(feature=e.feature, sae=keys.get(e.sae, e.sae), description=e.description,
                             source=e.source, score=float(f"{e.score:.4g}"))  # digits, not decimals: bm25 can be ~1e-6
            for e in found
        ]
        note = None
        if not matches:
            total = sum(sum(ctx.store.counts(store_key_of(s)).values()) for s in saes)
            note = (
                "no explanation or label matched" if total else
                "nothing to search yet: import explanations (`sae-mcp explanations import --sae SPEC --neuronpedia`, or a "
                "JSON/JSONL/CSV file of {feature, description}) or record labels with label_feature"
            )
        return ExplanationSearch(query=query, ranking=ranking, matches=matches, note=note)

    @tool(annotations=WRITES)
    def label_feature(
        feature: FeatureArg,
        label: Annotated[str, Field(min_length=1, max_length=1000, description="What the feature responds to / does")],
        sae: SaeArg = None,
        evidence: Annotated[
            str | None,
            Field(max_length=4000, description="What supports the label: examples, tool results, ablation effects"),
        ] = None,
    ) -> LabelRecorded:
        """Record your own explanation of a feature, with the evidence behind it. Labels persist across restarts
        (for these weights: an SAE re-trained into the same folder starts without labels), are searchable at once with search_explanations (source 'label') and appear on the feature's card.
        Each call adds a label (earlier ones are kept)."""
        s = engine.sae(sae)
        engine.check_feature(s, feature)
        rec = ctx.store.add_label(store_key_of(s), feature, label, (evidence or "").strip() or None)
        n = sum(1 for e in ctx.store.for_feature(store_key_of(s), feature) if e.source == "label")
        return LabelRecorded(feature=feature, sae=s.key, label=rec.description, evidence=rec.evidence, labels_for_feature=n)

    @tool()
    def feature_card(
        feature: FeatureArg,
        sae: SaeArg = None,
        examples: Annotated[int, Field(ge=0, le=20, description="Top examples shown (from the corpus index)")] = 5,
        tokens: Annotated[int, Field(ge=1, le=50, description="Logit-lens tokens per side")] = 8,
    ) -> FeatureCardResult:
        """Everything known about one feature in one compact markdown card: explanations and labels, density,
        histogram and top examples from the corpus index (when built), the tokens its decoder promotes and
        suppresses, and its logit-weight statistics. Also readable as the resource feature://{sae}/{feature}."""
        s = engine.sae(sae)
        md = cards.card_markdown(ctx, feature, s.key, n_examples=examples, n_tokens=tokens)
        return FeatureCardResult(sae=s.key, feature=feature, uri=f"feature://{s.key}/{feature}", markdown=md)

    @tool()
    def feature_stats(
        sae: SaeArg = None,
        features: Annotated[
            list[Annotated[int, Field(ge=0, le=A.max_feature)]] | None,
            Field(max_length=max_feats, description="Only these features (default: every feature of the SAE)"),
        ] = None,
        sort_by: Annotated[
            str,
            Field(pattern="^(skewness|kurtosis|mean|std|density|feature)$", description="Column to sort by"),
        ] = "skewness",
        descending: Annotated[bool, Field(description="Largest first")] = True,
        top: Annotated[int, Field(ge=1, le=max_k, description="Features to return")] = 20,
        min_density: Annotated[float | None, Field(ge=0, le=1, description="Keep features firing at least this often (needs the index)")] = None,
        max_density: Annotated[float | None, Field(ge=0, le=1, description="Keep features firing at most this often (needs the index)")] = None,
    ) -> FeatureStats:
        """Statistics of each feature's logit weights W_dec[f] @ W_U over the vocabulary: mean, std, skewness and
        kurtosis (the tutorial's feature statistics), with density when the corpus is indexed. Sort and filter,
        e.g. the most skewed features (sort_by='skewness') are the ones that promote a few specific tokens.
        The mean is ~0 for every feature when the model's unembedding is mean-centred (transformer-lens'
        center_unembed, its default), since W_U's rows then sum to 0 over the vocabulary; compare features by
        std, skewness and kurtosis."""
        s = engine.sae(sae)
        dens = ctx.densities(s.key)
        return stats.feature_stats(
            engine, s.key, features=features, sort_by=sort_by, descending=descending, top=top, densities=dens,
            min_density=min_density, max_density=max_density,
        )

    @tool()
    def token_set_enrichment(
        sets: Annotated[
            list[Annotated[str, Field(max_length=64)]] | None,
            Field(max_length=16, description=f"Built-in sets: {', '.join(stats.BUILTIN_SETS)} (default: all, when no "
                  "token_sets/regex_sets are given). They leave out special tokens, byte-fallback pieces <0x..> "
                  "(bar whitespace) and tokens with control characters"),
        ] = None,
        token_sets: Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=4096)]] | None,
            Field(max_length=16, description="Named sets given as token lists, e.g. {\"days\": [\" Monday\", \" Tuesday\"]}"),
        ] = None,
        regex_sets: Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None,
            Field(max_length=16, description="Named sets given as a regex over each token's text, e.g. {\"years\": \"^ ?1[89][0-9]{2}$\"}"),
        ] = None,
        sae: SaeArg = None,
        features: Annotated[
            list[Annotated[int, Field(ge=0, le=A.max_feature)]] | None,
            Field(max_length=max_feats, description="Only these features (default: every feature)"),
        ] = None,
        top: Annotated[int, Field(ge=1, le=max_k, description="Features per set and direction")] = 10,
    ) -> TokenSetEnrichment:
        """Which features' logit weights (W_dec[f] @ W_U) are enriched for a set of tokens: per set, the features
        that most promote it and most suppress it. Score = rank-biserial r = 2*AUC-1 of the set's logit weights
        against the rest of the vocabulary (Mann-Whitney), in [-1, 1], with its z; the sign is the direction."""
        return stats.token_set_enrichment(
            engine, sets=sets, token_sets=token_sets, regex_sets=regex_sets, sae=sae, features=features, top=top
        )

    @server.resource(
        "feature://{sae}/{feature}",
        name="feature_card",
        title="Feature card",
        description="One feature's card (explanations, labels, index data, logit lens, statistics) as markdown. "
        "{sae} is the SAE key from model_info, e.g. feature://blocks.7.hook_resid_pre/123",
        mime_type="text/markdown",
    )
    def feature_resource(sae: str, feature: str) -> str:
        # ResourceError carries our message to the client (other exceptions become a generic error)
        try:
            f = int(feature)
        except ValueError:
            raise ResourceError(f"feature {feature!r} in the URI is not an integer: use feature://{sae}/123") from None
        try:
            return cards.card_markdown(ctx, f, sae)
        except SaeMcpError as exc:
            raise ResourceError(str(exc)) from exc

    for prompt in load_prompts():
        server.add_prompt(prompt)
    http.register_routes(server, ctx)
    return ctx


# ---------------------------------------------------------------------------------------------------------------
# Prompts: markdown recipes
#
# Where they are read from: $SAE_MCP_PROMPTS_DIR; else the top-level prompts/ beside the package (a source
# checkout or an editable install); else sae_mcp/_prompts, the copy that ships inside the wheel (kept identical
# to prompts/ by tests/test_cards.py). A file looks like
#
#     ---
#     title: Investigate a feature
#     description: One line saying when to use it.
#     arguments:
#     - feature (required): the feature index
#     - sae: SAE key; optional when one SAE is loaded
#     ---
#     The recipe, mentioning {feature} and {sae}, which are replaced by the arguments' values.


def prompts_dir() -> Path | None:
    import os

    here = Path(__file__).resolve().parents[1]  # sae_mcp/
    for candidate in (os.environ.get("SAE_MCP_PROMPTS_DIR"), here.parent / "prompts", here / "_prompts"):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("*.md")):
            return Path(candidate)
    return None


def parse_prompt(name: str, text: str) -> tuple[dict[str, str], list[PromptArgument], str]:
    """Front matter (title, description, arguments) and body of one recipe file."""
    meta: dict[str, str] = {}
    args: list[PromptArgument] = []
    body = text
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    if m:
        head, body = m.group(1), m.group(2)
        for line in head.splitlines():
            arg = re.match(r"^\s*-\s*(\w+)\s*(\(required\))?\s*:\s*(.*)$", line)
            if arg:
                args.append(PromptArgument(name=arg.group(1), required=bool(arg.group(2)), description=arg.group(3).strip()))
            elif ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                meta[k.strip()] = v.strip()
    return meta, args, body.strip() + "\n"


def load_prompts(folder: Path | None = None) -> list[Prompt]:
    folder = folder or prompts_dir()
    if folder is None:
        log.warning("no prompts/ folder found: the investigation recipes are not served")
        return []
    out = []
    for path in sorted(folder.glob("*.md")):
        meta, args, body = parse_prompt(path.stem, path.read_text(encoding="utf-8"))
        names = [a.name for a in args]

        def render(_body: str = body, _names: list[str] = names, **values: Any) -> str:
            text = _body
            for n in _names:
                v = values.get(n)
                text = text.replace("{" + n + "}", str(v) if v not in (None, "") else "(not given)")
            return text

        def make(_render=render, _names=names):
            # A fixed signature per prompt, so the SDK passes exactly the declared arguments.
            def fn(**values: Any) -> str:
                return _render(**{k: v for k, v in values.items() if k in _names})

            return fn

        out.append(
            Prompt(
                name=path.stem,
                title=meta.get("title"),
                description=meta.get("description", ""),
                arguments=args or None,
                fn=make(),
            )
        )
    return out
