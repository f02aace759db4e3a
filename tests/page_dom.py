"""Read a feature page's HTML (as served, or Chromium's --dump-dom after its script ran) into what the tests check:
the example rows with their token spans, the test box's tokens and its top-feature list."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Tok:
    cls: set[str]
    style: str
    act: float | None
    title: str
    pos: int | None
    text: str = ""

    @property
    def alpha(self) -> float | None:
        """The background's opacity (rgb() without alpha: 1), None without a background."""
        m = re.search(r"rgba?\(([^)]*)\)", self.style)
        if m is None:
            return None
        parts = [p.strip() for p in m.group(1).split(",")]
        return float(parts[3]) if len(parts) == 4 else 1.0


@dataclass
class Row:
    group: str
    document: int
    offset: int
    count: int
    toks: list[Tok] = field(default_factory=list)


@dataclass
class Dom:
    rows: list[Row] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # 'top' | 'interval', in page order
    test_toks: list[Tok] = field(default_factory=list)  # the test box's token spans (after its script ran)
    test_top: list[tuple[int, float]] = field(default_factory=list)  # (feature, activation) at the selected token
    test_top_pos: int | None = None
    scale: float | None = None


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.dom = Dom()
        self.tok: Tok | None = None
        self.depth = 0  # spans open inside the current token
        self.where: str | None = None  # 'row' | 'test'

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        cls = set(a.get("class", "").split())
        if a.get("id") == "scale" and "data-scale" in a:
            self.dom.scale = float(a["data-scale"])
        if tag == "ul" and "exs" in cls:
            self.dom.groups.append(a.get("data-group", ""))
        elif tag == "li" and "exrow" in cls:
            self.dom.rows.append(Row(self.dom.groups[-1], int(a["data-document"]), int(a["data-offset"]),
                                     int(a["data-count"])))
            self.where = "row"
        elif tag == "div" and a.get("id") == "test-out":
            self.where = "test"
        elif tag == "ol" and a.get("id") == "test-top-list":
            self.dom.test_top_pos = int(a["data-pos"])
        elif tag == "li" and "data-feature" in a:
            self.dom.test_top.append((int(a["data-feature"]), float(a["data-act"])))
        if tag == "span" and self.tok is not None:
            self.depth += 1
        elif tag == "span" and "t" in cls and self.where in ("row", "test"):
            act = float(a["data-act"]) if "data-act" in a else None
            pos = int(a["data-pos"]) if "data-pos" in a else None
            self.tok = Tok(cls, a.get("style", ""), act, a.get("title", ""), pos)
            (self.dom.rows[-1].toks if self.where == "row" else self.dom.test_toks).append(self.tok)
            self.depth = 0

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self.tok is not None:
            if self.depth == 0:
                self.tok = None
            else:
                self.depth -= 1
        elif tag in ("li", "div") and self.tok is None and self.where is not None:
            self.where = None

    def handle_data(self, data: str) -> None:
        if self.tok is not None:
            self.tok.text += data


def parse(html: str) -> Dom:
    p = _Parser()
    p.feed(html)
    return p.dom
