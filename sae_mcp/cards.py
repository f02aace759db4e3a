"""Feature cards: the local dashboard of one feature, as markdown (MCP resource/tool) and as an HTML page.

A card gathers what is known about a feature without running anything long:
    explanations   the agent's labels and imported explanations (store/explanations.py)
    index          density, max activation, histogram and top examples, from the corpus index when one was built,
                   else from an on-demand top_examples scan of this feature already cached (the card says so and
                   over how many tokens); sae_mcp.examples is imported lazily. With neither the card says "not
                   indexed: run sae-mcp index": a card never starts a silent corpus scan
    logit lens     the tokens W_dec[f] @ W_U promotes and suppresses most (engine/logits.py)
    statistics     mean, std, skewness and kurtosis of those logit weights (engine/stats.py)
The same CardData renders to markdown for the agent and to HTML for a person, so both look at the same thing.
"""

from __future__ import annotations

import html
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from sae_mcp.engine import logits as lg
from sae_mcp.engine import stats
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput
from sae_mcp.results import VocabProjection, r
from sae_mcp.settings import Settings
from sae_mcp.store.db import store_key_of
from sae_mcp.store.explanations import Explanation, ExplanationStore

log = logging.getLogger(__name__)

NOT_INDEXED = "not indexed: call build_index (or run sae-mcp index)"
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4  # tokens shown around the firing token of an example


# ---------------------------------------------------------------------------------------------------------------
# Shared per-server state: the explanation store and the corpus index source, both opened on first use.


class ExplainContext:
    """What tools, resources and pages of this area share: the engine, settings, store and example source."""

    def __init__(self, engine: Engine, settings: Settings, store: ExplanationStore | None = None):
        self.engine, self.settings = engine, settings
        self._store, self._source = store, None
        self._lock = threading.Lock()

    @property
    def store(self) -> ExplanationStore:
        with self._lock:
            if self._store is None:
                m = self.engine.loaded_model
                self._store = ExplanationStore.for_model(self.settings.data_dir, m.name, m.source)
            return self._store

    def example_source(self) -> Any | None:
        """sae_mcp.examples.get_example_source(engine, settings), or None when the corpus area is absent or could
        not be opened. A failure is tried again on the next call (cheap: one cached source per engine), so an
        index or corpus that appears later is picked up without a restart."""
        with self._lock:
            if self._source is None:
                try:
                    from sae_mcp.examples import get_example_source
                except ImportError:
                    return None
                try:
                    self._source = get_example_source(self.engine, self.settings)
                except Exception as exc:  # an unreadable index must not break cards
                    log.warning("example index unavailable: %s", exc)
            return self._source

    def densities(self, sae_key: str) -> torch.Tensor | None:
        src = self.example_source()
        if src is None:
            return None
        try:
            return src.densities(sae_key)
        except Exception as exc:
            log.warning("densities unavailable for %s: %s", sae_key, exc)
            return None


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or key: the index's results may be pydantic models or plain dicts."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


# ---------------------------------------------------------------------------------------------------------------
# Gathering


@dataclass
class CardData:
    sae_key: str
    hook_name: str
    feature: int
    d_sae: int
    sae_source: str
    neuronpedia: str | None
    explanations: list[Explanation]
    projection: VocabProjection | None  # None when the decoder does not write to the residual stream
    moments: tuple[float, float, float, float] | None  # mean, std, skewness, kurtosis of W_dec[f] @ W_U
    lens_note: str | None = None  # why there is no logit lens
    index_note: str | None = None  # None when indexed, else why not
    density: float | None = None
    max_activation: float | None = None
    tokens_scanned: int | None = None
    histogram: Any = None
    examples: list[Any] = field(default_factory=list)
    compute_dtype: str | None = None  # the precision the index/scan computed activations in, when recorded
    scan_note: str | None = None  # set when the activations come from a cached on-demand scan, not the index


