"""PNG plots of results for humans and agents (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import textwrap

from sae_mcp.results.corpus import Histogram

TITLE_CHARS = 64  # a title line's width at the title's font size in the 6-inch figure; longer titles wrap


def histogram_figure(hist: Histogram, title: str):
    """A feature's activation histogram (log-spaced bins, as the tutorial plots it) as a matplotlib Figure: bars
    over a log activation axis, counts in tokens, the title wrapped to the figure's width (never clipped)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    if hist.counts:
        lefts, rights = hist.edges[:-1], hist.edges[1:]
        widths = [right - left for left, right in zip(lefts, rights)]
        ax.bar(lefts, hist.counts, width=widths, align="edge", color="#4a78c2", edgecolor="black", linewidth=0.4)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.text(0.5, 0.5, "never fired on the scanned tokens", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("activation (log scale; tokens where the feature fired)")
    ax.set_ylabel("tokens (count per bin)")
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_title(textwrap.fill(title, TITLE_CHARS), fontsize=10)
    return fig


def histogram_png(hist: Histogram, title: str) -> bytes:
    """The histogram figure as PNG bytes, cropped to what was drawn (bbox 'tight': a long tick label or title
    widens the image rather than being cut off)."""
    fig = histogram_figure(hist, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.08)
    return buf.getvalue()
