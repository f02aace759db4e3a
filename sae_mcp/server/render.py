"""PNG plots of results for humans and agents (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io

from sae_mcp.results.corpus import Histogram


def histogram_png(hist: Histogram, title: str) -> bytes:
    """A feature's activation histogram (log-spaced bins, as the tutorial plots it) -> PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.subplots()
    if hist.counts:
        lefts, rights = hist.edges[:-1], hist.edges[1:]
        widths = [right - left for left, right in zip(lefts, rights)]
        ax.bar(lefts, hist.counts, width=widths, align="edge", edgecolor="black", linewidth=0.4)
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "never fired on the scanned tokens", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("activation (tokens where the feature fired)")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