def gather(ctx: ExplainContext, feature: int, sae: str | None = None, n_examples: int = 5, n_tokens: int = 8) -> CardData:
    engine = ctx.engine
    s = engine.sae(sae)
    engine.check_feature(s, feature)
    projection, moments, lens_note = None, None, None
    try:
        projection = lg.project_to_vocab(engine, feature, sae=s.key, top_k=n_tokens)
        with engine.device_work():
            m = [r(v) for v in stats.logit_weight_moments(engine, s, [feature])[0].tolist()]
        moments = (m[0], m[1], m[2], m[3])  # rounded as feature_stats rounds them: a centred mean reads 0
    except InvalidInput as exc:  # e.g. an SAE on hook_mlp_pre: no direct path to the unembedding
        lens_note = f"no logit lens: {exc}"
    card = CardData(
        sae_key=s.key,
        hook_name=s.hook_name,
        feature=feature,
        d_sae=s.d_sae,
        sae_source=s.source,
        neuronpedia=f"{s.neuronpedia_id}/{feature}" if s.neuronpedia_id else None,
        explanations=ctx.store.for_feature(store_key_of(s), feature),
        projection=projection,
        moments=moments,
        lens_note=lens_note,
    )
    src = ctx.example_source()
    if src is None:
        card.index_note = NOT_INDEXED
        return card
    try:
        summary = src.feature_summary(s.key, feature)
        top = None
        if summary is None:
            # Not indexed, but top_examples may already have scanned this feature: show that (cached, no scan).
            cached = getattr(src, "cached_top_examples", None)
            top = cached(s.key, feature, k=max(n_examples, 1)) if cached is not None else None
            if top is None:
                card.index_note = NOT_INDEXED
                return card
            summary = top
            card.scan_note = (
                f"from an on-demand top_examples scan of this feature over {_get(top, 'tokens_scanned', 0):,} tokens "
                "(not indexed: build_index or `sae-mcp index` covers every feature)"
            )
        card.density = _get(summary, "density")
        card.max_activation = _get(summary, "max_activation")
        card.tokens_scanned = _get(summary, "tokens_scanned")
        card.histogram = _get(summary, "histogram")
        card.compute_dtype = _get(summary, "compute_dtype")
        if n_examples:
            if top is None:
                top = src.top_examples(s.key, feature, k=n_examples)
            card.examples = list(_get(top, "examples", []) or [])[:n_examples]
    except Exception as exc:  # the index is another area's: report, never fail the card
        log.warning("index read failed for %s/%d: %s", s.key, feature, exc)
        card.index_note = f"index unavailable ({type(exc).__name__}: {exc}); call build_index or run sae-mcp index"
    return card


# ---------------------------------------------------------------------------------------------------------------
# Pieces shared by both renderers


def _window(ex: Any) -> tuple[list[str], str, list[str], float]:
    """An example -> (tokens before, the firing token, tokens after, activation)."""
    tokens = list(_get(ex, "tokens", []) or [])
    pos = int(_get(ex, "position", 0) or 0)
    pos = min(max(pos, 0), max(len(tokens) - 1, 0))
    before = tokens[max(0, pos - CONTEXT_BEFORE) : pos]
    after = tokens[pos + 1 : pos + 1 + CONTEXT_AFTER]
    return before, tokens[pos] if tokens else "", after, float(_get(ex, "activation", 0.0) or 0.0)


def _hist_counts(hist: Any) -> tuple[list[float], float | None, float | None]:
    """Whatever shape the index gives (counts+edges object/dict, or a list of counts) -> (counts, lo, hi)."""
    if hist is None:
        return [], None, None
    if isinstance(hist, (list, tuple)):
        return [float(c) for c in hist], None, None
    counts = _get(hist, "counts") or []
    edges = _get(hist, "edges") or _get(hist, "bin_edges") or []
    lo = float(edges[0]) if len(edges) else None
    hi = float(edges[-1]) if len(edges) else None
    return [float(c) for c in counts], lo, hi


