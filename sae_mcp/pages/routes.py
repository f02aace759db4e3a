"""The dashboard's HTML pages, for a person checking what the agent did (the agent reads cards/text.py's markdown).

    feature_page(services, feature, sae, text)   one feature: explanations and labels with their evidence, density
                                                 and histogram (SVG), examples with every token shaded by its
                                                 activation (top list and one group per activation band), a test box
                                                 for your own text, the logit lens as bars, recorded steering and
                                                 ablation runs
    index_page(services, query, sort)            explanation search, each SAE's fidelity and its features by label or
                                                 by density

Every string that comes from a label, an explanation, the corpus, a URL or a user is HTML-escaped here; the test
box's script (assets.py SCRIPT) builds its nodes with textContent. The pages load nothing from anywhere else.
"""

from __future__ import annotations

import html
from urllib.parse import quote, urlencode

from sae_mcp.cards.text import explainer_of
from sae_mcp.ledger.summary import when
from sae_mcp.one_line import shown
from sae_mcp.pages.assets import CSS, SCRIPT, shade, visible
from sae_mcp.pages.feature import MAX_TEST_CHARS, FeaturePage, ShownExample, gather_page
from sae_mcp.pages.listing import SORTS, Found, Listing, listing, search
from sae_mcp.pages.plots import bar_list, histogram_svg
from sae_mcp.scoring.store import StoredScore
from sae_mcp.services import Services

e = html.escape
PAGE_CHARS = 1_000  # characters of a label, an explanation or its evidence shown (label_feature takes 1,000)
LIST_CHARS = 200  # characters of a label or an explanation in a table row of the front page


def feature_url(sae: str, feature: int | str = "") -> str:
    return f"/features/{quote(sae, safe='')}/{feature}"


