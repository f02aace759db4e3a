"""The markdown report of a session (`sae-mcp ledger export --format md`), read top to bottom by a person checking
the agent's work:

    the question        the session's first prompt, and what the session did in one line
    findings            per feature the session labelled or scored: each label with its scores (blind scores of
                        its text, from this session's runs or another's, or known when it was recorded) and the runs
                        it cites; explanations scored but never recorded as a label
    setup               the model, the SAEs, the packages
    appendix            every run in order, each under an anchor the findings link to: the call, its key numbers,
                        the server's warnings, the labels that cite it

Every text an agent wrote reaches the markdown through md_text, identifiers through md_code (session.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sae_mcp.ledger.export.rules import Label, export_rule
from sae_mcp.ledger.export.session import SessionData, call_markdown, md_code, md_text, recorded_summary
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.summary import fmt, when


@dataclass
class Score:
    """A blind score of an explanation, as the run that filed it recorded it (results/scoring.py ExplanationScore)."""

    run: Run
    body: dict


@dataclass
class Finding:
    sae: str | None
    feature: int
    labels: list[Label] = field(default_factory=list)
    unlabelled: list[Score] = field(default_factory=list)  # scores of texts recorded as no label here


def score_of(run: Run, data: SessionData) -> Score | None:
    """The score a run filed, where its tool's export rule says it is (a submission's result, or a blind set's
    score when the client's model answered it)."""
    score = export_rule(data.tools, run.tool).score
    if not run.ok or score is None:
        return None
    body = score(run.result or {})
    return Score(run, body) if isinstance(body, dict) and isinstance(body.get("metrics"), dict) else None


def is_of(score: Score, lab: Label) -> bool:
    """A score is the label's when it names the label, or scored the same text of the same feature (as the card
    shows a text's scores beside every label of it)."""
    s = score.body
    if lab.label_id is not None and s.get("label_id") == lab.label_id:
        return True
    return (s.get("feature") == lab.feature and s.get("explanation") == lab.label
            and (lab.sae is None or s.get("sae") in (None, lab.sae)))


def findings(data: SessionData) -> list[Finding]:
    """One finding per (SAE, feature) labelled or scored in the session, in order of first appearance."""
    out: dict[tuple[str | None, int], Finding] = {}
    labels = {lab.run_id: lab for lab in data.labels}
    for run in data.runs:
        if (lab := labels.get(run.id)) is not None:
            out.setdefault((lab.sae, lab.feature), Finding(lab.sae, lab.feature)).labels.append(lab)
        elif (score := score_of(run, data)) is not None and not any(is_of(score, lab) for lab in data.labels):
            key = (score.body.get("sae"), int(score.body.get("feature", -1)))
            out.setdefault(key, Finding(*key)).unlabelled.append(score)
    return list(out.values())


def _link(run_id: str, data: SessionData) -> str:
    """A run id linked to its entry in the appendix; a run of another session named with its session."""
    if any(r.id == run_id for r in data.runs):
        return f"[{md_code(run_id)}](#{_anchor(run_id)})"
    other = next((r for r in data.scored_elsewhere if r.id == run_id), None)
    return md_code(run_id) + (f" (session {md_code(other.session)})" if other else " (an earlier session)")


def _score_line(score: Score, data: SessionData) -> str:
    s = score.body
    m = s["metrics"]
    lo, hi = (m.get("interval_95") or [None, None])[:2]
    blind = ", NOT BLIND: contexts looked up" if s.get("looked_up") else ""
    return (f"{md_text(s.get('method'))} balanced accuracy **{fmt(m.get('balanced_accuracy'))}** (95% {fmt(lo)}-"
            f"{fmt(hi)}) over {s.get('n')} contexts{blind} ({_link(score.run.id, data)}, {when(score.run.time)})")


def _label_lines(lab: Label, data: SessionData) -> list[str]:
    scores = [sc for r in data.runs + data.scored_elsewhere if (sc := score_of(r, data)) and is_of(sc, lab)]
    filed = {sc.body.get("score_id") for sc in scores}
    earlier = [b for b in lab.scored if b.get("score_id") not in filed]  # scored before: its run not in the ledger
    lines = [f"- Label *{md_text(lab.label)}* ({_link(lab.run_id, data)})"]
    lines += [f"  - Score: {_score_line(sc, data)}" for sc in scores]
    lines += [f"  - Score (of this text, before the label): {md_text(b.get('method'))} balanced accuracy "
              f"**{fmt(b.get('balanced_accuracy'))}** over {b.get('n')} contexts" for b in earlier]
    if not scores and not earlier:
        lines.append("  - Not scored blind")
    if lab.evidence:
        lines.append(f"  - Evidence: {md_text(lab.evidence)}")
    by_id = {r.id: r for r in data.runs}
    for rid in lab.evidence_runs:
        run = by_id.get(rid)
        what = md_text(f"{run.tool}: {recorded_summary(run, data)}") if run else ""
        lines.append(f"  - Cites {_link(rid, data)}" + (f" {what}" if what else ""))
    if not lab.evidence_runs:
        lines.append("  - Cites no run")
    return lines


def _findings(data: SessionData) -> list[str]:
    found = findings(data)
    if not found:
        return ["## Findings", "", "No feature was labelled or scored."]
    lines = ["## Findings"]
    for f in found:
        lines += ["", f"### Feature {f.feature}" + (f" ({md_code(f.sae)})" if f.sae else ""), ""]
        for lab in f.labels:
            lines += _label_lines(lab, data)
        for sc in f.unlabelled:
            lines += [f"- Scored, not recorded as a label: *{md_text(sc.body.get('explanation'))}*",
                      f"  - Score: {_score_line(sc, data)}"]
    return lines


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


def _run(run: Run, data: SessionData) -> list[str]:
    lines = [f'<a id="{_anchor(run.id)}"></a>', f"### {md_code(run.id)} {md_text(run.tool, 64)}"
             + ("" if run.ok else " (failed)"), "",
             f"{call_markdown(run)} ({when(run.time)}, {run.wall_s * 1000:.0f} ms)", "",
             f"- {md_text(recorded_summary(run, data))}"]
    details = export_rule(data.tools, run.tool).details  # a few more numbers, for the tools whose result is a table
    if run.ok and details is not None:
        lines += details(run.result or {})
    lines += [f"- server warning: {md_text(w)}" for w in (run.result or {}).get("warnings") or []]
    lines += [f"- cited by the label on feature {lab.feature}: *{md_text(lab.label, 120)}* ({_link(lab.run_id, data)})"
              for lab in data.cited_by(run.id)]
    return lines + [""]


def _anchor(run_id: str) -> str:
    """A run id as an HTML anchor (ids are base-32 letters and digits; anything else is dropped)."""
    return "".join(c for c in run_id if c.isascii() and c.isalnum())


def write_md(data: SessionData, path: Path) -> None:
    runs = data.runs
    failed = sum(not r.ok for r in runs)
    scored = sum(score_of(r, data) is not None for r in runs)
    head = [f"# sae-mcp session `{data.id}`", "",
            f"**Question**: {md_text(repr(data.question))}" if data.question else "**Question**: (no prompt was given)",
            "",
            f"{len(runs)} runs from {when(runs[0].time)} to {when(runs[-1].time)}: {len(data.labels)} labels, "
            f"{scored} blind scores, {failed} failed; every run is in the appendix.", ""]
    body = _findings(data) + [""] + _setup(data) + ["", "## Appendix: every run", ""]
    for run in runs:
        body += _run(run, data)
    Path(path).write_text("\n".join(head + body) + "\n", encoding="utf-8")
