"""The pages' inline CSS and their one script (the feature page's test box), with the script's CSP hash.

Nothing is loaded from anywhere: the box may be offline, and the CSP (security.py) allows no source but this
script, by its SHA-256, and fetches to this server. The script builds every node with textContent, never markup,
so nothing typed or returned can inject HTML.
"""

from __future__ import annotations

import base64
import hashlib

SHADE_RGB = "255,140,0"  # token shading: this colour at opacity activation / scale


def shade(act: float, scale: float) -> str:
    """The background of a token whose activation is `act` on a page whose full shade is `scale` (the script's
    shade() writes the same)."""
    alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
    return f"rgba({SHADE_RGB},{alpha:.3f})"


def visible(token: str) -> str:
    """A token as shown inside an example: newlines, tabs and carriage returns as visible marks (one line per
    example), everything else as it is."""
    return token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")


CSS = """
:root{--ink:#1f2328;--muted:#656d76;--line:#d0d7de;--pos:#1a7f37;--neg:#cf222e;--hl:rgb(255,140,0)}
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:68rem;margin:1.5rem auto;padding:0 1rem;
color:var(--ink);line-height:1.45}
h1{font-size:1.45rem;margin:.2rem 0}h2{font-size:1.1rem;margin-top:1.6rem;border-bottom:1px solid var(--line);
padding-bottom:.2rem}h3{font-size:.95rem;margin:1rem 0 .3rem}
a{color:#0969da}.meta{color:var(--muted);font-size:.88rem}code,.tok,.ex,.num{font-family:ui-monospace,
SFMono-Regular,Menlo,monospace}.num{font-variant-numeric:tabular-nums}
nav{font-size:.9rem;margin-bottom:.6rem}.note{background:#fff8c5;border:1px solid #d4a72c66;padding:.3rem .6rem;
border-radius:4px;font-size:.9rem}
ul.expl{padding-left:1.2rem}ul.expl li{margin:.25rem 0}.label{font-weight:600}.label .meta,h2 .meta{font-weight:400}
.scale{font-size:.85rem;color:var(--muted);margin:.4rem 0}
.scale .bar{display:inline-block;vertical-align:middle;margin:0 .3rem;width:12rem;height:.8rem;
border:1px solid var(--line);background:linear-gradient(90deg,rgba(255,140,0,0),rgba(255,140,0,1))}
.exs{list-style:none;padding:0;margin:0}.exs li{display:flex;gap:.6rem;align-items:baseline;padding:.15rem 0;
border-bottom:1px solid #f0f2f4}.exs .act{min-width:4.5rem;text-align:right;color:var(--muted);font-size:.85rem}
.exs .cnt{min-width:2.6rem;color:var(--muted);font-size:.8rem}
.ex{white-space:pre-wrap;word-break:break-word;font-size:.9rem;flex:1}
.t{border-radius:2px;padding:1px 0}.t.max{outline:1.5px solid #9a3412;outline-offset:0}.t.bos{color:#8c959f}
.nl{color:#8c959f}.t.sel{outline:2px solid #0969da}#test-out .t{cursor:pointer}
.bars{display:grid;grid-template-columns:1fr 1fr;gap:1.5rem}.bl{list-style:none;padding:0;margin:0}
.bl li{display:grid;grid-template-columns:9rem 1fr 4rem;gap:.4rem;align-items:center;font-size:.85rem}
.bl .track{background:#f6f8fa;height:.75rem}.bl .fill{height:100%}.bl .pos{background:var(--pos)}
.bl .neg{background:var(--neg)}.bl .tok{overflow:hidden;text-overflow:ellipsis;white-space:pre}
svg.hist text{font:11px system-ui,sans-serif;fill:var(--muted)}svg.hist .bar{fill:#4a78c2}
svg.hist .bar:hover{fill:#2f5ea8}svg.hist .axis{stroke:#57606a}svg.hist .grid{stroke:#eaeef2}
table{border-collapse:collapse}td,th{padding:.15rem .6rem;text-align:left;vertical-align:top}
th{font-size:.85rem;color:var(--muted);border-bottom:1px solid var(--line)}tr:nth-child(even) td{background:#f6f8fa}
textarea{width:100%;min-height:4.5rem;font:inherit;font-family:ui-monospace,monospace;box-sizing:border-box}
#test-top ol{columns:2;font-size:.88rem}#test-top a.self{font-weight:700}
form.inline{display:inline}input[type=search]{width:24rem;max-width:100%}
.runs li{margin:.3rem 0;font-size:.88rem}.err{color:var(--neg)}
"""

