"""The feature pages and the front page over stories260K with its corpus indexed, read as served (the dashboard app
behind its security middleware, through starlette's TestClient) and compared with what the tools return through
MCP. tests/test_dashboard_browser.py renders the same pages in headless Chromium."""

from __future__ import annotations

import re
import time
from urllib.parse import quote

import pytest
import torch
from starlette.testclient import TestClient

from sae_mcp.errors import InvalidInput
from sae_mcp.pages.feature import MAX_TEST_CHARS, PAGE_CONTEXT, PAGE_INTERVALS, PAGE_PER_INTERVAL, PAGE_TOP
from sae_mcp.server.app import build_server
from sae_mcp.server.http import dashboard_app
from sae_mcp.server.security import HttpPolicy

from helpers.models import only_sae
from helpers.servers import indexed_stories_services
from mcp_client import call_many, call_tool
from page_dom import parse

pytestmark = [pytest.mark.usefixtures("lexical_only")]
BASE = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def site(stories_engine, stories_sae_dir, tmp_path_factory):
    """(services, MCP server over the same services with page links on, the SAE, picked features)."""
    services = indexed_stories_services(stories_engine, stories_sae_dir, tmp_path_factory.mktemp("pages"))
    settings = services.settings.model_copy(update={"dashboard_url": BASE})
    server = build_server(stories_engine, settings, services=services)
    return services, server, only_sae(stories_engine), pick_features(services)


def pick_features(services) -> dict[str, int]:
    """Features of this session's SAE with what a test needs: identical contexts merged into a count ('dup'), an
    example holding a newline ('newline'), several activation bands ('banded')."""
    s = only_sae(services.engine)
    found: dict[str, int] = {}
    for f in range(s.d_sae):
        top = services.examples.cached_top_examples(s.key, f, k=PAGE_TOP, context=PAGE_CONTEXT,
                                                    intervals=PAGE_INTERVALS, per_interval=PAGE_PER_INTERVAL)
        if top is None or not top.examples:
            continue
        bands = len(top.intervals or [])
        if bands >= 3:
            found.setdefault("banded", f)
            if any(e.count for e in top.examples):
                found.setdefault("dup", f)
            if any("\n" in t for e in top.examples for t in e.tokens):
                found.setdefault("newline", f)
        if len(found) == 3:
            break
    assert len(found) == 3, f"this SAE has no feature for every page test: {found}"
    return found


def page(services, path: str) -> str:
    policy = HttpPolicy()
    with TestClient(dashboard_app(services, policy), base_url=f"http://127.0.0.1:{policy.port}") as c:
        r = c.get(path)
    assert r.status_code == 200, r.text
    return r.text


def url(s, feature, rest: str = "") -> str:
    return f"/features/{quote(s.key, safe='')}/{feature}{rest}"


# ------------------------------------------------------------------------------------------- the examples


def test_every_example_token_is_shaded_in_proportion_to_the_activation_get_feature_acts_gives(site):
    services, server, s, picked = site
    f = picked["dup"]
    dom = parse(page(services, url(s, f)))
    summary = services.examples.feature_summary(s.key, f)
    assert dom.scale == summary.max_activation and dom.rows
    for row in dom.rows:
        mx = next(t for t in row.toks if "max" in t.cls)
        for t in row.toks:
            assert t.act is not None, row
            if "bos" in t.cls:
                assert t.alpha is None  # BOS is context only: never shaded
                continue
            assert t.alpha == pytest.approx(min(1.0, t.act / dom.scale), abs=6e-4)
            assert f"{t.act:.4g}" in t.title
        assert max(t.act for t in row.toks if "bos" not in t.cls) >= mx.act - 1e-4  # the shown max is a max there
    # The same numbers as get_feature_acts on the same text: each example's window prefix decoded to a prompt
    # (those that tokenize back to the same ids), through MCP.
    contexts: dict = {}
    services.examples.cached_top_examples(s.key, f, k=PAGE_TOP, context=PAGE_CONTEXT, intervals=PAGE_INTERVALS,
                                         per_interval=PAGE_PER_INTERVAL, contexts=contexts)
    tok = services.engine.model.tokenizer
    rows = {(r.document, r.offset): r for r in dom.rows}
    cases = [(rows[k], c, tok.decode(c.ids[1:])) for k, c in contexts.items() if k in rows]
    results = call_many(server, [("get_feature_acts", {"prompt": text, "top_k": 1, "features": [f]})
                                 for _, _, text in cases])
    compared = 0
    for (row, c, _), res in zip(cases, results):
        out = res.structured_content
        if out["tokens"] != services.engine.str_tokens(torch.tensor(c.ids)):
            continue  # the decoded text tokenizes differently: not the same text
        trace = out["features"][str(f)][c.lo :]
        assert [t.act for t in row.toks] == pytest.approx(trace, abs=2e-4)
        compared += 1
    assert compared >= 5, f"only {compared} examples round-tripped through text"


