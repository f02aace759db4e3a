"""The feature pages rendered by a real headless Chromium (Debian packages chromium, chromium-driver), CSP and
all: the tiny model's card, and stories260K's indexed pages with their test box run by the page's own script.
Skipped with the reason when no chromium binary is installed. A screenshot of each stories page is kept in
$SAE_MCP_ARTIFACTS (else a pytest tmp dir, printed), with the PNG plot top_examples returns. Clicking a token of
the test box goes through chromedriver (tests/webdriver_client.py), skipped when it is not installed."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from sae_mcp.pages.feature import PAGE_CONTEXT, PAGE_INTERVALS, PAGE_PER_INTERVAL, PAGE_TOP

from helpers.browser import CHROMIUM, NO_CHROMIUM, chromium, dump_dom
from helpers.models import only_sae
from helpers.servers import indexed_stories_services, services_at, serving_pages
from mcp_client import call_tool
from page_dom import parse
from webdriver_client import CHROMEDRIVER, WebDriver

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


@pytest.fixture
def dashboard(tiny_engine, tmp_path):
    """The tiny model's pages for the length of one test."""
    services = services_at(tiny_engine, tmp_path / "data")
    with serving_pages(services) as base:
        yield services, base


def screenshot(url: str, profile, name: str, artifacts: Path, height: int, wait_ms: int = 0) -> Path:
    path = artifacts / name
    chromium(url, profile, f"--screenshot={path}", f"--window-size=1280,{height}", wait_ms=wait_ms)
    assert path.stat().st_size > 10_000, path
    print(f"screenshot: {path}")
    return path


def test_feature_page_renders_in_chromium_with_labels_and_logit_lens(dashboard, tiny_engine, artifacts, tmp_path):
    services, base = dashboard
    s = only_sae(tiny_engine)
    services.explanations.add_label(s.store_key, 6, "cats & dogs <pets>", evidence="top examples")
    dom = dump_dom(f"{base}/features/{s.key}/6", tmp_path / "profile")
    assert f"Feature 6 · {s.key}" in dom  # the dotted hook name routes as one path segment
    assert "label: cats &amp; dogs &lt;pets&gt;" in dom  # escaped: a label cannot inject markup
    assert "id=\"logits\"" in dom and "id=\"promotes\"" in dom and "id=\"suppresses\"" in dom
    assert "not indexed: call build_index" in dom
    assert "kurtosis" in dom
    screenshot(f"{base}/features/{s.key}/6", tmp_path / "p2", "feature_page_not_indexed.png", artifacts, 1200)


def test_front_page_lists_labelled_features_and_unknown_sae_is_a_404_page(dashboard, tiny_engine, tmp_path):
    services, base = dashboard
    s = only_sae(tiny_engine)
    services.explanations.add_label(s.store_key, 11, "the word park")
    dom = dump_dom(f"{base}/", tmp_path / "profile")
    assert f"/features/{s.key}/11" in dom and "the word park" in dom
    dom = dump_dom(f"{base}/features/nope/1", tmp_path / "profile2")
    assert "unknown SAE 'nope'" in dom


# ------------------------------------------------------------------------------------------- stories260K, indexed


@pytest.fixture(scope="module")
def stories_site(stories_engine, stories_sae_dir, tmp_path_factory):
    """stories260K's pages with its corpus indexed, served for the module: (services, MCP server, base URL)."""
    from sae_mcp.server.app import build_server

    services = indexed_stories_services(stories_engine, stories_sae_dir, tmp_path_factory.mktemp("browser"))
    with serving_pages(services) as base:
        yield services, build_server(stories_engine, services.settings, services=services, record=False), base


def busiest_banded_feature(services) -> int:
    """The densest feature with examples in several activation bands (what the page groups by), preferring one
    whose top examples fold identical contexts into a count (so the screenshot shows every part of the page)."""
    s = only_sae(services.engine)
    banded = []
    for f in services.densities(s.key).argsort(descending=True).tolist():
        top = services.examples.cached_top_examples(s.key, f, k=PAGE_TOP, context=PAGE_CONTEXT,
                                                    intervals=PAGE_INTERVALS, per_interval=PAGE_PER_INTERVAL)
        if top is not None and len(top.intervals or []) >= 3:
            if any(e.count for e in top.examples):
                return f
            banded.append(f)
    assert banded, "no feature fires over three activation bands"
    return banded[0]


