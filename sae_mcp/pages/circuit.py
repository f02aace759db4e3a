"""The circuit page, /circuits/<run_id>: a trace_circuit graph drawn for a person, from the graph kept whole under
the run id of the call (circuits/store.py).

The drawing is inline SVG, read bottom to top like the model: one row per traced SAE by layer, the metric's node
in a row above the last, one column per token position with the prompt's tokens along the bottom (a position
without a node gets a narrow column, so the sentence stays readable and the width follows the nodes). A node's size
grows with sqrt(|attribution|); features are circles linking to their feature pages and showing their label as
it was when traced, error nodes squares, the metric a diamond; an edge's width grows with |weight| and its colour
is its sign (green raises the metric, red lowers it). Hovering shows the numbers: SVG <title> elements, native
tooltips that need no script (the pages' CSP runs none here). Beside it as text: the metric, the faithfulness
figures, the counts, the strongest paths and every node in a table.

Every string from the graph (labels, tokens, the prompt, SAE keys) is escaped here: labels and tokens are untrusted.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from urllib.parse import quote

from pydantic import ValidationError

from sae_mcp.circuits.store import MAX_GRAPHS
from sae_mcp.errors import NotFound
from sae_mcp.one_line import shown
from sae_mcp.pages.assets import CSS, visible
from sae_mcp.results.circuits import CircuitEdge, CircuitGraph, CircuitNode, CircuitResult
from sae_mcp.services import Services

e = html.escape
MAX_RUN_ID = 64  # a ledger run id is 'r' + 8 characters; anything much longer is not one
MAX_DRAWN_EDGES = 1_500  # the strongest edges drawn (a 256-node trace has 16,132: unreadable, and 3 MB of SVG)
LEFT, TOP, AXIS = 176, 16, 46  # px: the row labels' margin, above the metric row, the token axis
COL_W, EMPTY_COL_W = 86, 36  # px: a column with nodes, one without
SLOT_H, ROW_GAP, METRIC_ROW = 32, 30, 40  # px: a stacked node, between rows, the metric's row
R_MIN, R_MAX = 3.0, 12.0  # px: node radius at attribution 0 and at the graph's largest |attribution|
SIGN = {True: "#1a7f37", False: "#cf222e"}  # raises / lowers the metric (the pages' --pos / --neg)
LABEL_CHARS, TOKEN_CHARS, TITLE_CHARS = 11, 12, 300  # characters of a label / token drawn, of a label in a tooltip
TABLE_LABEL_CHARS = 200

CIRCUIT_CSS = """
body{max-width:min(110rem,96vw)}
.circuit-wrap{overflow-x:auto;border:1px solid var(--line);border-radius:4px;margin:.6rem 0;background:#fff}
svg.circuit text{font:10px system-ui,sans-serif;fill:var(--ink)}svg.circuit .rowname{font-size:11px;fill:var(--muted)}
svg.circuit .tok{font:11px ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre}
svg.circuit .tok.quiet,svg.circuit .pos-n{fill:#8c959f}svg.circuit .grid{stroke:#eaeef2}
svg.circuit .edge{fill:none}svg.circuit .edge:hover{stroke-opacity:1}
svg.circuit .node:hover circle,svg.circuit .node:hover rect,svg.circuit .node:hover polygon{stroke:#0969da;
stroke-width:2.5}svg.circuit a text{fill:#0969da}svg.circuit .lab{fill:var(--muted)}
dl.figs{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;font-size:.92rem}
dl.figs dt{color:var(--muted)}dl.figs dd{margin:0}.legend{font-size:.85rem;color:var(--muted)}
ol.paths li{margin:.25rem 0;font-size:.9rem}
"""


def circuit_url(run_id: str) -> str:
    return f"/circuits/{quote(run_id, safe='')}"


def feature_href(sae: str, feature: int) -> str:
    return f"/features/{quote(sae, safe='')}/{feature}"


def circuit_page(services: Services, run_id: str) -> str:
    """The page of the circuit kept under run_id; NotFound (a 404 page) when none is."""
    stored = services.circuits.get(run_id) if len(run_id) <= MAX_RUN_ID else None
    if stored is None:
        raise NotFound(f"no circuit is kept for run id {run_id!r}: a circuit page exists for each trace_circuit call "
                       f"the ledger recorded (the newest {MAX_GRAPHS} are kept)")
    try:
        result = CircuitResult.model_validate({**stored.summary, "graph": stored.graph})
    except ValidationError as exc:
        raise NotFound(f"run {run_id!r} kept a circuit this version cannot read ({exc.error_count()} fields "
                       "differ)") from exc
    return render_circuit(run_id, result)


def render_circuit(run_id: str, result: CircuitResult) -> str:
    g = result.graph
    drawing = layout(g)
    return "".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
        f"content='width=device-width,initial-scale=1'><title>Circuit · {e(run_id)}</title>"
        f"<style>{CSS}{CIRCUIT_CSS}</style></head><body>",
        "<nav><a href='/'>all features</a></nav>",
        f"<h1 id='title'>Circuit · run <code>{e(run_id)}</code></h1>",
        f"<p class='meta'>prompt <span class='ex'>{e(json.dumps(g.prompt, ensure_ascii=False))}</span> · "
        f"{len(g.saes)} SAEs: {', '.join(f'<code>{e(s)}</code>' for s in g.saes)}</p>",
        _figures(result, drawing),
        f"<div class='circuit-wrap'>{svg(g, drawing)}</div>",
        _legend(g),
        _paths(result, {n.node_id: n for n in g.nodes}),
        _node_table(g),
        "</body></html>",
    ])


# ---------------------------------------------------------------------------------------------------------------
# Layout


@dataclass
class Layout:
    columns: list[tuple[float, float]]  # per position: (x where it starts, its width)
    rows: dict[str | None, tuple[float, float]]  # SAE key (None: the metric) -> (y of its top, its height)
    at: dict[str, tuple[float, float]] = field(default_factory=dict)  # node_id -> its centre
    radius: dict[str, float] = field(default_factory=dict)
    edges: list[CircuitEdge] = field(default_factory=list)  # drawn, strongest first
    width: float = 0.0
    height: float = 0.0


def layout(g: CircuitGraph) -> Layout:
    """Where each node sits: its SAE's row (first SAE at the bottom), its position's column, stacked within the
    cell by |attribution| (largest on top)."""
    cells: dict[tuple[str | None, int], list[CircuitNode]] = {}
    for n in g.nodes:
        pos = g.position if n.kind == "metric" else n.position
        cells.setdefault((None if n.kind == "metric" else n.sae, pos if pos is not None else g.position), []).append(n)
    for stack in cells.values():
        stack.sort(key=lambda n: -abs(n.attribution or 0.0))
    used = {pos for _, pos in cells}
    columns, x = [], float(LEFT)
    for pos in range(len(g.tokens)):
        w = COL_W if pos in used else EMPTY_COL_W
        columns.append((x, float(w)))
        x += w
    rows, y = {}, float(TOP)
    for key in [None, *reversed(g.saes)]:
        deepest = max((len(s) for (k, _), s in cells.items() if k == key), default=1)
        h = float(METRIC_ROW if key is None else deepest * SLOT_H)
        rows[key] = (y, h)
        y += h + ROW_GAP
    out = Layout(columns=columns, rows=rows, width=x + 16, height=y - ROW_GAP + AXIS)
    biggest = max((abs(n.attribution or 0.0) for n in g.nodes if n.kind != "metric"), default=0.0) or 1.0
    for (key, pos), stack in cells.items():
        if key not in rows or not 0 <= pos < len(columns):
            continue  # a node of an SAE the graph does not list, or off the prompt: nothing to place it by
        top, _ = rows[key]
        for i, n in enumerate(stack):
            out.at[n.node_id] = (columns[pos][0] + R_MAX + 6, top + (METRIC_ROW / 2 if key is None else
                                                                       i * SLOT_H + SLOT_H / 2))
            out.radius[n.node_id] = R_MIN + (R_MAX - R_MIN) * math.sqrt(abs(n.attribution or 0.0) / biggest)
    drawable = [x for x in g.edges if x.source in out.at and x.target in out.at]
    out.edges = sorted(drawable, key=lambda x: -abs(x.weight))[:MAX_DRAWN_EDGES]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The SVG


def svg(g: CircuitGraph, d: Layout) -> str:
    parts = [f"<svg class='circuit' id='circuit' xmlns='http://www.w3.org/2000/svg' width='{d.width:.0f}' "
             f"height='{d.height:.0f}' viewBox='0 0 {d.width:.0f} {d.height:.0f}' aria-label='circuit graph'>"]
    parts += _rows(g, d)
    parts.append("<g class='edges'>")
    strongest = max((abs(x.weight) for x in d.edges), default=0.0) or 1.0
    parts += [_edge(x, d, strongest, g.metric) for x in reversed(d.edges)]  # the strongest drawn last, on top
    parts.append("</g><g class='nodes'>")
    parts += [_node(n, d, g) for n in g.nodes if n.node_id in d.at]
    parts.append("</g></svg>")
    return "".join(parts)


def _rows(g: CircuitGraph, d: Layout) -> list[str]:
    """Row names at the left, faint row lines, and the tokens along the bottom with their positions."""
    parts = []
    layers = {n.sae: n.layer for n in g.nodes if n.sae is not None}
    for key, (top, h) in d.rows.items():
        mid = top + h / 2
        name = "metric" if key is None else f"layer {layers.get(key, '?')}"
        sub = g.metric if key is None else key
        parts.append(f"<text class='rowname' x='8' y='{mid - 2:.1f}'>{e(name)}</text>"
                     f"<text class='rowname' x='8' y='{mid + 11:.1f}'><title>{e(sub)}</title>"
                     f"{e(_cut(sub, 26))}</text>"
                     f"<line class='grid' x1='{LEFT}' x2='{d.width - 8:.0f}' y1='{mid:.1f}' y2='{mid:.1f}'/>")
    base = d.height - AXIS + 18
    for pos, (x, w) in enumerate(d.columns):
        quiet = "" if w == COL_W else " quiet"
        tok = g.tokens[pos]
        parts.append(f"<text class='tok{quiet}' x='{x + 4:.0f}' y='{base:.0f}'><title>position {pos}: "
                     f"{e(json.dumps(tok, ensure_ascii=False))}</title>{e(_cut(visible(tok), TOKEN_CHARS))}</text>"
                     f"<text class='pos-n' x='{x + 4:.0f}' y='{base + 14:.0f}'>{pos}</text>")
    return parts


def _edge(x: CircuitEdge, d: Layout, strongest: float, metric: str) -> str:
    (x1, y1), (x2, y2) = d.at[x.source], d.at[x.target]
    share = abs(x.weight) / strongest
    mid = (y1 + y2) / 2
    colour = SIGN[x.weight >= 0]
    sign = "pos" if x.weight >= 0 else "neg"
    return (f"<path class='edge {sign}' d='M{x1:.1f} {y1:.1f} C{x1:.1f} {mid:.1f},{x2:.1f} {mid:.1f},{x2:.1f} "
            f"{y2:.1f}' stroke='{colour}' stroke-width='{0.6 + 5.4 * share:.2f}' "
            f"stroke-opacity='{0.15 + 0.7 * share:.2f}' data-source='{e(x.source)}' data-target='{e(x.target)}' "
            f"data-weight='{x.weight!r}'><title>{e(x.source)} → {e(x.target)}\nweight {x.weight:+.4g} "
            f"(in units of {e(metric)})</title></path>")


def _node(n: CircuitNode, d: Layout, g: CircuitGraph) -> str:
    cx, cy = d.at[n.node_id]
    r = d.radius[n.node_id]
    attr = n.attribution or 0.0
    colour = SIGN[attr >= 0]
    data = f"class='node {e(n.kind)}' data-node='{e(n.node_id)}' data-attribution='{attr!r}'"
    title = f"<title>{e(_tooltip(n, g))}</title>"
    if n.kind == "metric":
        s = R_MAX + 2
        shape = (f"<polygon points='{cx:.1f},{cy - s:.1f} {cx + s:.1f},{cy:.1f} {cx:.1f},{cy + s:.1f} "
                 f"{cx - s:.1f},{cy:.1f}' fill='#24292f' stroke='#24292f'/>")
        text = f"<text x='{cx + s + 5:.1f}' y='{cy + 4:.1f}'>{attr:+.3g}</text>"
        return f"<g {data}>{title}{shape}{text}</g>"
    tx = cx + R_MAX + 5
    if n.kind == "error":
        shape = (f"<rect x='{cx - r:.1f}' y='{cy - r:.1f}' width='{2 * r:.1f}' height='{2 * r:.1f}' fill='#d0d7de' "
                 f"stroke='{colour}' stroke-width='1.5'/>")
        return f"<g {data}>{title}{shape}<text class='lab' x='{tx:.1f}' y='{cy + 3:.1f}'>error</text></g>"
    shape = f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='{r:.1f}' fill='{colour}' fill-opacity='0.8' stroke='{colour}'/>"
    label = (f"<text class='lab' x='{tx:.1f}' y='{cy + 10:.1f}'>{e(_cut(n.label, LABEL_CHARS))}</text>"
             if n.label else "")
    text = f"<text x='{tx:.1f}' y='{cy - 1 if n.label else cy + 3:.1f}'>{n.feature}</text>{label}"
    href = feature_href(n.sae or "", n.feature if n.feature is not None else 0)
    return f"<g {data}><a href='{e(href)}'>{title}{shape}{text}</a></g>"


def _tooltip(n: CircuitNode, g: CircuitGraph) -> str:
    """The numbers of a node, one per line (a native tooltip keeps newlines)."""
    units = f"(in units of {g.metric})"
    if n.kind == "metric":
        return (f"metric {g.metric} at position {g.position}\nvalue {n.attribution:+.4g}\n"
                f"P(answer) {g.answer_probability:.3g}")
    what = f"feature {n.feature}" if n.kind == "feature" else "error (what the SAE does not reconstruct)"
    lines = [f"{what} · {n.sae} (layer {n.layer})",
             f"position {n.position} {json.dumps(n.token, ensure_ascii=False)}"]
    if n.label:
        lines.append(f"label: {_cut(n.label, TITLE_CHARS)}")
    lines.append(f"{'activation' if n.kind == 'feature' else 'error norm'} {_num(n.activation)}")
    lines.append(f"attribution {_num(n.attribution, signed=True)} {units}")
    lines.append(f"exact contribution {_num(n.exact_contribution, signed=True)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The text beside it


def _figures(r: CircuitResult, d: Layout) -> str:
    f, g = r.faithfulness, r.graph
    shown_edges = f" ({len(d.edges):,} strongest drawn)" if len(d.edges) < r.n_edges else ""
    rows = [
        ("metric", f"<code>{e(g.metric)}</code> at position {g.position} = <span class='num'>{r.metric_value:+.4g}"
                   f"</span> · P(answer) <span class='num'>{g.answer_probability:.3g}</span>"),
        ("faithfulness", f"<span class='num' id='faithfulness'>{_num(f.faithfulness)}</span> <span class='meta'>"
                         "(m(C) − m(∅)) / (m(M) − m(∅)); ~1: the circuit alone reproduces the behaviour</span>"),
        ("completeness", f"<span class='num' id='completeness'>{_num(f.completeness)}</span> <span class='meta'>"
                         "(m(M∖C) − m(∅)) / (m(M) − m(∅)); ~0: nothing outside the circuit does it</span>"),
        (f"metric under {e(f.ablation)} ablation" + ("" if f.mean_tokens is None else
                                                     f" (means over {f.mean_tokens:,} corpus tokens)"),
         f"<span class='num'>m(M) {f.metric_full:+.4g} · m(∅) "
         f"{f.metric_empty:+.4g} · m(C) {f.metric_circuit:+.4g} · m(M∖C) {f.metric_without_circuit:+.4g}</span>"),
        ("nodes", f"<span class='num' id='n-nodes'>{r.n_nodes:,}</span> kept of {r.n_candidate_nodes:,} with a "
                  f"nonzero attribution, carrying {100 * r.attribution_kept:.1f}% of the total |attribution|"),
        ("edges", f"<span class='num' id='n-edges'>{r.n_edges:,}</span>{shown_edges}"),
    ]
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    notes = "".join(f"<li>{e(_cut(w, 2_000))}</li>" for w in r.warnings or [])
    return f"<dl class='figs' id='figures'>{items}</dl>" + (f"<ul class='note' id='warnings'>{notes}</ul>" if notes
                                                              else "")


def _legend(g: CircuitGraph) -> str:
    return ("<p class='legend'>Rows: the SAEs by layer, the metric above. ● a feature (click: its page; its label "
            "below its number) · ■ an error node (what the SAE does not reconstruct there) · ◆ the metric. Size: "
            "√|attribution|. Edges: <span style='color:#1a7f37'>green raises</span> the metric, <span "
            "style='color:#cf222e'>red lowers</span> it, width ∝ |weight|. Attributions and weights are in units of "
            f"<code>{e(g.metric)}</code>. Hover a node or an edge for its numbers.</p>")


def _paths(r: CircuitResult, nodes: dict[str, CircuitNode]) -> str:
    items = []
    for p in r.paths:
        steps = " → ".join(_node_ref(nodes.get(i), i) for i in p.nodes)
        items.append(f"<li><span class='num'>{p.weight:+.4g}</span> {steps}</li>")
    body = "".join(items) or "<li class='meta'>none: trace two or more SAEs for paths</li>"
    return f"<h2>Strongest paths <span class='meta'>(weight in metric units)</span></h2><ol class='paths' " \
           f"id='paths'>{body}</ol>"


def _node_ref(n: CircuitNode | None, node_id: str) -> str:
    """A node in a path: a feature as a link with its label, an error or the metric as words."""
    if n is None or n.kind == "metric":
        return "metric" if node_id == "metric" else f"<code>{e(node_id)}</code>"
    where = f"@{n.position} <span class='tok'>{e(json.dumps(n.token, ensure_ascii=False))}</span>"
    if n.kind == "error":
        return f"error L{n.layer}{where}"
    label = f" <span class='meta'>{e(_cut(n.label, 60))}</span>" if n.label else ""
    return f"<a href='{e(feature_href(n.sae or '', n.feature or 0))}'>L{n.layer} #{n.feature}</a>{where}{label}"


def _node_table(g: CircuitGraph) -> str:
    head = ("<tr><th>node</th><th>position</th><th>label</th><th>activation</th><th>attribution</th>"
            "<th>exact contribution</th></tr>")
    rows = []
    for n in sorted((n for n in g.nodes if n.kind != "metric"), key=lambda n: -abs(n.attribution or 0.0)):
        name = (f"<a href='{e(feature_href(n.sae or '', n.feature or 0))}'>L{n.layer} #{n.feature}</a>"
                if n.kind == "feature" else f"error L{n.layer}")
        rows.append(f"<tr><td>{name}</td><td>{n.position} <span class='tok'>"
                    f"{e(json.dumps(n.token, ensure_ascii=False))}</span></td><td>{e(_cut(n.label, TABLE_LABEL_CHARS))}"
                    f"</td><td class='num'>{_num(n.activation)}</td><td class='num'>"
                    f"{_num(n.attribution, signed=True)}</td><td class='num'>"
                    f"{_num(n.exact_contribution, signed=True)}</td></tr>")
    return (f"<h2>Nodes <span class='meta'>(by |attribution|, in units of <code>{e(g.metric)}</code>)</span></h2>"
            f"<table id='nodes'>{head}{''.join(rows)}</table>")


def _cut(text: str | None, max_chars: int) -> str:
    """One line (control and bidi characters written out), cut to max_chars: not yet escaped."""
    return shown(text or "", max_chars)[0]


def _num(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else f"{x:+.4g}" if signed else f"{x:.4g}"