def test_examples_are_grouped_as_top_examples_gives_them_with_identical_windows_once_with_a_count(site):
    services, server, s, picked = site
    f = picked["dup"]
    dom = parse(page(services, url(s, f)))
    res = call_tool(server, "top_examples", {"feature": f, "k": PAGE_TOP, "context": PAGE_CONTEXT,
                                             "intervals": PAGE_INTERVALS, "per_interval": PAGE_PER_INTERVAL})
    top = res.structured_content
    expected = [("top", e) for e in top["examples"]]
    expected += [("interval", e) for b in top["intervals"] for e in b["examples"]]
    assert [(r.group, r.document, r.offset, r.count) for r in dom.rows] == \
        [(g, e["document"], e["offset"], e.get("count") or 1) for g, e in expected]
    assert dom.groups == ["top"] + ["interval"] * len(top["intervals"])
    assert any(r.count > 1 for r in dom.rows)
    html = page(services, url(s, f))
    assert html.count("<h3>Interval ") == len(top["intervals"]) and "×" in html
    for e in top["examples"]:
        assert [t.text for t in dom.rows[top["examples"].index(e)].toks] == \
            [t.replace("\n", "⏎") for t in e["tokens"]]


def test_a_newline_inside_an_example_is_a_visible_mark_and_never_breaks_the_row(site):
    services, _, s, picked = site
    html = page(services, url(s, picked["newline"]))
    dom = parse(html)
    marked = [t for r in dom.rows for t in r.toks if "⏎" in t.text]
    assert marked and all("\n" not in t.text for r in dom.rows for t in r.toks)
    assert "<span class='nl'>⏎</span>" in html


def test_a_page_never_waits_long_for_a_busy_device_it_marks_the_max_tokens_and_says_why(site, monkeypatch):
    import threading

    from sae_mcp.pages import feature as fp

    services, _, s, picked = site
    monkeypatch.setattr(fp, "DEVICE_WAIT_S", 0.2)
    held, release = threading.Event(), threading.Event()

    def generation():  # stands in for a long steer_generate holding the device
        with services.engine.device_work():
            held.set()
            release.wait(20)

    thread = threading.Thread(target=generation)
    thread.start()
    assert held.wait(10)
    try:
        html = page(services, url(s, picked["dup"]))
        held = services.engine.device_status().held  # answered before the generation let the device go
    finally:
        release.set()
        thread.join()
    dom = parse(html)
    assert "the device was busy for over 0.2 s" in html and held
    assert dom.rows and all((t.act is None) == ("max" not in t.cls) for r in dom.rows for t in r.toks)


def test_how_long_a_card_takes_to_render_from_the_index(site):
    """Gather + HTML of a feature page, best of 5, printed (the target is under 200 ms; a timing is never asserted:
    the box these tests share is often loaded by other processes). CPU time is printed beside wall time because
    load stretches the one but not the other. On the shared 2-core dev box: ~40-80 ms of CPU time, ~80-190 ms wall
    when loaded (the stories260K fixture: a 256-feature SAE, 30,000 tokens indexed)."""
    from sae_mcp.pages.routes import feature_page

    services, _, s, picked = site
    cpu, wall = {}, {}
    for name, f in picked.items():
        feature_page(services, f, s.key)  # the index row is read once per server (cached after)
        runs = []
        for _ in range(5):
            c0, w0 = time.process_time(), time.perf_counter()
            feature_page(services, f, s.key)
            runs.append((time.process_time() - c0, time.perf_counter() - w0))
        cpu[name], wall[name] = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"feature page render, best of 5 (s): cpu {cpu} wall {wall}")
    assert "<h2>Activations</h2>" in feature_page(services, picked["dup"], s.key)


# ---------------------------------------------------------------------------------------------- the test box


