"""A recorded session as the exporters read it: its runs in order, the environment they ran against, the labels
the agent wrote (with the runs they cite), and the pieces every format shares (markdown of a run, literals).

Every text an agent, a client or a corpus wrote (labels, evidence, arguments, prompts, errors, warnings, tool names)
reaches the markdown through md_text(): one line with control characters written out (a NUL byte in a label made
the exported .py a SyntaxError; a line break could start a heading or a `# %%` cell), HTML escaped, markdown's
inline punctuation escaped, and URLs broken, so `<script>` and `![x](http://remote/beacon.png)` read as text in
the report and the notebook and nothing is fetched when they are opened. Code cells hold such text only as Python
literals (repr, lit()), which write control characters out.
"""

from __future__ import annotations

import html
import pprint
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sae_mcp.errors import NotFound
from sae_mcp.ledger.export.rules import Exported, Label, export_rule
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.rule import rule_of
from sae_mcp.ledger.store import LedgerStore
from sae_mcp.ledger.summary import args_line, first_prompt, summarize, when
from sae_mcp.one_line import one_line

MD_PUNCTUATION = re.compile(r"[\\`*\[\]|~$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
"""Markdown's inline syntax: escapes, code, emphasis (an intraword _ cannot open one), links and images, tables,
strikethrough, notebook math ($)."""
URL = re.compile(r"://|\bwww\.", re.IGNORECASE)

Cell = tuple[str, str]  # ('markdown' | 'code', source)



@dataclass
class SessionData:
    id: str
    runs: list[Run]
    env: dict
    tools: Mapping[str, Exported]
    """The registered tools by name (sae_mcp.server.tools.tool_map()): how each tool's runs are summarised, redone,
    reported and replayed."""
    envs: dict[str, dict] = field(default_factory=dict)  # every environment a run points to
    labels: list[Label] = field(default_factory=list)
    scored_elsewhere: list[Run] = field(default_factory=list)
    """Scoring runs of other sessions about the features labelled here (a label scored in a later conversation)."""

    @property
    def question(self) -> str | None:
        """The first prompt of the session: what the investigation started from."""
        return next((p for r in self.runs if (p := first_prompt(r.given))), None)

    def cited_by(self, run_id: str) -> list[Label]:
        return [lab for lab in self.labels if run_id in lab.evidence_runs]


def load_session(store: LedgerStore, ref: str | None, tools: Mapping[str, Exported]) -> SessionData:
    """The session `ref` (an id, a unique prefix, or None for the latest) from the store; `tools`: the registered
    tools by name."""
    sid = store.resolve_session(ref)
    runs = store.runs(session=sid, limit=100_000)
    if not runs:
        raise NotFound(f"session {sid} has no runs")
    envs = {r.env: store.env(r.env) or {} for r in runs if r.env}
    env = envs.get(runs[-1].env or "") or next(iter(envs.values()), {})
    labels = []
    for r in runs:
        label_of = export_rule(tools, r.tool).label  # the tools whose runs record a label
        if r.ok and label_of is not None:
            labels.append(label_of(r))
    scoring = [name for name in tools if export_rule(tools, name).score is not None]  # their runs can hold a score
    elsewhere = [r for sae, feature in dict.fromkeys((lab.sae, lab.feature) for lab in labels)
                 for tool in scoring for r in store.runs(tool=tool, feature=feature, sae=sae)
                 if r.session != sid and r.ok]
    return SessionData(id=sid, runs=runs, env=env, tools=tools, envs=envs, labels=labels,
                       scored_elsewhere=sorted(elsewhere, key=lambda r: r.time))


def md_text(text: object, max_chars: int | None = None) -> str:
    """Untrusted text as inert markdown on one line (see the module's docstring), cut to max_chars when given."""
    line = one_line(str(text))
    if max_chars is not None and len(line) > max_chars:
        line = line[:max_chars] + f"… (+{len(line) - max_chars:,} characters)"
    line = MD_PUNCTUATION.sub(lambda m: "\\" + m[0], html.escape(line, quote=False))
    return URL.sub(lambda m: "&#58;//" if m[0] == "://" else m[0][:3] + "&#46;", line)


def md_code(text: object) -> str:
    """An identifier (a run id, a weights hash, an SAE key) as a markdown code span: one line, no backtick inside
    (the only character that ends one; HTML and links inside a code span are text)."""
    return "`" + one_line(str(text)).replace("`", "'") + "`"


def items(xs: list | None) -> list:
    """A recorded list without the ledger's '{left_out: n}' marker (a cut copy checks what it kept)."""
    return [x for x in xs or [] if not (isinstance(x, dict) and set(x) == {"left_out"})]


def lit(value: Any, indent: int = 0) -> str:
    """A Python literal of JSON data, wrapped to fit 110 columns (continuation lines indented)."""
    text = pprint.pformat(value, width=110 - indent, compact=True, sort_dicts=False)
    return text.replace("\n", "\n" + " " * indent)


def label_markdown(lab: Label) -> str:
    cites = ", ".join(f"`{r}`" for r in lab.evidence_runs)
    return (f"**Label** on feature {lab.feature} ({md_code(lab.sae)}): *{md_text(lab.label)}*"
            + (f"  \nEvidence: {md_text(lab.evidence)}" if lab.evidence else "")
            + (f"  \nCites runs: {cites}" if cites else ""))


def call_markdown(run: Run) -> str:
    """The call as given: tool(arguments), each argument cut (ledger/summary.py args_line), as inert markdown."""
    return md_text(f"{run.tool}({args_line(run.given)})")


def run_heading(run: Run) -> str:
    return f"### `{run.id}` {md_text(run.tool, 64)} ({when(run.time)}, {run.wall_s * 1000:.0f} ms)"


def recorded_summary(run: Run, data: SessionData) -> str:
    """The run's key numbers, from the result the ledger kept, by its tool's rule."""
    return summarize(rule_of(data.tools, run.tool), run.result, run.ok, run.error)


def run_markdown(run: Run, data: SessionData, note: str | None = None) -> str:
    """Heading, the call as given, its key numbers, the server's warnings, and the labels that cite it."""
    lines = [run_heading(run), "", call_markdown(run), "", f"Recorded: {md_text(recorded_summary(run, data))}"]
    for w in (run.result or {}).get("warnings") or []:
        lines += ["", f"> server warning: {md_text(w)}"]
    for lab in data.cited_by(run.id):
        lines += ["", label_markdown(lab)]
    if note:
        lines += ["", note]
    return "\n".join(lines)
