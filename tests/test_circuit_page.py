"""The circuit page, /circuits/<run_id>, over the bundled stories260K model with both its SAEs (blocks.1 and
blocks.3): trace_circuit called through the real MCP client on a server that records to a real ledger, its graph
kept whole in the real SQLite circuit store, the page read as served (the dashboard app behind its security
middleware, through starlette's TestClient) and parsed back: one SVG node per graph node, feature nodes linked to
their pages, edges coloured by sign, the figures, untrusted labels and tokens as text. The store's bounds, and the
link a result carries only when pages are served and the ledger records. Then the page in headless Chromium under
the real CSP (chromedriver over plain WebDriver), with a screenshot kept."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from sae_mcp import demo
from sae_mcp.circuits.store import CircuitStore, circuits_path
from sae_mcp.one_line import shown
from sae_mcp.pages.assets import visible
from sae_mcp.pages.circuit import MAX_DRAWN_EDGES, SIGN, TOKEN_CHARS
from sae_mcp.server.app import build_server
from sae_mcp.server.http import dashboard_app
from sae_mcp.server.security import HttpPolicy
from sae_mcp.server.tools import tool_map
from sae_mcp.services import Services
from sae_mcp.settings import Settings

from helpers.models import engine_on
from mcp_client import call_many, call_tool, text_of, tools_by_name

BASE = "http://127.0.0.1:8765"
PROMPT, ANSWER, COUNTERFACTUAL = "Lily had a red ball. She gave the ball to", " her", " him"
HOSTILE_PROMPT = "Lily said \"<img src=x>\" & 'hi'. She gave the ball to"  # tokens '"', '<', '>', '&', "'"
HOSTILE_LABEL = "<script>alert(1)</script>\" onmouseover='alert(2)' gives & takes"
TRACE = {"prompt": PROMPT, "answer": ANSWER, "counterfactual": COUNTERFACTUAL}


@pytest.fixture(scope="module")
def engine(stories_loaded):
    return engine_on(stories_loaded, *demo.SAE_DIRS)


def services_on(engine, data_dir: Path, dashboard_url: str | None = BASE, **kw) -> Services:
    return Services(engine, Settings(data_dir=data_dir, dashboard_url=dashboard_url), tools=tool_map(), **kw)


@pytest.fixture(scope="module")
def traced(engine, tmp_path_factory):
    """(services, the structured result of a recorded trace_circuit call whose strongest feature is labelled
    HOSTILE_LABEL) on a server with pages served and the ledger recording."""
    services = services_on(engine, tmp_path_factory.mktemp("circuit_pages"))
    server = build_server(engine, services.settings, services=services)
    first = call_tool(server, "trace_circuit", TRACE).structured_content
    top = max((n for n in first["graph"]["nodes"] if n["kind"] == "feature"), key=lambda n: abs(n["attribution"]))
    services.explanations.add_label(engine.sae(top["sae"]).store_key, top["feature"], HOSTILE_LABEL)
    result = call_tool(server, "trace_circuit", TRACE).structured_content
    return services, result


def get(services, path: str):
    policy = HttpPolicy()
    with TestClient(dashboard_app(services, policy), base_url=f"http://127.0.0.1:{policy.port}") as c:
        return c.get(path)


def page(services, run_id: str) -> str:
    r = get(services, f"/circuits/{quote(run_id, safe='')}")
    assert r.status_code == 200, r.text
    return r.text


class Svg(HTMLParser):
    """The circuit SVG read back: nodes (data-node -> kind, shape, link, radius, title), edges, axis tokens, and
    every <a> inside the SVG."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.nodes: dict[str, dict] = {}
        self.edges: list[dict] = []
        self.tokens: list[str] = []
        self.links = 0
        self._in_svg = False
        self._node: dict | None = None
        self._text: list[str] | None = None  # an axis token's text being read
        self._title: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        cls = a.get("class", "").split()
        if tag == "svg" and "circuit" in cls:
            self._in_svg = True
        if not self._in_svg:
            return
        if tag == "g" and "node" in cls:
            self._node = self.nodes[a["data-node"]] = {"kind": cls[1], "shape": None, "href": None, "r": None,
                                                       "title": "", "attribution": float(a["data-attribution"])}
        elif tag == "a":
            self.links += 1
            if self._node is not None:
                self._node["href"] = a["href"]
        elif tag in ("circle", "rect", "polygon") and self._node is not None:
            self._node["shape"] = tag
            self._node["r"] = float(a["r"]) if tag == "circle" else float(a.get("width", 0)) / 2 or None
        elif tag == "path" and "edge" in cls:
            self.edges.append({"source": a["data-source"], "target": a["data-target"], "stroke": a["stroke"],
                               "weight": float(a["data-weight"]), "sign": cls[1]})
        elif tag == "text" and "tok" in cls:
            self._text = []
        elif tag == "title":
            self._title = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._in_svg = False
        elif tag == "g" and self._node is not None:
            self._node = None
        elif tag == "title" and self._title is not None:
            if self._node is not None and not self._node["title"]:
                self._node["title"] = "".join(self._title)
            self._title = None
        elif tag == "text" and self._text is not None:
            self.tokens.append("".join(self._text))
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._title is not None:
            self._title.append(data)
        elif self._text is not None:
            self._text.append(data)