def test_the_test_box_answers_exactly_what_get_feature_acts_answers(site):
    services, server, s, picked = site
    f, text = picked["banded"], "Once upon a time, there was a little girl named Lily.\nShe saw a big dog."
    policy = HttpPolicy()
    with TestClient(dashboard_app(services, policy), base_url=f"http://127.0.0.1:{policy.port}") as c:
        box = c.get(url(s, f, "/acts"), params={"text": text}).json()
        too_long = c.get(url(s, f, "/acts"), params={"text": "a" * (MAX_TEST_CHARS + 1)})
        empty = c.get(url(s, f, "/acts"), params={"text": "  "})
        out_of_range = c.get(url(s, s.d_sae + 5, "/acts"), params={"text": "hi"})
        unknown = c.get("/features/nope/1/acts", params={"text": "hi"})
        cross_site = c.get(url(s, f, "/acts"), params={"text": "hi"}, headers={"sec-fetch-site": "cross-site"})
    tool = call_tool(server, "get_feature_acts", {"prompt": text, "top_k": 10, "features": [f]}).structured_content
    assert box["tokens"] == tool["tokens"] and box["acts"] == tool["features"][str(f)]
    assert box["top"] == [[[a["feature"], a["activation"]] for a in p["top"]] for p in tool["positions"]]
    assert box["l0"] == [p["l0"] for p in tool["positions"]] and box["bos"] is True
    assert box["max_activation"] == services.examples.feature_summary(s.key, f).max_activation
    assert too_long.status_code == 400 and f"at most {MAX_TEST_CHARS:,}" in too_long.json()["error"]
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    assert out_of_range.status_code == 400 and "out of range" in out_of_range.json()["error"]
    assert unknown.status_code == 404 and "unknown SAE 'nope'" in unknown.json()["error"]
    assert cross_site.status_code == 403  # another site's <img src=...acts?text=...> does no device work


# ------------------------------------------------------------------------------------------------- escaping


def test_labels_explanations_corpus_text_and_typed_text_are_escaped_everywhere(site):
    from sae_mcp.pages.feature import gather_page
    from sae_mcp.pages.routes import render_feature
    from sae_mcp.scoring.store import StoredScore

    services, _, s, picked = site
    f = picked["banded"]
    evil = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>"
    services.explanations.add_label(s.store_key, f, evil, evidence="</li><script>x()</script>")
    services.explanations.import_rows(s.store_key, [(f, "imported <b onmouseover=y()>bold</b>", "x")], "neuronpedia")
    typed = "</textarea><script>alert(3)</script>"
    for html in (page(services, url(s, f, f"?text={quote(typed)}")), page(services, "/"),
                 page(services, "/?q=script&sort=label")):
        assert "<img" not in html and "<b " not in html and "alert(3)</script>" not in html
        assert html.count("<script>") <= 1 and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert not re.search(r"(src|href|action)=['\"]?(https?:)?//", html)  # nothing from elsewhere: no CDN
        assert not re.search(r"<(link|img|iframe|object|embed)\b", html)
    assert "&lt;/textarea&gt;&lt;script&gt;alert(3)" in page(services, url(s, f, f"?text={quote(typed)}"))
    assert "&lt;s&gt;" in page(services, url(s, f)) and "<s>" not in page(services, url(s, f))  # BOS, a corpus token
    p = gather_page(services, f, s.key)
    x = p.groups[0].examples[0]
    x.example.tokens[1] = "\"'><img src=x onerror=alert(4)>&amp;"
    scored = dict(id=1, sae=s.store_key, feature=f, label_id=None, n=20, seed=0, scorer="agent", challenge="c",
                  created=0.0, metrics={"balanced_accuracy": 0.85, "interval_95": [0.7, 0.95]})
    p.card.scores = [StoredScore(explanation=evil, method="detection", **scored),
                     StoredScore(explanation="<i>unrecorded</i>", method="fuzzing", **scored)]
    html = render_feature(p)
    assert "<img" not in html and "&quot;&#x27;&gt;&lt;img src=x onerror=alert(4)&gt;&amp;amp;" in html
    assert "scored (balanced accuracy, 0.5 = chance): detection 0.85 (95% 0.70–0.95), n=20" in html
    assert "scored, not recorded: &lt;i&gt;unrecorded&lt;/i&gt;" in html and "fuzzing 0.85" in html