def _sparkline(counts: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    if not counts or max(counts) <= 0:
        return ""
    top = max(counts)
    return "".join(bars[min(len(bars) - 1, int(c / top * (len(bars) - 1) + 0.5))] if c > 0 else " " for c in counts)


def _tok(t: str) -> str:
    """A token made visible: spaces kept, newlines shown as ⏎."""
    return t.replace("\n", "⏎")


def _explainer(e: Explanation) -> str:
    return f"{e.source}" + (f", {e.explainer}" if e.explainer else "")


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def to_markdown(c: CardData) -> str:
    out = [f"# Feature {c.feature} · {c.sae_key}"]
    meta = f"hook `{c.hook_name}` · {c.d_sae} features · SAE `{c.sae_source}`"
    if c.neuronpedia:
        meta += f" · Neuronpedia `{c.neuronpedia}`"
    out += [meta, "", "## Explanations"]
    if not c.explanations:
        out.append("none yet: record one with label_feature, or `sae-mcp explanations import`")
    for e in c.explanations:
        if e.source == "label":
            out.append(f"- label: {e.description}" + (f" (evidence: {e.evidence})" if e.evidence else ""))
        else:
            out.append(f"- {e.description} ({_explainer(e)})")
    out += ["", "## Activations"]
    if c.index_note:
        out.append(c.index_note)
    else:
        out.append(_activation_line(c))
        if c.scan_note:
            out.append(c.scan_note)
        counts, lo, hi = _hist_counts(c.histogram)
        if counts:
            rng = f" ({lo:.3g} .. {hi:.3g})" if lo is not None else ""
            out.append(f"histogram `{_sparkline(counts)}`{rng}")
        if c.examples:
            out += ["", "Top examples (firing token in «»):"]
            for i, ex in enumerate(c.examples, start=1):
                before, tok, after, act = _window(ex)
                text = "".join(map(_tok, before)) + "«" + _tok(tok) + "»" + "".join(map(_tok, after))
                out.append(f"{i}. {act:.3g}: {text}")
    p = c.projection
    out += ["", "## Logit lens (W_dec[f] @ W_U)"]
    if p is None or c.moments is None:
        out.append(c.lens_note or "no logit lens")
        return "\n".join(out) + "\n"
    out.append("promotes: " + ", ".join(f"{t.token!r} {t.logit:.3g}" for t in p.top_positive))
    out.append("suppresses: " + ", ".join(f"{t.token!r} {t.logit:.3g}" for t in p.top_negative))
    mean, std, skew, kurt = c.moments
    out.append(f"logit weights: mean {mean:.3g}, std {std:.3g}, skewness {skew:.3g}, kurtosis {kurt:.3g}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.5rem;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9rem}code,.tok{font-family:ui-monospace,monospace}
mark{background:#ffb347;padding:0 .1em;border-radius:2px}.ex{white-space:pre-wrap;margin:.3rem 0}
.act{display:inline-block;min-width:4rem;color:#666}.label{font-weight:600}
.hist{display:flex;align-items:flex-end;height:60px;gap:1px}.hist div{background:#4a78c2;flex:1}
table{border-collapse:collapse}td{padding:.1rem .6rem}.pos{color:#1a7f37}.neg{color:#b42318}
"""


def to_html(c: CardData) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Feature {c.feature} · {e(c.sae_key)}</title><style>{CSS}</style></head><body>",
        f"<h1 id='title'>Feature {c.feature} · {e(c.sae_key)}</h1>",
        f"<p class='meta'>hook <code>{e(c.hook_name)}</code> · {c.d_sae} features · SAE <code>{e(c.sae_source)}</code>"
        + (f" · Neuronpedia <code>{e(c.neuronpedia)}</code>" if c.neuronpedia else "")
        + "</p>",
        "<h2>Explanations</h2><ul id='explanations'>",
    ]
    if not c.explanations:
        parts.append("<li>none yet: record one with label_feature, or <code>sae-mcp explanations import</code></li>")
    for x in c.explanations:
        if x.source == "label":
            ev = f" <span class='meta'>evidence: {e(x.evidence)}</span>" if x.evidence else ""
            parts.append(f"<li class='label'>label: {e(x.description)}{ev}</li>")
        else:
            parts.append(f"<li>{e(x.description)} <span class='meta'>({e(_explainer(x))})</span></li>")
    parts.append("</ul><h2>Activations</h2><div id='activations'>")
    if c.index_note:
        parts.append(f"<p>{e(c.index_note)}</p>")
    else:
        parts.append(f"<p>{e(_activation_line(c))}</p>")
        if c.scan_note:
            parts.append(f"<p class='meta'>{e(c.scan_note)}</p>")
        counts, lo, hi = _hist_counts(c.histogram)
        if counts and max(counts) > 0:
            top = max(counts)
            bars = "".join(f"<div style='height:{100 * v / top:.1f}%' title='{v:g}'></div>" for v in counts)
            rng = f"<p class='meta'>{lo:.3g} .. {hi:.3g}</p>" if lo is not None else ""
            parts.append(f"<div class='hist'>{bars}</div>{rng}")
        for ex in c.examples:
            before, tok, after, act = _window(ex)
            text = e("".join(before)) + f"<mark>{e(tok)}</mark>" + e("".join(after))
            parts.append(f"<p class='ex'><span class='act'>{act:.3g}</span>{text}</p>")
    parts.append("</div>")
    p = c.projection
    if p is None or c.moments is None:
        parts += ["<h2>Logit lens</h2>", f"<p id='logits'>{e(c.lens_note or 'no logit lens')}</p></body></html>"]
        return "".join(parts)
    rows = "".join(
        f"<tr><td class='pos tok'>{e(repr(a.token))}</td><td>{a.logit:.3g}</td>"
        f"<td class='neg tok'>{e(repr(b.token))}</td><td>{b.logit:.3g}</td></tr>"
        for a, b in zip(p.top_positive, p.top_negative)
    )
    mean, std, skew, kurt = c.moments
    parts += [
        "<h2>Logit lens (W_dec[f] @ W_U)</h2>",
        f"<table id='logits'><tr><th>promotes</th><th></th><th>suppresses</th><th></th></tr>{rows}</table>",
        f"<p id='moments'>logit weights: mean {mean:.3g}, std {std:.3g}, skewness {skew:.3g}, kurtosis {kurt:.3g}</p>",
        "<p class='meta'><a href='/'>all features</a></p></body></html>",
    ]
    return "".join(parts)


def index_html(ctx: ExplainContext) -> str:
    """The dashboard's front page: the loaded SAEs and the features the agent has labelled."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sae-mcp features</title>",
             f"<style>{CSS}</style></head><body><h1>sae-mcp features</h1>"]
    for s in ctx.engine.saes.values():
        key = store_key_of(s)
        counts = ctx.store.counts(key)
        parts.append(
            f"<h2>{e(s.key)}</h2><p class='meta'>{s.d_sae} features · {counts['imported']} imported explanations · "
            f"{counts['labels']} labels</p>"
            f"<form action='/features/{e(s.key)}/' onsubmit=\"location.href=this.action+this.f.value;return false\">"
            f"feature <input name='f' type='number' min='0' max='{s.d_sae - 1}'> <button>open</button></form><ul>"
        )
        for f in ctx.store.labelled_features(key, limit=100):
            labels = [x.description for x in ctx.store.for_feature(key, f) if x.source == "label"]
            parts.append(f"<li><a href='/features/{e(s.key)}/{f}'>{f}</a> {e(labels[0] if labels else '')}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def _activation_line(c) -> str:
    """'density 0.0105 · of 100,015 tokens · max activation 2.01 · computed in float32' (markdown and HTML)."""
    parts = []
    if c.density is not None:
        parts.append(f"density {c.density:.3g}")
    if c.tokens_scanned:
        parts.append(f"of {c.tokens_scanned:,} tokens")
    if c.max_activation is not None:
        parts.append(f"max activation {c.max_activation:.3g}")
    if c.compute_dtype:
        parts.append(f"computed in {c.compute_dtype}")
    return " · ".join(parts) or "indexed"


def card_markdown(ctx: ExplainContext, feature: int, sae: str | None = None, **kw: Any) -> str:
    return to_markdown(gather(ctx, feature, sae, **kw))


def card_html(ctx: ExplainContext, feature: int, sae: str | None = None, **kw: Any) -> str:
    return to_html(gather(ctx, feature, sae, **kw))


__all__ = ["CardData", "ExplainContext", "NOT_INDEXED", "card_html", "card_markdown", "gather", "index_html"]