@pytest.mark.usefixtures("lexical_only")
def test_feature_page_in_chromium_shades_every_token_and_its_test_box_answers_as_get_feature_acts(
        stories_site, artifacts, tmp_path):
    services, server, base = stories_site
    s = only_sae(services.engine)
    f = busiest_banded_feature(services)
    services.explanations.add_label(s.store_key, f, "story openings <b>&</b> \"quotes\"", evidence="top_examples")
    text = "Once upon a time, <b>Lily</b> saw a big dog.\nThe dog was happy."
    page = f"{base}/features/{quote(s.key, safe='')}/{f}?text={quote(text)}"
    html = dump_dom(page, tmp_path / "p1", wait_ms=10_000)
    dom = parse(html)
    # the examples: every token carries its activation, shaded in proportion (BOS never shaded)
    assert dom.rows and dom.scale == services.examples.feature_summary(s.key, f).max_activation
    assert "interval" in dom.groups and dom.groups[0] == "top"
    for t in (t for r in dom.rows for t in r.toks if "bos" not in t.cls):
        assert t.act is not None and t.alpha == pytest.approx(min(1.0, t.act / dom.scale), abs=6e-4)
    assert "label: story openings &lt;b&gt;&amp;&lt;/b&gt; \"quotes\"" in html
    # the test box, run by the page's script (the CSP let it run and fetch): get_feature_acts' numbers
    tool = call_tool(server, "get_feature_acts", {"prompt": text, "top_k": 10, "features": [f]}).structured_content
    assert [t.text for t in dom.test_toks] == [t.replace("\n", "⏎") for t in tool["tokens"]]
    assert [t.act for t in dom.test_toks] == tool["features"][str(f)]
    scale = max([dom.scale, *tool["features"][str(f)][1:]])
    for t in dom.test_toks[1:]:  # set by the script: the browser keeps an opacity in 1/255 steps
        assert t.alpha == pytest.approx(min(1.0, t.act / scale), abs=1 / 255)
    at = dom.test_top_pos
    assert at is not None and dom.test_top == [(a["feature"], a["activation"]) for a in tool["positions"][at]["top"]]
    out = html[html.index('id="test-out"') : html.index('id="test-top"')]
    assert "<b>" not in out and "&lt;b&gt;" in out or "&lt;" in out  # typed markup is text, never elements
    screenshot(page, tmp_path / "p2", "feature_page.png", artifacts, 3000, wait_ms=10_000)


@pytest.mark.usefixtures("lexical_only")
def test_front_page_in_chromium_searches_and_lists_features_by_density(stories_site, artifacts, tmp_path):
    services, _, base = stories_site
    s = only_sae(services.engine)
    f = busiest_banded_feature(services)
    services.explanations.add_label(s.store_key, f, "tale beginnings", evidence="top_examples")
    dom = dump_dom(f"{base}/?q=beginnings&sort=density", tmp_path / "p1")
    assert f"/features/{s.key}/{f}" in dom and "tale beginnings" in dom and 'data-sort="density"' in dom
    screenshot(f"{base}/?q=beginnings&sort=density", tmp_path / "p2", "index_page.png", artifacts, 1600)


@pytest.mark.usefixtures("lexical_only")
@pytest.mark.skipif(CHROMEDRIVER is None, reason="no chromedriver: apt-get install -y chromium-driver")
def test_clicking_a_test_box_token_lists_the_features_firing_there_as_get_feature_acts_does(stories_site, tmp_path):
    services, server, base = stories_site
    s = only_sae(services.engine)
    f = busiest_banded_feature(services)
    text = "Once upon a time, there was a little girl named Lily.\nShe saw a big dog and <i>smiled</i>."
    tool = call_tool(server, "get_feature_acts", {"prompt": text, "top_k": 10, "features": [f]}).structured_content
    driver = WebDriver(CHROMIUM, tmp_path / "profile")
    try:
        driver.get(f"{base}/features/{quote(s.key, safe='')}/{f}?text={quote(text)}")
        shown = driver.wait_for("return document.querySelectorAll('#test-out .t').length")
        assert shown == len(tool["tokens"])
        first = int(driver.script("return document.getElementById('test-top-list').dataset.pos"))
        for pos in [p for p in (3, len(tool["tokens"]) - 2, 0) if p != first]:
            driver.click(f"#test-out .t[data-pos='{pos}']")
            dom = parse(driver.script("return document.getElementById('testbox').outerHTML"))
            assert dom.test_top_pos == pos and [t.pos for t in dom.test_toks if "sel" in t.cls] == [pos]
            assert dom.test_top == [(a["feature"], a["activation"]) for a in tool["positions"][pos]["top"]], pos
        links = driver.script("return [...document.querySelectorAll('#test-top-list a')].map(a => a.href)")
        assert links and all(x.startswith(f"{base}/features/{quote(s.key, safe='')}/") for x in links)
        assert driver.script("return document.querySelectorAll('#test-out i').length") == 0  # typed markup is text
    finally:
        driver.close()


@pytest.mark.usefixtures("lexical_only")
def test_the_top_examples_plot_is_kept_beside_the_screenshots(stories_site, artifacts):
    """The PNG top_examples(plot=True) returns through MCP, kept to be looked at (test_pages checks its layout)."""
    import base64

    services, server, _ = stories_site
    f = busiest_banded_feature(services)
    res = call_tool(server, "top_examples", {"feature": f, "k": 3, "plot": True})
    (image,) = [c for c in res.content if c.type == "image"]
    path = artifacts / "top_examples_plot.png"
    path.write_bytes(base64.b64decode(image.data))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"plot: {path}")