# ---------------------------------------------------------------------------------------------- scores


def test_a_scored_label_shows_its_score_on_the_feature_page_and_in_the_front_pages_search_and_list(site):
    """The whole path: label_feature, score_explanation on the label, submit_predictions (every context 'does not
    fire': a constant answer, whose balanced accuracy is 0.5 whatever the blind set holds), then both pages."""
    services, server, s, picked = site
    f, label = picked["newline"], "quokka sentences ending a line"
    (rec,) = call_many(server, [("label_feature", {"feature": f, "label": label})])
    (issued,) = call_many(server, [("score_explanation", {"feature": f, "label_id": rec.structured_content["label_id"],
                                                          "n": 8, "seed": 5})])
    blind = issued.structured_content["challenge"]
    (res,) = call_many(server, [("submit_predictions", {"challenge_id": blind["challenge_id"],
                                                        "submit_secret": issued.structured_content["submit_secret"],
                                                        "predictions": {c["id"]: False for c in blind["contexts"]}})])
    m = res.structured_content["metrics"]
    assert m["balanced_accuracy"] == 0.5
    lo, hi = m["interval_95"]
    html = page(services, url(s, f))
    item = re.search(r"<li class='label'>label: quokka sentences ending a line.*?</li>", html).group(0)
    assert f"scored (balanced accuracy, 0.5 = chance): detection 0.50 (95% {lo:.2f}–{hi:.2f}), n=8" in item
    front = page(services, "/?q=quokka")
    results = front[front.index("<table id='results'>") : front.index("</table>")]
    (row,) = [r for r in re.findall(r"<tr>.*?</tr>", results) if "quokka" in r]
    assert "<td class='meta scores'>detection 0.50 (n=8)</td>" in row and url(s, f) in row
    listed = page(services, "/?sort=label")
    (row,) = [r for r in re.findall(r"<tr>.*?</tr>", listed) if "quokka" in r]
    assert "<td class='meta scores'>detection 0.50 (n=8)</td>" in row and url(s, f) in row


# ---------------------------------------------------------------------------------------------- front page


def test_front_page_searches_as_search_explanations_and_sorts_by_label_or_density(site):
    services, server, s, picked = site
    services.explanations.add_label(s.store_key, picked["dup"], "zebra stripes in stories")
    services.explanations.add_label(s.store_key, picked["newline"], "aardvark line breaks")
    search = call_tool(server, "search_explanations", {"query": "stripes", "top_k": 50}).structured_content
    html = page(services, "/?q=stripes")
    assert search["matches"] and all(url(s, m["feature"]) in html for m in search["matches"])
    by_label = page(services, "/?sort=label")
    assert by_label.index("aardvark line breaks") < by_label.index("zebra stripes in stories")
    dens = services.densities(s.key)
    by_density = page(services, "/?sort=density")
    order = [int(x) for x in re.findall(r"<tr><td><a href='/features/[^/]+/(\d+)'>", by_density)]
    assert order == [f for f in dens.topk(min(100, s.d_sae)).indices.tolist() if dens[f] > 0][: len(order)]
    assert len(order) >= 10


def test_front_page_shows_fidelity_figures_once_measured_without_waiting_for_them(site):
    services, _, s, _ = site
    first = page(services, "/")  # never measures on the page's thread
    assert "fidelity" in first
    deadline = time.time() + 60
    while services.fidelity_now(s.key)[0] is None and time.time() < deadline:
        time.sleep(0.2)
    fid = services.fidelity_now(s.key)[0]
    assert fid is not None
    html = page(services, "/")
    assert f"explained variance {fid.explained_variance:.3g}" in html and f"L0 {fid.l0:.3g}" in html


# ---------------------------------------------------------------------------------------------- recorded runs


