"""submit_predictions: the score of the agent's predictions on a blind set (balanced accuracy with its 95%
interval, precision, recall, F1, per band, the contexts misjudged with their activations), stored with the
explanation; answered once, with the set's submit secret.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from mcp.server.mcpserver import Context
from pydantic import Field

from sae_mcp.ledger import summary as ls
from sae_mcp.ledger.bounds import SECRET_FIELDS
from sae_mcp.ledger.export.rules import ExportRule, Handed, ReplayRule
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.scoring import ExplanationScore
from sae_mcp.server.text import fmt, join, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, hands_out_challenges


def make(deps: ToolDeps) -> Callable[..., ExplanationScore]:
    scorer = deps.services.scorer

    def submit_predictions(
        challenge_id: Annotated[str, Field(min_length=1, max_length=64)],
        submit_secret: Annotated[str, Field(min_length=1, max_length=64)],
        predictions: Annotated[
            dict[Annotated[str, Field(max_length=16)], bool],
            Field(min_length=1, max_length=100, description='{"1": true, "2": false, ...}'),
        ],
        mcp_context: Context | None = None,
    ) -> ExplanationScore:
        """Score your predictions on a blind set (once, with its submit_secret)."""
        return scorer.submit(challenge_id, submit_secret, {k.strip(): v for k, v in predictions.items()},
                             session=deps.conversations.id_of(mcp_context))

    return submit_predictions


def score_text(r: ExplanationScore) -> str:
    m = r.metrics
    precision = "n/a" if m.precision is None else fmt(m.precision)
    lines = [
        f"score {r.score_id} of {r.explanation!r}: feature {r.feature} (sae {r.sae}), {r.method}, {r.n} contexts, "
        f"seed {r.seed}, firing at max >= {r.min_activation:g} x its max, scorer {r.scorer}"
        + (f", label {r.label_id}" if r.label_id is not None else "") + (", NOT BLIND" if r.looked_up else ""),
        f"balanced accuracy {fmt(m.balanced_accuracy)} (95% {fmt(m.interval_95[0])}-{fmt(m.interval_95[1])}), "
        f"accuracy {fmt(m.accuracy)}, precision {precision}, recall {fmt(m.recall)}, specificity "
        f"{fmt(m.specificity)}, F1 {fmt(m.f1)} (" + " ".join(f"{k} {v}" for k, v in m.counts.items()) + ")",
        "per group, right/contexts: " + ", ".join(
            f"{g.group}" + (f" [{fmt(g.lower)}, {fmt(g.upper)}]" if g.lower is not None and g.upper is not None
                            else "") + f" {g.correct}/{g.n}"
            for g in r.groups),
    ]
    if r.misjudged:
        lines.append("misjudged (id: said -> truth, group, max activation[, at the mark]: context, max token in «»):")
        lines += [f"  {x.id}: {str(x.predicted).lower()} -> {str(x.truth).lower()}, {x.group}, {fmt(x.max_activation)}"
                  + (f", {fmt(x.marked_activation)}" if x.marked_activation is not None else "") + f": {x.text}"
                  for x in r.misjudged]
    return join(lines + warnings_lines(r.warnings))


def score_summary(s: JSON) -> str:
    m = s.get("metrics") or {}
    lo, hi = (m.get("interval_95") or [None, None])[:2]
    return (f"{s.get('method')} score of {s.get('explanation', '')[:40]!r} on feature {s.get('feature')}: balanced "
            f"accuracy {ls.fmt(m.get('balanced_accuracy'))} [{ls.fmt(lo)}, {ls.fmt(hi)}] over {s.get('n')} contexts")


def features(r: JSON) -> set[int]:
    return {r["feature"]} if isinstance(r.get("feature"), int) else set()


def replay_arguments(given: JSON, resolved: JSON, handed: Handed) -> JSON:
    """The blind set handed out again in the replay, answered with its own submit secret (the recorded one never
    was)."""
    found = handed.get(given.get("challenge_id"))
    if found is None:
        return given
    challenge_id, secret = found
    return {**given, "challenge_id": challenge_id,
            **{name: secret for name in SECRET_FIELDS.intersection(given) if secret is not None}}


def score_of(r: JSON) -> JSON | None:
    return r


SPEC = ToolSpec(
    name="submit_predictions",
    make=make,
    result=ExplanationScore,
    render=score_text,
    annotations=hands_out_challenges,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=score_summary, volatile=("challenge_id", "score_id"), bos=None, resolve=None,
                      features=features, keeps_runs=False, looks_up=False, on_feature_page=False),
    export=ExportRule(cell=None, helpers=(), note=None, details=None, label=None, score=score_of),
    replay=ReplayRule(skip_in_place=None, arguments=replay_arguments, hands_out=None),
)