def feature_path(sae: str, feature: int) -> str:
    return f"/features/{quote(sae, safe='')}/{feature}"


# ---------------------------------------------------------------------------------------------- the drawing


def test_every_graph_node_is_one_svg_node_and_every_feature_links_to_its_feature_page(traced):
    services, result = traced
    graph = result["graph"]
    svg = Svg(page(services, result["run_id"]))
    assert sorted(svg.nodes) == sorted(n["node_id"] for n in graph["nodes"])
    features = [n for n in graph["nodes"] if n["kind"] == "feature"]
    assert features and svg.links == len(features)
    for n in graph["nodes"]:
        drawn = svg.nodes[n["node_id"]]
        assert drawn["kind"] == n["kind"]
        assert drawn["shape"] == {"feature": "circle", "error": "rect", "metric": "polygon"}[n["kind"]]
        assert drawn["href"] == (feature_path(n["sae"], n["feature"]) if n["kind"] == "feature" else None)
        assert drawn["attribution"] == n["attribution"]
    # sized by |attribution|: the larger, never the smaller
    sized = sorted((abs(n["attribution"]), svg.nodes[n["node_id"]]["r"])
                   for n in graph["nodes"] if n["kind"] != "metric")
    assert all(r0 <= r1 for (_, r0), (_, r1) in zip(sized, sized[1:])) and sized[0][1] < sized[-1][1]
    assert get(services, svg.nodes[features[0]["node_id"]]["href"]).status_code == 200  # the link opens a page


def test_hovering_a_node_shows_its_numbers_in_metric_units(traced):
    services, result = traced
    svg = Svg(page(services, result["run_id"]))
    n = next(n for n in result["graph"]["nodes"] if n["kind"] == "feature")
    title = svg.nodes[n["node_id"]]["title"]
    assert f"feature {n['feature']} · {n['sae']}" in title and f"position {n['position']}" in title
    assert f"attribution {n['attribution']:+.4g} (in units of {result['graph']['metric']})" in title
    assert f"exact contribution {n['exact_contribution']:+.4g}" in title
    assert f"activation {n['activation']:.4g}" in title


def test_every_edge_is_drawn_with_its_weight_and_coloured_by_its_sign(traced):
    services, result = traced
    edges = result["graph"]["edges"]
    assert len(edges) <= MAX_DRAWN_EDGES
    svg = Svg(page(services, result["run_id"]))
    drawn = {(x["source"], x["target"]): x for x in svg.edges}
    assert sorted(drawn) == sorted((x["source"], x["target"]) for x in edges)
    for x in edges:
        d = drawn[x["source"], x["target"]]
        assert d["weight"] == x["weight"]
        assert (d["stroke"], d["sign"]) == ((SIGN[True], "pos") if x["weight"] >= 0 else (SIGN[False], "neg"))
    assert {x["sign"] for x in svg.edges} == {"pos", "neg"}  # this graph has both


