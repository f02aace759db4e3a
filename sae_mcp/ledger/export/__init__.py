"""Exporting a recorded session (`sae-mcp ledger export`), and replaying it (`sae-mcp ledger replay`, replay.py).

    cells(data)                       markdown + code cells: the setup (preamble.py), then per run its markdown
                                      (the call, its key numbers, the server's warnings, the labels citing it) and,
                                      for the tools whose export rule has a cell (ExportRule.cell, in each tool's
                                      module), code that redoes it and asserts the recorded numbers
    write_py(cells, path)             a script in the percent format (# %%): runs as `python FILE`, opens as a
                                      notebook in editors that read the format
    write_ipynb(cells, path)          a Jupyter notebook (nbformat 4.5, written as JSON: no nbformat needed)
    report.write_md(data, path)       a readable report: the question, what was found per feature (each label
                                      with its blind scores and the runs it cites), the setup, every run

Runs of the other tools, and failed runs, are listed as markdown. The session's data carries the registered tools
(load_session(store, ref, tools)): nothing here names a tool.
"""

from __future__ import annotations

import json
from pathlib import Path

from sae_mcp.ledger.export.preamble import preamble
from sae_mcp.ledger.export.rules import ExportRule, Redone, export_rule
from sae_mcp.ledger.export.session import Cell, SessionData, label_markdown, md_text, run_markdown
from sae_mcp.ledger.records import Run

FORMATS = ("py", "ipynb", "md")


def _note(run: Run, rule: ExportRule) -> str | None:
    notes = []
    if run.truncated:
        notes.append("The ledger kept a cut copy of this result (long lists shortened): the cell checks what it kept.")
    if rule.note is not None and (note := rule.note(run)):
        notes.append(note)
    return " ".join(notes) or None


def _run_cells(run: Run, data: SessionData) -> list[Cell]:
    if not run.ok:
        return [("markdown", run_markdown(run, data, "Not redone: the call failed."))]
    rule = export_rule(data.tools, run.tool)
    if rule.cell is None or not run.result or not run.resolved:
        return [("markdown", run_markdown(run, data, None if rule.cell else
                                          "Listed only: not a tool this export redoes."))]
    try:
        code = rule.cell(Redone(id=run.id, resolved=run.resolved, result=run.result, truncated=run.truncated))
    except (KeyError, TypeError, IndexError) as exc:  # a run recorded before a field existed, or cut away
        return [("markdown", run_markdown(run, data, f"Not redone: the record lacks {md_text(exc)}."))]
    return [("markdown", run_markdown(run, data, _note(run, rule))), ("code", code)]


def cells(data: SessionData) -> list[Cell]:
    redoes = {name for name in data.tools if export_rule(data.tools, name).cell is not None}
    used = {r.tool for r in data.runs if r.ok and r.tool in redoes}
    helpers = {name: list(export_rule(data.tools, name).helpers) for name in redoes}
    out, redone = preamble(data, used, helpers), 0
    for run in data.runs:
        made = _run_cells(run, data)
        redone += any(kind == "code" for kind, _ in made)
        out += made
    uncited = [lab for lab in data.labels if not lab.evidence_runs]
    if uncited:
        out.append(("markdown", "## Labels that cite no run\n\n" + "\n\n".join(label_markdown(x) for x in uncited)))
    out.append(("code", f"print('every redone run matched the ledger ({redone} runs)')\n"))
    return out


def write_py(cs: list[Cell], path: Path) -> None:
    """The cells as a percent-format script; refused (ValueError) rather than written when it would not compile, so
    a text that slipped past the escaping (session.py) cannot leave a script that fails at its first line."""
    parts = []
    for kind, source in cs:
        if kind == "markdown":
            parts.append("# %% [markdown]\n" + "\n".join(f"# {line}".rstrip() for line in source.splitlines()))
        else:
            parts.append("# %%\n" + source.rstrip("\n"))
    text = "\n\n".join(parts) + "\n"
    try:
        compile(text, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"the exported script would not compile ({exc}); please report this session") from None
    Path(path).write_text(text, encoding="utf-8")


def write_ipynb(cs: list[Cell], path: Path) -> None:
    nb_cells = []
    for i, (kind, source) in enumerate(cs):
        cell: dict[str, object] = {"cell_type": kind, "id": f"cell-{i}", "metadata": {},
                                   "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        nb_cells.append(cell)
    nb = {"cells": nb_cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                       "language_info": {"name": "python"}}}
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def export(data: SessionData, fmt: str, path: Path) -> None:
    from sae_mcp.ledger.export.report import write_md

    if fmt == "md":
        write_md(data, path)
    elif fmt == "py":
        write_py(cells(data), path)
    elif fmt == "ipynb":
        write_ipynb(cells(data), path)
    else:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
