"""The markdown report of a session (`sae-mcp ledger export --format md`): the question (its first prompt), the
setup, each experiment with its key numbers, the labels with their evidence and the runs they cite, failed runs.
"""

from __future__ import annotations

from pathlib import Path

from sae_mcp.export.cells_read import items
from sae_mcp.export.session import SessionData, call_markdown, label_markdown, md_code, md_text
from sae_mcp.services.ledger_summary import fmt, summarize, when
from sae_mcp.store.ledger import Run


def _setup(data: SessionData) -> list[str]:
    env = data.env
    m, v = env.get("model", {}), env.get("versions", {})
    w = m.get("weights", {})
    lines = ["## Setup", "",
             f"- Model: **{md_text(m.get('name'))}** ({md_text(m.get('source'))}; weights {md_text(w.get('kind'))} "
             f"{md_code(w.get('value'))}), {md_text(m.get('dtype'))} on {md_text(m.get('device'))}, processing "
             f"{md_text(m.get('processing'))}"]
    for s in env.get("saes", []):
        lines.append(f"- SAE {md_code(s['key'])}: {md_text(s['source'])} (weights {md_code(s.get('weights_id'))}), "
                     f"{md_text(s.get('architecture'))}, d_sae {s.get('d_sae')}, hook {md_text(s.get('hook_name'))}")
    lines.append("- Packages: " + md_text(", ".join(f"{k} {val}" for k, val in v.items())))
    return lines


def _details(run: Run) -> list[str]:
    """A few more numbers than the one-line summary, for the tools whose result is a table."""
    r = run.result or {}
    if run.tool == "ablate_and_test" and r.get("summary"):
        return [f"- {md_text(r['summary'])}"]
    if run.tool == "steer_generate":
        return [f"- scale {fmt(s['scale'])}: KL {fmt(s['kl_next_token'])}, concept readout {s.get('concept_readout')}"
                f" (unsteered {r.get('unsteered_concept_readout')}), text: "
                + md_text(repr((items(s.get("continuations")) or [{}])[0].get("text", "")[:120]))
                for s in items(r.get("steered"))]
    if run.tool == "attribute":
        return [f"- {t['position']} {md_text(repr(t['token']))} feature {t['feature']}: attribution "
                f"{fmt(t['attribution'])}" + (f", exact contribution {fmt(x)}" if (x := t.get(
                    "exact_contribution", t.get("exact_effect"))) is not None else "")
                for t in items(r.get("top"))[:5]]
    if run.tool == "top_examples":
        return [f"- {fmt(e['activation'])}: " + md_text("".join(f"«{t}»" if i == e["position"] else t
                                                               for i, t in enumerate(e["tokens"])))
                for e in items(r.get("examples"))[:5]]
    return []


def _experiment(run: Run, data: SessionData) -> list[str]:
    lines = [f'<a id="{_anchor(run.id)}"></a>', f"### {md_code(run.id)} {md_text(run.tool, 64)}", "",
             f"{call_markdown(run)} ({when(run.time)}, {run.wall_s * 1000:.0f} ms)", "",
             f"- {md_text(summarize(run.tool, run.result, run.ok, run.error))}"]
    lines += _details(run)
    lines += [f"- server warning: {md_text(w)}" for w in (run.result or {}).get("warnings") or []]
    for lab in data.cited_by(run.id):
        lines += ["", label_markdown(lab)]
    return lines + [""]


def _labels(data: SessionData) -> list[str]:
    by_id = {r.id: r for r in data.runs}
    lines = ["## Labels", ""]
    for lab in data.labels:
        lines.append(f"- feature **{lab.feature}** ({md_code(lab.sae)}): *{md_text(lab.label)}*"
                     + (f". Evidence: {md_text(lab.evidence)}" if lab.evidence else "") + f" ({md_code(lab.run_id)})")
        for rid in lab.evidence_runs:
            run = by_id.get(rid)
            what = (md_text(f"{run.tool}: {summarize(run.tool, run.result, run.ok, run.error)}") if run
                    else "an earlier session")
            lines.append(f"  - [{md_code(rid)}](#{_anchor(rid)}) {what}")
    return lines if data.labels else ["## Labels", "", "No label was recorded."]


def _anchor(run_id: str) -> str:
    """A run id as an HTML anchor (ids are base-32 letters and digits; anything else is dropped)."""
    return "".join(c for c in run_id if c.isascii() and c.isalnum())


def write_md(data: SessionData, path: Path) -> None:
    runs = data.runs
    failed = [r for r in runs if not r.ok]
    experiments = [r for r in runs if r.ok and r.tool != "label_feature"]
    head = [f"# sae-mcp session `{data.id}`", "",
            f"**Question**: {md_text(repr(data.question))}" if data.question else "**Question**: (no prompt was given)",
            "",
            f"{len(runs)} runs from {when(runs[0].time)} to {when(runs[-1].time)}: {len(experiments)} experiments, "
            f"{len(data.labels)} labels, {len(failed)} failed.", ""]
    body = _setup(data) + ["", "## Experiments", ""]
    for run in experiments:
        body += _experiment(run, data)
    body += [""] + _labels(data)
    if failed:
        body += ["", "## Failed runs", ""]
        body += [f"- {md_code(r.id)} {call_markdown(r)}: {md_text(r.error)}" for r in failed]
    Path(path).write_text("\n".join(head + body) + "\n", encoding="utf-8")
