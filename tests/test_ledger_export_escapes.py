"""Exports a person can run and open safely: a label made of every C0 control character (NUL included), quotes,
braces and line separators, HTML and remote images still gives a script that runs (a NUL byte made it a
SyntaxError), a valid notebook, and a report and notebook markdown where `<script>` and
`![x](http://remote/beacon.png)` are text: no live HTML, no remote link or image, no forged heading."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser

import anyio
import pytest
from markdown_it import MarkdownIt
from mcp import Client

from sae_mcp.ledger.export import cells, write_py
from sae_mcp.ledger.export.session import SessionData, load_session
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.store import LedgerStore
from sae_mcp.server.app import build_server
from sae_mcp.server.tools import tool_map
from sae_mcp.settings import Settings

from helpers.models import STORIES_HF, only_sae
from helpers.servers import CLI_ENV, cli
from helpers.session import WITHOUT_SAE_MCP

C0 = "".join(chr(i) for i in range(32)) + "\x7f"
HOSTILE = ("cats" + C0 + " 'single' \"double\" {braces} {{f}} \\ \u2028\u2029\n\n## Forged heading\n"
           "<script>alert(1)</script> ![x](http://remote/beacon.png) [link](https://remote/x) www.remote.org "
           "<img src=http://remote/i.png> *emphasis* `code` $x$ | ~")
PROMPT = "Once upon a time \"quoted\" {braces} <b>bold</b>\u2028\x07 end"


@pytest.fixture(scope="module")
def hostile(stories_engine, tmp_path_factory):
    """A real session whose label, evidence, prompt, a rejected call's arguments and a tool name are hostile."""
    data_dir = tmp_path_factory.mktemp("hostile_export")
    server = build_server(stories_engine, Settings(model=str(STORIES_HF), saes=(str(only_sae(stories_engine).source),),
                                                   data_dir=data_dir))

    async def go():
        async with Client(server) as client:
            acts = await client.call_tool("get_feature_acts", {"prompt": PROMPT, "top_k": 3})
            nxt = await client.call_tool("next_token", {"prompt": PROMPT, "top_k": 3})
            label = await client.call_tool("label_feature", {"feature": 7, "label": HOSTILE[:1000], "evidence": HOSTILE,
                                                             "evidence_runs": [acts.structured_content["run_id"]]})
            bad = await client.call_tool("label_feature", {"feature": 7, "label": HOSTILE * 20})
            unknown = await client.call_tool("evil" + C0 + "<script>", {"x": HOSTILE})
            return acts, nxt, label, bad, unknown

    acts, nxt, label, bad, unknown = anyio.run(go)
    assert not acts.is_error and not nxt.is_error and not label.is_error  # the label is accepted as written
    assert bad.is_error and unknown.is_error
    store = LedgerStore.for_data_dir(data_dir)
    (session,) = store.sessions()
    return dict(data_dir=data_dir, data=load_session(store, session.id, tool_map()))


def rendered(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)


class Elements(HTMLParser):
    """The elements and attributes of a rendered page (what a browser would build, not its text)."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_inert(markdown: str) -> None:
    """Rendered, the markdown has no element an agent's text put there, and nothing points off the machine."""
    page = rendered(markdown)
    tags = Elements(page).tags
    assert {t for t, _ in tags} <= {"h1", "h2", "h3", "p", "code", "em", "strong", "ul", "li", "blockquote", "br",
                                    "a"}, {t for t, _ in tags}
    links = [attrs for t, attrs in tags if t == "a"]  # the report's own: anchors on runs, links to them
    assert all(set(a) == {"id"} or set(a) == {"href"} and a["href"].startswith("#") for a in links), links
    assert all(t == "a" or not attrs for t, attrs in tags)  # no src, no style, no handler
    assert "Forged heading</h" not in page and "://" not in markdown and "www.remote" not in markdown
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]", markdown)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "beacon.png" in page  # shown, as text


def test_the_script_with_every_control_character_in_a_label_compiles_and_runs(hostile, tmp_path):
    path = tmp_path / "hostile.py"
    rc, out = cli("ledger", "export", "--data-dir", str(hostile["data_dir"]), "--format", "py", "--out", str(path))
    assert rc == 0 and "5 runs, 1 labels" in out
    source = path.read_text(encoding="utf-8")
    assert "\x00" not in source and "\u2028" not in source
    done = subprocess.run([sys.executable, "-c", WITHOUT_SAE_MCP, str(path)], capture_output=True, text=True,
                          env=CLI_ENV, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("every redone run matched the ledger (2 runs)")
    comments = "\n".join(line[2:] for line in source.splitlines() if line.startswith("# "))
    assert_inert(comments.replace("%% [markdown]", ""))


def test_the_notebook_is_valid_and_its_markdown_inert(hostile, tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
    path = tmp_path / "hostile.ipynb"
    rc, _ = cli("ledger", "export", "--data-dir", str(hostile["data_dir"]), "--format", "ipynb", "--out", str(path))
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    markdown = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert rc == 0 and "Label** on feature 7" in markdown
    assert_inert(markdown)
    for c in nb.cells:
        if c.cell_type == "code":
            compile(c.source, "cell", "exec")


def test_the_report_has_no_live_html_remote_image_or_forged_heading(hostile, tmp_path):
    path = tmp_path / "hostile.md"
    rc, _ = cli("ledger", "export", "--data-dir", str(hostile["data_dir"]), "--format", "md", "--out", str(path))
    text = path.read_text(encoding="utf-8")
    assert rc == 0
    assert_inert(text)
    page = rendered(text)
    headings = re.findall(r"<h\d>(.*?)</h\d>", page)
    assert headings[:2] == [f"sae-mcp session <code>{hostile['data'].id}</code>", "Findings"]
    assert headings[2].startswith("Feature 7 (<code>")
    assert "cats\\x00\\x01" in page  # the control characters written out, not dropped
    assert page.count("<li>Label <em>cats") == 1  # the label, one list item


def test_a_script_that_would_not_compile_is_refused(tmp_path):
    with pytest.raises(ValueError, match="would not compile"):
        write_py([("code", "x = 'a\x00b'\n")], tmp_path / "bad.py")
    assert not (tmp_path / "bad.py").exists()
    run = Run(id="r1", session="s", env=None, time=0.0, tool="feature_card", given={"x": C0}, resolved={},
              wall_s=0.0, ok=False, error=C0)
    write_py(cells(SessionData(id="s", runs=[run], env={}, tools=tool_map())), tmp_path / "ok.py")  # a failed run
    text = (tmp_path / "ok.py").read_text()
    compile(text, "ok.py", "exec")
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", text) and "\\\\x00\\\\x01" in text  # written out
