"""Feature cards as text: markdown for the agent (the feature_card tool and feature:// resource), rendered from
CardData (cards/data.py). The person's HTML page of the same card is pages/routes.py's."""

from __future__ import annotations

import json

from sae_mcp.cards.data import CardData, gather_card
from sae_mcp.one_line import shown
from sae_mcp.results.corpus import Example, FeatureSummary, Histogram
from sae_mcp.services import Services
from sae_mcp.store.explanations import Explanation

CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4  # tokens shown around the firing token of an example
CARD_CHARS = 400  # characters of a label, an explanation or its evidence a card shows (label_feature takes 1,000)


# ---------------------------------------------------------------------------------------------------------------
# Pieces shared with the pages (pages/routes.py)


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


def explainer_of(e: Explanation) -> str:
    return f"{e.source}" + (f", {e.explainer}" if e.explainer else "")


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def _scored(c: CardData, text: str) -> str:
    """' · scored (...): detection 0.85 (95% 0.70-0.95, n=20)', the newest score per method; '' when never scored."""
    parts = [f"{sc.method} {sc.metrics['balanced_accuracy']:.2f} (95% {sc.metrics['interval_95'][0]:.2f}-"
             f"{sc.metrics['interval_95'][1]:.2f}, n={sc.n})" for sc in c.scores_of(text)]
    return " · scored (balanced accuracy, 0.5 = chance): " + "; ".join(parts) if parts else ""


def quoted(text: str, max_chars: int = CARD_CHARS) -> str:
    """Text the agent or an import wrote, as a quoted one-line string (JSON's quoting: a quote inside is \\"), cut to
    max_chars: it reads as data, and cannot close its quotes, start a heading or forge a section of the card."""
    line, left_out = shown(text, max_chars)
    return json.dumps(line, ensure_ascii=False) + (f" (+{left_out:,} characters)" if left_out else "")


def _explanation_lines(c: CardData) -> list[str]:
    out = []
    for e in c.explanations:
        if e.source == "label":
            out.append(f"- label: {quoted(e.description)}" + (f" (evidence: {quoted(e.evidence)})" if e.evidence
                                                              else "") + _scored(c, e.description))
        else:
            out.append(f"- {quoted(e.description)} ({shown(explainer_of(e), 80)[0]})" + _scored(c, e.description))
    for n, what in ((c.more_labels, "older labels"), (c.more_imported, "more imported explanations")):
        if n:
            out.append(f"- {n:,} {what} not shown")
    unrecorded, more = c.scored_unrecorded()
    out += [f"- scored, not recorded: {quoted(text)}" + _scored(c, text) for text in unrecorded]
    if more:
        out.append(f"- {more:,} more scored texts not shown")
    return out or ["none yet: record one with label_feature, or `sae-mcp explanations import`"]


def to_markdown(c: CardData) -> str:
    out = [f"# Feature {c.feature} · {c.sae_key}"]
    meta = f"hook `{c.hook_name}` · {c.d_sae} features · SAE `{c.sae_source}`"
    if c.neuronpedia:
        meta += f" · Neuronpedia `{c.neuronpedia}`"
    out += [meta, "", "## Explanations", *_explanation_lines(c)]
    out += ["", "## Activations"]
    if c.index_note:
        out.append(c.index_note)
    elif c.summary is not None:
        out.append(activation_line(c.summary))
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


def activation_line(s: FeatureSummary) -> str:
    """'density 0.0105 · of 100,015 tokens · max activation 2.01 · computed in float32' (markdown and HTML)."""
    parts = [f"density {s.density:.3g}"]
    if s.tokens_scanned:
        parts.append(f"of {s.tokens_scanned:,} tokens")
    parts.append(f"max activation {s.max_activation:.3g}")
    if s.compute_dtype:
        parts.append(f"computed in {s.compute_dtype}")
    return " · ".join(parts)


def card_markdown(services: Services, feature: int, sae: str | None = None, n_examples: int = 5, n_tokens: int = 8
                  ) -> str:
    return to_markdown(gather_card(services, feature, sae, n_examples, n_tokens))