def test_steering_and_ablation_runs_the_agent_recorded_show_on_the_feature_page(site):
    services, server, s, picked = site
    f = picked["banded"]
    steer, ablate, _ = call_many(server, [
        ("steer_generate", {"prompt": "Once upon a time", "features": [{"feature": f, "strength": 2}],
                            "max_new_tokens": 4, "temperature": 0}),
        ("ablate_and_test", {"prompt": "Once upon a time, there was a", "answer": " little", "features": [f]}),
        ("steer_generate", {"prompt": "One day", "features": [{"feature": picked["dup"], "strength": 1}],
                            "max_new_tokens": 2, "temperature": 0}),
    ])
    steer_id, ablate_id = steer.structured_content["run_id"], ablate.structured_content["run_id"]
    (card,) = call_many(server, [("feature_card", {"feature": f, "examples": 1})])
    card_id = card.structured_content["run_id"]
    (labelled,) = call_many(server, [("label_feature", {"feature": f, "label": "steers toward openings",
                                                        "evidence_runs": [steer_id, card_id]})])
    assert not labelled.is_error, labelled.content[0].text
    html = page(services, url(s, f))
    for run in (steer_id, ablate_id):
        assert f"<li data-run='{run}' id='run-{run}'>" in html
    assert "KL" in html and "ablated vs baseline" in html
    # the label's cited runs: the one listed below links to its line, the other (not a steering run) is named
    assert f"cites runs <a href='#run-{steer_id}'>{steer_id}</a>, {card_id}</span>" in html
    quiet = next(g for g in range(s.d_sae) if g not in (f, picked["dup"]))  # no run was recorded for it
    assert "none recorded for this feature" in page(services, url(s, quiet))


# ---------------------------------------------------------------------------------------------- links to pages


def test_results_naming_one_feature_carry_its_page_url_and_only_when_pages_are_served(site, stories_engine):
    services, server, s, picked = site
    f = picked["banded"]
    want = f"{BASE}/features/{s.key}/{f}"
    calls = [("feature_card", {"feature": f}), ("top_examples", {"feature": f, "k": 2}),
             ("project_to_vocab", {"feature": f}), ("label_feature", {"feature": f, "label": "x"}),
             ("feature_stats", {"features": [f]}), ("get_feature_acts", {"prompt": "Once", "features": [f]})]
    for (name, _), res in zip(calls, call_many(server, calls)):
        assert res.structured_content["page"] == want, name
        # in the text only where a person opens the page from: the card and the examples (elsewhere: noise)
        assert (f"page: {want}" in res.content[0].text) == (name in ("feature_card", "top_examples")), name
    plain, several = call_many(server, [("get_feature_acts", {"prompt": "Once"}),
                                        ("feature_stats", {"features": [f, f + 1]})])
    assert "page" not in plain.structured_content and "page" not in several.structured_content
    unlinked = build_server(stories_engine, services.settings, services=services)  # no dashboard_url: stdio
    assert "page" not in call_tool(unlinked, "feature_card", {"feature": f}).structured_content


def test_page_urls_never_carry_a_token_and_default_to_the_http_servers_own_address():
    import argparse

    from sae_mcp.cli_common import dashboard_url
    from sae_mcp.pages.links import check_base

    for bad in ("http://127.0.0.1:8765/?token=abcdefabcdefabcdef", "http://user:pw@host:1", "ftp://x", "x"):
        with pytest.raises(InvalidInput):
            check_base(bad)
    none = argparse.Namespace(dashboard_url=None)
    assert dashboard_url(none, HttpPolicy(host="0.0.0.0", port=9000, token="t" * 20)) == "http://127.0.0.1:9000"
    assert dashboard_url(none, HttpPolicy(host="::", port=9000, token="t" * 20)) == "http://[::1]:9000"
    assert dashboard_url(none) is None  # stdio without --dashboard-url: no links
    given = argparse.Namespace(dashboard_url="https://gpu.example.com/")
    assert dashboard_url(given, HttpPolicy()) == "https://gpu.example.com"


# ---------------------------------------------------------------------------------------------- the PNG plot


def test_the_histogram_png_keeps_its_whole_title_axes_and_units():
    from sae_mcp.results.corpus import Histogram
    from sae_mcp.server.render import histogram_figure, histogram_png

    hist = Histogram(edges=[0.001, 0.01, 0.1, 1.0, 2.37], counts=[5, 50, 500, 3000])
    title = ("gpt2-small-res-jb/blocks.7.hook_resid_pre feature 12345: fired on 123,456 of 2,000,000 tokens "
             "(density 0.0617, max activation 23.7)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = histogram_figure(hist, title)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    (ax,) = fig.axes
    for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
        ext = text.get_window_extent(renderer)
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1, text.get_text()
    assert "log scale" in ax.get_xlabel() and "tokens" in ax.get_ylabel()
    assert ax.title.get_text().replace("\n", " ") == title
    assert histogram_png(hist, title)[:8] == b"\x89PNG\r\n\x1a\n"