SCRIPT = """
(() => {
  "use strict";
  const box = document.getElementById("testbox");
  if (!box) return;
  const form = box.querySelector("form");
  const out = document.getElementById("test-out");
  const topList = document.getElementById("test-top");
  const said = document.getElementById("test-status");
  const api = box.dataset.api, pages = box.dataset.pages;
  const feature = Number(box.dataset.feature), maxChars = Number(box.dataset.max);
  const visible = (t) => t.replace(/\\n/g, "\\u23ce").replace(/\\t/g, "\\u21e5").replace(/\\r/g, "\\u240d");
  const shade = (a, scale) => `rgba(255,140,0,${Math.min(1, Math.max(0, a / scale)).toFixed(3)})`;
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  function showTop(d, i) {
    for (const s of out.querySelectorAll(".sel")) s.classList.remove("sel");
    out.children[i].classList.add("sel");
    const head = el("p", "meta", `position ${i} ${JSON.stringify(d.tokens[i])} \\u00b7 L0 ${d.l0[i]} \\u00b7 ` +
      `feature ${feature}: ${d.acts[i]}`);
    const ol = el("ol");
    ol.id = "test-top-list";
    ol.dataset.pos = String(i);
    for (const [f, a] of d.top[i]) {
      const li = el("li"), link = el("a", f === feature ? "self" : "", String(f));
      link.href = pages + f;
      li.dataset.feature = String(f);
      li.dataset.act = String(a);
      li.append(link, " ", el("span", "num", String(a)));
      ol.append(li);
    }
    if (!d.top[i].length) ol.append(el("li", "meta", "no feature fires here"));
    topList.replaceChildren(head, ol);
  }
  function render(d) {
    const first = d.bos ? 1 : 0, acts = d.acts.slice(first);
    const peak = acts.length ? Math.max(...acts) : 0;
    const scale = Math.max(d.max_activation || 0, peak) || 1;
    out.replaceChildren();
    out.dataset.scale = String(scale);
    d.tokens.forEach((t, i) => {
      const s = el("span", i < first ? "t bos" : "t", visible(t));
      if (i >= first) s.style.background = shade(d.acts[i], scale);
      s.title = `${JSON.stringify(t)} ${d.acts[i]}`;
      s.dataset.act = String(d.acts[i]);
      s.dataset.pos = String(i);
      s.tabIndex = 0;
      s.addEventListener("click", () => showTop(d, i));
      s.addEventListener("keydown", (e) => { if (e.key === "Enter") showTop(d, i); });
      out.append(s);
    });
    const known = d.max_activation ? ` (the feature's max in the index: ${d.max_activation})` : "";
    said.textContent = `${d.tokens.length} tokens \\u00b7 max here ${peak} \\u00b7 ` +
      `shading 0 \\u2013 ${scale}${known}. Click a token for the features firing there.` +
      (d.warnings.length ? " " + d.warnings.join(" ") : "");
    let best = first;
    d.acts.forEach((a, i) => { if (i >= first && a > d.acts[best]) best = i; });
    if (best < d.tokens.length) showTop(d, best);
  }
  async function run() {
    const text = form.elements.text.value;
    if (!text.trim()) { said.textContent = "Type some text first."; return; }
    if (text.length > maxChars) {
      said.textContent = `The text is ${text.length} characters; the box takes at most ${maxChars}.`;
      return;
    }
    said.textContent = "Running\\u2026";
    try {
      const r = await fetch(`${api}?text=${encodeURIComponent(text)}`, {headers: {accept: "application/json"}});
      const d = await r.json();
      if (!r.ok) { said.textContent = d.error || `error ${r.status}`; return; }
      render(d);
    } catch (e) {
      said.textContent = `The request failed: ${e}`;
    }
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); run(); });
  if (form.elements.text.value.trim()) run();
})();
"""

SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
"""The CSP source that lets exactly this script run (security.CSP)."""