def test_the_page_states_the_faithfulness_figures_counts_and_top_paths(traced):
    services, result = traced
    html = page(services, result["run_id"])
    f = result["faithfulness"]
    assert f"id='faithfulness'>{f['faithfulness']:.4g}<" in html
    assert f"id='completeness'>{f['completeness']:.4g}<" in html
    assert f"id='n-nodes'>{result['n_nodes']:,}<" in html and f"id='n-edges'>{result['n_edges']:,}<" in html
    assert f"{100 * result['attribution_kept']:.1f}% of the total |attribution|" in html
    paths = html[html.index("id='paths'"):html.index("</ol>", html.index("id='paths'"))]
    assert paths.count("<li>") == len(result["paths"]) > 0
    for p in result["paths"]:
        assert f"{p['weight']:+.4g}" in paths


def test_a_mean_ablation_trace_names_its_means_on_the_page(engine, tmp_path):
    settings = Settings(data_dir=tmp_path, dashboard_url=BASE, corpus=str(demo.CORPUS))
    services = Services(engine, settings, tools=tool_map())
    server = build_server(engine, settings, services=services)
    res = call_tool(server, "trace_circuit", {**TRACE, "max_nodes": 8, "ablation": "mean"}).structured_content
    n = res["faithfulness"]["mean_tokens"]
    assert n > 5000 and f"metric under mean ablation (means over {n:,} corpus tokens)" in page(services, res["run_id"])


def test_tokens_run_along_the_axis_one_column_per_position(traced):
    services, result = traced
    svg = Svg(page(services, result["run_id"]))
    assert svg.tokens == [shown(visible(t), TOKEN_CHARS)[0] for t in result["graph"]["tokens"]]


# ---------------------------------------------------------------------------------------------- escaping


