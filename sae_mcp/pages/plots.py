"""Plots for the pages as inline markup (no image files, no script): the activation histogram as SVG with axes,
ticks and labels, and the logit lens as two bar lists."""

from __future__ import annotations

import html
import math

from sae_mcp.results.corpus import Histogram

W, H = 660, 244  # the histogram's viewBox
LEFT, RIGHT, TOP, BOTTOM = 60, 14, 28, 46  # its margins: room for the tick labels and the axis titles


def nice_step(span: float, n: int = 4) -> float:
    """A 1-2-5 step giving about n intervals over `span`."""
    raw = span / n if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values on a log axis from lo to hi (> 0): the decades inside, with 2 and 5 between them when fewer
    than three decades fall inside."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = [10.0**k for k in range(a, b + 1)]
    mults = (1,) if sum(lo <= d <= hi for d in decades) >= 3 else (1, 2, 5)
    ticks = [float(f"{m * d:.6g}") for d in decades for m in mults]
    return [t for t in ticks if lo * 0.999 <= t <= hi * 1.001]


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:g}"


def histogram_svg(hist: Histogram, n_fired: int, tokens: int) -> str:
    """The feature's positive activations per log-spaced bin: bars with a hover title each, the x axis in
    activation units (log scale) and the y axis in tokens."""
    if not hist.counts or max(hist.counts) <= 0:
        return "<p class='meta'>never fired on the scanned tokens: no histogram</p>"
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    lo, hi = hist.edges[0], hist.edges[-1]
    llo = math.log10(lo)
    lhi = math.log10(hi) if hi > lo else llo + 1

    def x(v: float) -> float:
        return LEFT + (math.log10(v) - llo) / (lhi - llo) * pw

    step = nice_step(max(hist.counts))
    ymax = step * math.ceil(max(hist.counts) / step)

    def y(c: float) -> float:
        return TOP + ph - c / ymax * ph

    density = n_fired / tokens if tokens else 0.0
    parts = [f"<svg class='hist' id='histogram' viewBox='0 0 {W} {H}' width='{W}' height='{H}' role='img' "
             f"aria-label='activation histogram: {n_fired:,} of {tokens:,} tokens fired'>",
             f"<text x='{W - RIGHT}' y='14' text-anchor='end'>density {density:.3g}: fired on {n_fired:,} of "
             f"{tokens:,} tokens</text>"]
    for i in range(int(round(ymax / step)) + 1):
        v = i * step
        parts.append(f"<line class='grid' x1='{LEFT}' x2='{W - RIGHT}' y1='{y(v):.1f}' y2='{y(v):.1f}'/>"
                     f"<text x='{LEFT - 6}' y='{y(v) + 4:.1f}' text-anchor='end'>{_num(v)}</text>")
    for a, b, c in zip(hist.edges[:-1], hist.edges[1:], hist.counts):
        if c <= 0:
            continue
        x0, x1 = x(a), x(b)
        share = c / n_fired if n_fired else 0.0
        parts.append(f"<rect class='bar' x='{x0 + 0.5:.1f}' y='{y(c):.1f}' width='{max(x1 - x0 - 1, 1):.1f}' "
                     f"height='{TOP + ph - y(c):.1f}' data-count='{c}'><title>{a:.3g} to {b:.3g}: {c:,} tokens "
                     f"({share:.1%} of firing tokens)</title></rect>")
    for t in log_ticks(lo, hi):
        parts.append(f"<line class='axis' x1='{x(t):.1f}' x2='{x(t):.1f}' y1='{TOP + ph}' y2='{TOP + ph + 4}'/>"
                     f"<text x='{x(t):.1f}' y='{TOP + ph + 16}' text-anchor='middle'>{t:g}</text>")
    parts += [
        f"<line class='axis' x1='{LEFT}' x2='{W - RIGHT}' y1='{TOP + ph}' y2='{TOP + ph}'/>",
        f"<line class='axis' x1='{LEFT}' x2='{LEFT}' y1='{TOP}' y2='{TOP + ph}'/>",
        f"<text x='{LEFT + pw / 2:.0f}' y='{H - 6}' text-anchor='middle'>activation (log scale; "
        "tokens where the feature fired)</text>",
        f"<text transform='translate(14 {TOP + ph / 2:.0f}) rotate(-90)' text-anchor='middle'>tokens</text>",
        "</svg>",
    ]
    return "".join(parts)


def bar_list(items: list[tuple[str, float]], kind: str, list_id: str) -> str:
    """Tokens with a bar each, its length proportional to |value| (the largest fills the track)."""
    e = html.escape
    top = max((abs(v) for _, v in items), default=0.0) or 1.0
    rows = "".join(
        f"<li data-value='{v:.6g}'><span class='tok' title='{e(repr(tok))}'>{e(repr(tok))}</span><span class='track'>"
        f"<span class='fill {kind}' style='display:block;width:{abs(v) / top * 100:.1f}%'></span></span>"
        f"<span class='num'>{v:+.3g}</span></li>"
        for tok, v in items
    )
    return f"<ul class='bl' id='{list_id}'>{rows}</ul>"
