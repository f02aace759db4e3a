"""Feature cards as text: markdown for the agent (the feature_card tool and feature:// resource) and HTML pages
for a person (the dashboard), both rendered from the same CardData (services/cards.py)."""

from __future__ import annotations

import html
from typing import Any

from sae_mcp.results.corpus import Example, FeatureSummary, Histogram
from sae_mcp.services import Services
from sae_mcp.services.cards import CardData, gather_card
from sae_mcp.store.explanations import Explanation

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4  # tokens shown around the firing token of an example


# ---------------------------------------------------------------------------------------------------------------
# Pieces shared by both renderers


def _window(ex: Example) -> tuple[list[str], str, list[str]]:
    """An example -> (tokens before, the firing token, tokens after), CONTEXT_BEFORE/AFTER of them."""
    pos = ex.position
    return ex.tokens[max(0, pos - CONTEXT_BEFORE) : pos], ex.token, ex.tokens[pos + 1 : pos + 1 + CONTEXT_AFTER]


def _hist_range(hist: Histogram) -> str:
    return f"{hist.edges[0]:.3g} .. {hist.edges[-1]:.3g}" if hist.edges else ""


def _sparkline(counts: list[int]) -> str:
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
    elif c.summary is not None:
        out.append(_activation_line(c.summary))
        if c.scan_note:
            out.append(c.scan_note)
        hist = c.summary.histogram
        if hist.counts:
            out.append(f"histogram `{_sparkline(hist.counts)}`" + (f" ({_hist_range(hist)})" if hist.edges else ""))
        if c.examples:
            out += ["", "Top examples (firing token in «»):"]
            for i, ex in enumerate(c.examples, start=1):
                before, tok, after = _window(ex)
                text = "".join(map(_tok, before)) + "«" + _tok(tok) + "»" + "".join(map(_tok, after))
                out.append(f"{i}. {ex.activation:.3g}: {text}")
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
    elif c.summary is not None:
        parts.append(f"<p>{e(_activation_line(c.summary))}</p>")
        if c.scan_note:
            parts.append(f"<p class='meta'>{e(c.scan_note)}</p>")
        hist = c.summary.histogram
        if hist.counts and max(hist.counts) > 0:
            top = max(hist.counts)
            bars = "".join(f"<div style='height:{100 * v / top:.1f}%' title='{v:g}'></div>" for v in hist.counts)
            rng = f"<p class='meta'>{_hist_range(hist)}</p>" if hist.edges else ""
            parts.append(f"<div class='hist'>{bars}</div>{rng}")
        for ex in c.examples:
            before, tok, after = _window(ex)
            text = e("".join(before)) + f"<mark>{e(tok)}</mark>" + e("".join(after))
            parts.append(f"<p class='ex'><span class='act'>{ex.activation:.3g}</span>{text}</p>")
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


def index_html(services: Services) -> str:
    """The dashboard's front page: the loaded SAEs and the features the agent has labelled."""
    e = html.escape
    store = services.explanations
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sae-mcp features</title>",
             f"<style>{CSS}</style></head><body><h1>sae-mcp features</h1>"]
    for s in services.engine.saes.values():
        key = s.store_key
        counts = store.counts(key)
        parts.append(
            f"<h2>{e(s.key)}</h2><p class='meta'>{s.d_sae} features · {counts['imported']} imported explanations · "
            f"{counts['labels']} labels</p>"
            f"<form action='/features/{e(s.key)}/' onsubmit=\"location.href=this.action+this.f.value;return false\">"
            f"feature <input name='f' type='number' min='0' max='{s.d_sae - 1}'> <button>open</button></form><ul>"
        )
        for f in store.labelled_features(key, limit=100):
            labels = [x.description for x in store.for_feature(key, f) if x.source == "label"]
            parts.append(f"<li><a href='/features/{e(s.key)}/{f}'>{f}</a> {e(labels[0] if labels else '')}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def _activation_line(s: FeatureSummary) -> str:
    """'density 0.0105 · of 100,015 tokens · max activation 2.01 · computed in float32' (markdown and HTML)."""
    parts = [f"density {s.density:.3g}"]
    if s.tokens_scanned:
        parts.append(f"of {s.tokens_scanned:,} tokens")
    parts.append(f"max activation {s.max_activation:.3g}")
    if s.compute_dtype:
        parts.append(f"computed in {s.compute_dtype}")
    return " · ".join(parts)


def card_markdown(services: Services, feature: int, sae: str | None = None, **kw: Any) -> str:
    return to_markdown(gather_card(services, feature, sae, **kw))


def card_html(services: Services, feature: int, sae: str | None = None, **kw: Any) -> str:
    return to_html(gather_card(services, feature, sae, **kw))