def _head(title: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{e(title)}</title><style>{CSS}</style></head><body>")


# ---------------------------------------------------------------------------------------------------------------
# The feature page


def feature_page(services: Services, feature: int, sae: str | None = None, text: str = "") -> str:
    return render_feature(gather_page(services, feature, sae), text)


def render_feature(page: FeaturePage, text: str = "") -> str:
    c = page.card
    nav = ["<a href='/'>all features</a>"]
    if c.feature > 0:
        nav.append(f"<a href='{feature_url(c.sae_key, c.feature - 1)}'>← {c.feature - 1}</a>")
    if c.feature + 1 < c.d_sae:
        nav.append(f"<a href='{feature_url(c.sae_key, c.feature + 1)}'>{c.feature + 1} →</a>")
    meta = f"hook <code>{e(c.hook_name)}</code> · {c.d_sae:,} features · SAE <code>{e(c.sae_source)}</code>"
    if c.neuronpedia:
        meta += f" · Neuronpedia <code>{e(c.neuronpedia)}</code>"
    return "".join([
        _head(f"Feature {c.feature} · {c.sae_key}"), f"<nav>{' · '.join(nav)}</nav>",
        f"<h1 id='title'>Feature {c.feature} · {e(c.sae_key)}</h1><p class='meta'>{meta}</p>",
        _explanations(page), _activations(page), _test_box(page, text), _logit_lens(page), _runs(page),
        f"<script>{SCRIPT}</script></body></html>",
    ])


def _text(text: str | None, max_chars: int = PAGE_CHARS) -> str:
    """A label's, an explanation's or its evidence's text for the page: one line, cut, HTML-escaped."""
    line, left_out = shown(text or "", max_chars)
    return e(line) + (f" <span class='meta'>(+{left_out:,} characters)</span>" if left_out else "")


def _explanations(page: FeaturePage) -> str:
    c = page.card
    items = []
    for x in c.explanations:
        scored = _scored(c.scores_of(x.description))
        if x.source == "label":
            ev = f"<br><span class='meta'>evidence: {_text(x.evidence)}</span>" if x.evidence else ""
            shown_runs = {r.id for r in page.runs}  # a cited run listed below links to its line
            cited = ", ".join(f"<a href='#run-{e(r)}'>{e(r)}</a>" if r in shown_runs else e(r)
                              for r in x.evidence_runs or [])
            runs = f"<br><span class='meta'>cites runs {cited}</span>" if cited else ""
            items.append(f"<li class='label'>label: {_text(x.description)}{ev}{runs}{scored}</li>")
        else:
            items.append(f"<li>{_text(x.description)} <span class='meta'>({_text(explainer_of(x), 80)})</span>"
                         f"{scored}</li>")
    for n, what in ((c.more_labels, "older labels"), (c.more_imported, "more imported explanations")):
        if n:
            items.append(f"<li class='meta more'>{n:,} {what} not shown</li>")
    unrecorded, more = c.scored_unrecorded()
    for text in unrecorded:
        items.append(f"<li>scored, not recorded: {_text(text)}{_scored(c.scores_of(text))}</li>")
    if more:
        items.append(f"<li class='meta more'>{more:,} more scored texts not shown</li>")
    if not items:
        items.append("<li>none yet: record one with label_feature, or <code>sae-mcp explanations import</code></li>")
    return f"<h2>Explanations</h2><ul id='explanations' class='expl'>{''.join(items)}</ul>"


def _scored(scores: list[StoredScore]) -> str:
    """The explanation's newest score per method (score_explanation): balanced accuracy with its 95% interval."""
    parts = []
    for sc in scores:
        m = sc.metrics
        lo, hi = (m.get("interval_95") or [None, None])[:2]
        ci = f" (95% {lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else ""
        acc = m.get("balanced_accuracy")
        parts.append(f"{e(sc.method)} {acc:.2f}{ci}, n={sc.n}" if acc is not None else e(sc.method))
    if not parts:
        return ""
    return f"<br><span class='meta scores'>scored (balanced accuracy, 0.5 = chance): {'; '.join(parts)}</span>"


def _activations(page: FeaturePage) -> str:
    c = page.card
    parts = ["<h2>Activations</h2><div id='activations'>"]
    if c.index_note or c.summary is None:
        parts.append(f"<p class='note'>{e(c.index_note or 'no activations known')}</p></div>")
        return "".join(parts)
    s = c.summary
    dtype = f" · computed in {s.compute_dtype}" if s.compute_dtype else ""
    of = f" of {s.tokens_scanned:,}" if s.tokens_scanned else ""
    parts.append(f"<p id='density'>density {s.density:.3g} (fired on {s.n_fired:,}{of} tokens) · "
                 f"max activation {s.max_activation:.4g}{e(dtype)}</p>")
    if c.scan_note:
        parts.append(f"<p class='meta'>{e(c.scan_note)}</p>")
    parts.append(histogram_svg(s.histogram, s.n_fired, s.tokens_scanned))
    if page.groups:
        parts.append(f"<div class='scale' id='scale' data-scale='{page.scale!r}'>shading: 0 <span class='bar'></span> "
                     f"{page.scale:.4g} (the feature's max activation); hover a token for its value · "
                     "<span class='t max'>outlined</span>: the example's token, its activation at the left</div>")
    if page.acts_note:
        parts.append(f"<p class='note' id='acts-note'>{e(page.acts_note)}</p>")
    for w in page.warnings:
        parts.append(f"<p class='meta'>{e(w)}</p>")
    for i, g in enumerate(page.groups):
        merged = f" · {g.merged} more identical contexts folded into the counts" if g.merged else ""
        rows = "".join(_example_row(x, page.scale) for x in g.examples)
        parts.append(f"<h3>{e(g.title)}</h3><p class='meta'>{e(g.detail or '')}{merged}</p>"
                     f"<ul class='exs' data-group='{'top' if i == 0 else 'interval'}'>{rows}</ul>")
    parts.append("</div>")
    return "".join(parts)


def _example_row(x: ShownExample, scale: float) -> str:
    ex = x.example
    count = f"×{ex.count}" if ex.count else ""
    spans = "".join(_token(x, i, tok, scale) for i, tok in enumerate(ex.tokens))
    return (f"<li class='exrow' data-document='{ex.document}' data-offset='{ex.offset}' data-count='{ex.count or 1}'>"
            f"<span class='act num'>{ex.activation:.4g}</span><span class='cnt' title='identical contexts'>{count}"
            f"</span><span class='ex'>{spans}</span></li>")


def _token(x: ShownExample, i: int, tok: str, scale: float) -> str:
    ex = x.example
    bos = x.bos_shown and i == 0
    act = x.acts[i] if x.acts is not None else ex.activation if i == ex.position else None
    cls = "t" + (" max" if i == ex.position else "") + (" bos" if bos else "")
    style = f" style='background:{shade(act, scale)}'" if act is not None and not bos else ""
    data = f" data-act='{act!r}'" if act is not None else ""
    title = f"{tok!r}: {act:.4g}" if act is not None else repr(tok)
    shown = e(visible(tok)).replace("⏎", "<span class='nl'>⏎</span>")
    return f"<span class='{cls}'{style}{data} title='{e(title)}'>{shown}</span>"


def _test_box(page: FeaturePage, text: str) -> str:
    c = page.card
    api = feature_url(c.sae_key, c.feature) + "/acts"
    return (
        "<h2>Test it on your own text</h2>"
        f"<div id='testbox' data-api='{e(api)}' data-pages='{e(feature_url(c.sae_key))}' data-feature='{c.feature}' "
        f"data-max='{MAX_TEST_CHARS}'><form method='get' action='{e(feature_url(c.sae_key, c.feature))}'>"
        f"<textarea name='text' maxlength='{MAX_TEST_CHARS}' placeholder='Once upon a time'>{e(text)}</textarea>"
        "<button type='submit'>Run</button> <span class='meta'>one get_feature_acts call: this feature's activation "
        "at every token, shaded; click a token for the features firing there</span></form>"
        "<noscript><p class='note'>The test box needs JavaScript; the rest of the page does not.</p></noscript>"
        "<p id='test-status' class='meta'></p><div id='test-out' class='ex'></div><div id='test-top'></div></div>"
    )


def _logit_lens(page: FeaturePage) -> str:
    c = page.card
    p = c.projection
    head = "<h2>Logit lens <span class='meta'>(W_dec[f] @ W_U: the tokens this direction promotes and suppresses)"
    if p is None or c.moments is None:
        return f"{head}</span></h2><p id='logits'>{e(c.lens_note or 'no logit lens')}</p>"
    mean, std, skew, kurt = c.moments
    pos = bar_list([(t.token, t.logit) for t in p.top_positive], "pos", "promotes")
    neg = bar_list([(t.token, t.logit) for t in p.top_negative], "neg", "suppresses")
    return (f"{head}</span></h2><div class='bars' id='logits'><div><h3>promotes</h3>{pos}</div>"
            f"<div><h3>suppresses</h3>{neg}</div></div><p id='moments' class='meta'>logit weights over the "
            f"vocabulary: mean {mean:.3g}, std {std:.3g}, skewness {skew:.3g}, kurtosis {kurt:.3g}</p>")


def _runs(page: FeaturePage) -> str:
    head = "<h2>Steering and ablation runs</h2>"
    if page.runs_note:
        return f"{head}<p class='note'>{e(page.runs_note)}</p>"
    if not page.runs:
        return (f"{head}<p class='meta' id='runs'>none recorded for this feature: steer_generate and "
                "ablate_and_test calls naming it appear here (the ledger)</p>")
    items = "".join(
        f"<li data-run='{e(r.id)}' id='run-{e(r.id)}'><code>{e(r.id)}</code> "
        f"<span class='meta'>{e(when(r.time))}</span> "
        f"<b>{e(r.tool)}</b>({e(r.args)})<br>{'' if r.ok else '<span class=err>failed: </span>'}{e(r.summary)}</li>"
        for r in page.runs
    )
    return f"{head}<ul class='runs' id='runs'>{items}</ul>"


# ---------------------------------------------------------------------------------------------------------------
# The front page


def index_page(services: Services, query: str = "", sort: str = "label") -> str:
    sort = sort if sort in SORTS else SORTS[0]
    found = search(services, query) if query.strip() else None
    parts = [
        _head("sae-mcp features"), "<h1>sae-mcp features</h1>",
        "<form method='get' action='/' id='search'><input type='search' name='q' maxlength='500' "
        f"placeholder='search explanations and labels' value='{e(query)}'><input type='hidden' name='sort' "
        f"value='{e(sort)}'> <button>search</button></form>",
    ]
    if found is not None:
        parts.append(_found(found))
    for s in services.engine.saes.values():
        parts.append(_listing(listing(services, s, sort), query))
    parts.append("</body></html>")
    return "".join(parts)


def _found(found: Found) -> str:
    head = f"<h2>Search: {e(found.query)}</h2>"
    if not found.hits:
        return f"{head}<p class='meta' id='results'>{e(found.note or '')}</p>"
    if found.note:  # hits with a caution (by meaning alone)
        head += f"<p class='note'>{e(found.note)}</p>"
    rows = "".join(
        f"<tr><td><a href='{e(feature_url(h.sae, h.feature))}'>{h.feature}</a></td><td>{e(h.sae)}</td>"
        f"<td>{_text(h.description, LIST_CHARS)}</td><td class='meta'>{e(h.source)}</td>"
        f"<td class='num'>{h.score:.4g}</td>"
        f"<td class='meta scores'>{e(h.scored)}</td></tr>"
        for h in found.hits
    )
    return (f"{head}<p class='meta'>ranking: {e(found.ranking or '')} (as search_explanations); scored: the "
            "explanation's balanced accuracy per scoring method (score_explanation; 0.5 = chance)</p>"
            f"<table id='results'><tr><th>feature</th><th>SAE</th><th>explanation or label</th><th>source</th>"
            f"<th>match</th><th>scored</th></tr>{rows}</table>")


def _fidelity(lst: Listing) -> str:
    f = lst.fidelity
    if f is None:
        return f"<p class='meta fidelity'>fidelity: {e(lst.fidelity_note or 'unknown')}</p>"
    return (f"<p class='fidelity'>fidelity on {f.tokens:,} corpus tokens: explained variance "
            f"{f.explained_variance:.3g} · L0 {f.l0:.3g} · loss recovered {f.loss_recovered:.3g} (next-token loss "
            f"clean {f.loss_clean:.3g}, SAE spliced {f.loss_spliced:.3g}, hook zeroed {f.loss_zero_ablated:.3g} "
            f"nats) · {f.dead_in_sample:,} features dead in the sample</p>")


def _listing(lst: Listing, query: str) -> str:
    key = lst.key
    sorts = " · ".join(
        f"<b>by {s}</b>" if s == lst.sort else f"<a href='/?{e(urlencode({'q': query, 'sort': s}))}'>by {s}</a>"
        for s in SORTS)
    parts = [
        f"<h2 id='sae-{e(key)}'>{e(key)}</h2><p class='meta'>{lst.d_sae:,} features · {lst.labels} labels · "
        f"{lst.imported} imported explanations</p>", _fidelity(lst),
        f"<form action='{e(feature_url(key))}' method='get'>"  # a plain form: the page needs no script
        f"feature <input name='f' type='number' min='0' max='{lst.d_sae - 1}'> <button>open</button></form>",
        f"<p class='meta'>features {sorts}</p>",
    ]
    if lst.note:
        parts.append(f"<p class='note'>{e(lst.note)}</p>")
    elif not lst.rows:
        parts.append("<p class='meta'>no labelled features yet</p>" if lst.sort == "label" else "")
    else:
        rows = "".join(
            f"<tr><td><a href='{e(feature_url(key, r.feature))}'>{r.feature}</a></td>"
            f"<td class='num'>{'' if r.density is None else f'{r.density:.4g}'}</td>"
            f"<td>{_text(r.label, LIST_CHARS)}</td>"
            f"<td class='meta scores'>{e(r.scored)}</td><td class='meta'>{_text(r.explanation, LIST_CHARS)}</td></tr>"
            for r in lst.rows)
        parts.append(f"<table class='features' data-sort='{e(lst.sort)}'><tr><th>feature</th><th>density</th>"
                     f"<th>label</th><th>scored</th><th>explanation</th></tr>{rows}</table>")
    return "".join(parts)