def test_a_hostile_label_and_hostile_tokens_render_as_text_never_as_markup(traced, engine):
    services, _ = traced
    server = build_server(engine, services.settings, services=services)
    result = call_tool(server, "trace_circuit", {**TRACE, "prompt": HOSTILE_PROMPT}).structured_content
    labelled = [n for n in result["graph"]["nodes"] if n["label"] == HOSTILE_LABEL]
    assert labelled, "the labelled feature is not in this trace"
    tokens = result["graph"]["tokens"]
    assert {'"', "<", ">", "&", "'"} <= set(tokens)
    html = page(services, result["run_id"])
    assert "<script" not in html.lower() and "<img" not in html.lower() and "onmouseover='" not in html
    svg = Svg(html)  # parsed back, the markup characters come out as the text they were
    assert svg.tokens == [shown(visible(t), TOKEN_CHARS)[0] for t in tokens]
    assert f"label: {HOSTILE_LABEL}" in svg.nodes[labelled[0]["node_id"]]["title"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot; onmouseover=&#x27;alert(2)&#x27; gives &amp; takes" in html


def test_an_unknown_run_id_is_a_404_page_that_names_it_escaped(traced):
    services, _ = traced
    r = get(services, "/circuits/rnothere")
    assert r.status_code == 404 and "no circuit is kept for run id &#x27;rnothere&#x27;" in r.text
    r = get(services, "/circuits/" + quote("<b onmouseover='alert(1)'>x", safe=""))
    assert r.status_code == 404 and "<b on" not in r.text and "&lt;b onmouseover=&#x27;alert(1)&#x27;&gt;x" in r.text


def test_a_failed_trace_keeps_nothing_and_links_nowhere(engine, tmp_path):
    services = services_on(engine, tmp_path)
    server = build_server(engine, services.settings, services=services)
    res = call_tool(server, "trace_circuit", {**TRACE, "saes": ["no-such-sae"]})
    assert res.is_error and "page:" not in text_of(res)
    assert not circuits_path(tmp_path).exists()


# ---------------------------------------------------------------------------------------------- the store


def test_the_kept_graph_is_the_result_graph_whole_where_the_ledger_cuts_it(engine, tmp_path):
    services = services_on(engine, tmp_path)
    server = build_server(engine, services.settings, services=services)
    result = call_tool(server, "trace_circuit", {**TRACE, "max_nodes": 256}).structured_content
    assert len(result["graph"]["edges"]) > 10_000  # 1.8 MB of JSON: more than the ledger keeps of a result
    kept = services.circuits.get(result["run_id"])
    assert kept is not None and kept.graph == result["graph"]
    assert kept.summary["faithfulness"] == result["faithfulness"] and kept.summary["paths"] == result["paths"]
    assert circuits_path(tmp_path).is_file()
    html = page(services, result["run_id"])
    assert len(Svg(html).edges) == MAX_DRAWN_EDGES and f"({MAX_DRAWN_EDGES:,} strongest drawn)" in html


def test_the_store_keeps_only_the_newest_graphs_and_older_pages_go_404(engine, tmp_path):
    store = CircuitStore(circuits_path(tmp_path), max_graphs=2)
    services = services_on(engine, tmp_path, circuits=store)
    server = build_server(engine, services.settings, services=services)
    runs = [r.structured_content["run_id"] for r in call_many(server, [("trace_circuit", TRACE)] * 3)]
    assert store.run_ids() == runs[:0:-1]  # the newest two, newest first
    assert get(services, f"/circuits/{runs[0]}").status_code == 404
    assert all(get(services, f"/circuits/{r}").status_code == 200 for r in runs[1:])


def test_a_graph_a_label_cites_outlives_the_bounds_and_its_page_stays(engine, tmp_path):
    """A label cites a trace's run as evidence; more traces than the store keeps follow. The cited graph's page
    still answers (the person checking the label opens it), the uncited ones beyond the bound go 404."""
    services = services_on(engine, tmp_path)
    server = build_server(engine, services.settings, services=services)
    services.circuits.max_graphs = 2  # the store the server wires (with its cited runs), made small
    first = call_tool(server, "trace_circuit", TRACE).structured_content
    node = next(n for n in first["graph"]["nodes"] if n["kind"] == "feature")
    label = call_tool(server, "label_feature", {"sae": node["sae"], "feature": node["feature"],
                                                "label": "story openings", "evidence_runs": [first["run_id"]]})
    assert not label.is_error, text_of(label)
    runs = [r.structured_content["run_id"] for r in call_many(server, [("trace_circuit", TRACE)] * 3)]
    assert services.circuits.run_ids() == [runs[2], runs[1], first["run_id"]]
    assert get(services, f"/circuits/{first['run_id']}").status_code == 200
    assert get(services, f"/circuits/{runs[0]}").status_code == 404


def test_the_store_bound_in_bytes_deletes_the_oldest_but_always_keeps_the_newest(tmp_path):
    graph = {"schema_name": "sae-mcp circuit 1", "nodes": ["x" * 1000]}
    store = CircuitStore(tmp_path / "c.sqlite", max_bytes=2_500)
    for i in range(4):
        store.put(f"r{i}", {"n": i}, graph)
    assert store.run_ids() == ["r3", "r2"] and store.total_bytes() <= 2_500
    store = CircuitStore(tmp_path / "small.sqlite", max_bytes=10)
    store.put("a", {}, graph)
    store.put("b", {}, graph)
    assert store.run_ids() == ["b"]  # over the bound alone, yet the newest


def test_reading_the_store_before_any_graph_creates_no_file(tmp_path):
    store = CircuitStore(circuits_path(tmp_path))
    assert store.get("rx") is None and store.run_ids() == [] and not circuits_path(tmp_path).exists()


# ---------------------------------------------------------------------------------------------- the link


def test_the_result_links_its_page_only_when_pages_are_served_and_the_ledger_records(engine, tmp_path):
    served = build_server(engine, services_on(engine, tmp_path / "a").settings)
    res = call_tool(served, "trace_circuit", TRACE)
    page_url = f"{BASE}/circuits/{res.structured_content['run_id']}"
    assert res.structured_content["page"] == page_url and text_of(res).count(page_url) == 1
    assert "page" in tools_by_name(served)["trace_circuit"].output_schema["properties"]
    # no pages served: the graph is kept (a dashboard started later shows it), no link
    unserved_services = services_on(engine, tmp_path / "b", dashboard_url=None)
    unserved = build_server(engine, unserved_services.settings, services=unserved_services)
    res = call_tool(unserved, "trace_circuit", TRACE)
    assert "page" not in res.structured_content and "page:" not in text_of(res)
    assert unserved_services.circuits.get(res.structured_content["run_id"]) is not None
    assert "page" not in tools_by_name(unserved)["trace_circuit"].output_schema["properties"]
    # no ledger (--no-ledger): no run id, so nothing kept and no link
    unrecorded = build_server(engine, services_on(engine, tmp_path / "c").settings, record=False)
    res = call_tool(unrecorded, "trace_circuit", TRACE)
    assert "page" not in res.structured_content and "run_id" not in res.structured_content
    assert not circuits_path(tmp_path / "c").exists()
    assert "page" not in tools_by_name(unrecorded)["trace_circuit"].output_schema["properties"]


def test_serve_over_http_serves_the_circuit_page_beside_mcp(engine, tmp_path):
    server = build_server(engine, services_on(engine, tmp_path).settings)
    run_id = call_tool(server, "trace_circuit", TRACE).structured_content["run_id"]
    client = TestClient(server.streamable_http_app())
    r = client.get(f"/circuits/{run_id}")
    assert r.status_code == 200 and f"Circuit · run <code>{run_id}</code>" in r.text
    assert client.get("/circuits/rnothere").status_code == 404


# ---------------------------------------------------------------------------------------------- Chromium


def test_the_page_renders_in_chromium_under_the_csp_with_every_node_linked(traced, artifacts, tmp_path):
    from helpers.browser import CHROMIUM, chromium
    from helpers.servers import serving_pages
    from webdriver_client import CHROMEDRIVER, WebDriver

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium or chromedriver: apt-get install -y chromium chromium-driver")
    services, result = traced
    graph = result["graph"]
    features = [n for n in graph["nodes"] if n["kind"] == "feature"]
    with serving_pages(services) as base:
        driver = WebDriver(CHROMIUM, tmp_path / "profile", width=1500, height=1400)
        try:
            url = f"{base}/circuits/{result['run_id']}"
            driver.get(url)
            drawn = driver.wait_for("return document.querySelectorAll('svg.circuit .node').length")
            assert drawn == len(graph["nodes"])
            hrefs = driver.script("return [...document.querySelectorAll('svg.circuit a')].map(a => a.href.baseVal ?? "
                                  "a.getAttribute('href'))")
            assert sorted(hrefs) == sorted(feature_path(n["sae"], n["feature"]) for n in features)
            assert driver.script("return document.querySelectorAll('script').length") == 0  # the label stayed text
            box = driver.script("const b = document.getElementById('circuit').getBoundingClientRect(); "
                                "return [b.width, b.height]")
            assert box[0] > 500 and box[1] > 200  # drawn, not blocked
            first = features[0]
            driver.click(f"svg.circuit g[data-node='{first['node_id']}'] a circle")  # a node is a working link
            title = driver.wait_for("return document.getElementById('title')?.textContent.startsWith('Feature') && "
                                    "document.getElementById('title').textContent")
            assert title == f"Feature {first['feature']} · {first['sae']}"
            shot = artifacts / "circuit_page.png"
            chromium(url, tmp_path / "p2", f"--screenshot={shot}", "--window-size=1500,1400")
            assert shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        finally:
            driver.close()
