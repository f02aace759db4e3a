"""label_feature: the agent records its own explanation of a feature, with its evidence and the run ids it rests on;
with `score`, the same call hands out the label's blind set (as score_explanation does), so submit_predictions files
the score under the label. The one tool that writes.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from pydantic import BaseModel, Field

from sae_mcp.engine.runtime import CancelToken
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.ledger.export.rules import ExportRule, Handed, Label, ReplayRule
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.explain import LabelRecorded
from sae_mcp.scoring.blind_set import DEFAULT_MIN_ACTIVATION, MIN_ACTIVATION_RANGE
from sae_mcp.scoring.results import brief, brief_text
from sae_mcp.scoring.runs import BlindSetRequest
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.text import join, warnings_lines
from sae_mcp.server.tools.score_explanation import blind_set_text
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, hands_out_challenges


class ScoreRequest(BaseModel):
    """label_feature(score=...): the blind set to hand out for the label just recorded (as score_explanation)."""

    method: Literal["detection", "fuzzing"] = "detection"
    n: Annotated[int, Field(ge=4, le=100)] = 20
    seed: Annotated[int | None, Field(ge=0, le=2**31 - 1)] = None
    min_activation: Annotated[float, Field(ge=MIN_ACTIVATION_RANGE[0], le=MIN_ACTIVATION_RANGE[1])] = (
        DEFAULT_MIN_ACTIVATION)


def make(deps: ToolDeps) -> Callable[..., LabelRecorded]:
    engine, services, A = deps.engine, deps.services, deps.args
    scorer = services.scorer

    def label_feature(
        feature: Annotated[int, A.feature],
        label: Annotated[str, Field(min_length=1, max_length=1000)],
        sae: Annotated[str | None, A.sae] = None,
        evidence: Annotated[str | None, Field(max_length=4000, description="What supports it, with numbers")] = None,
        idempotency_key: Annotated[
            str | None, Field(min_length=1, max_length=128, description="A retry with it adds nothing")
        ] = None,
        evidence_runs: Annotated[
            list[Annotated[str, Field(max_length=32)]] | None,
            Field(max_length=64, description="run_ids it rests on"),
        ] = None,
        score: Annotated[ScoreRequest | None, Field(description="Also hand out its blind set, e.g. "
                                                    '{"n": 20}')] = None,
        mcp_context: Context | None = None,
    ) -> LabelRecorded:
        """Record your explanation of a feature, citing run_ids; with score, also get its blind set."""
        s = engine.sae(sae)
        engine.check_feature(s, feature)
        runs = list(dict.fromkeys(evidence_runs or [])) or None
        missing = services.ledger.store.missing(runs) if runs else []
        if missing:
            raise InvalidInput(f"evidence_runs: no run {', '.join(map(repr, missing))} in the ledger; cite the "
                               "run_id of results (ledger() lists them)")
        store = services.explanations
        rec = store.add_label(s.store_key, feature, label, (evidence or "").strip() or None, idempotency_key, runs)
        n = sum(1 for e in store.for_feature(s.store_key, feature) if e.source == "label")
        scored = services.scores.latest([(s.store_key, feature, rec.description)]).get(
            (s.store_key, feature, rec.description), [])
        assert rec.id is not None  # add_label answers with the stored row, which has its id
        recorded = LabelRecorded(feature=feature, sae=s.key, label_id=rec.id, labels_for_feature=n,
                                 scored=[brief(x) for x in scored] or None)
        if score is None:
            return recorded
        cancel = CancelToken()
        try:
            request = BlindSetRequest(s.key, feature, None, rec.id, score.n, score.method, score.seed,
                                      score.min_activation, session=deps.conversations.id_of(mcp_context))
            issued = scorer.issue(request, progress=progress_reporter(mcp_context, cancel, "tokens scanned"),
                                  cancel=cancel)
        except SaeMcpError as exc:  # the label stays recorded: say so rather than fail the call that wrote it
            return recorded.model_copy(update={"warnings": [
                f"label recorded, but no blind set: {exc}; score it later with score_explanation(label_id=...)"]})
        return recorded.model_copy(update={"challenge": issued.blind, "submit_secret": issued.submit_secret})

    return label_feature


def render(r: LabelRecorded) -> str:
    scored = f"; scored {brief_text(r.scored)}" if r.scored else ""
    head = f"label {r.label_id} recorded for feature {r.feature} (sae {r.sae}; {r.labels_for_feature} labels){scored}"
    return join([head, blind_set_text(r.challenge, r.submit_secret) if r.challenge else None,
                 *warnings_lines(r.warnings)])


def summary(r: JSON) -> str:
    return f"label {r.get('label_id')} on feature {r.get('feature')}"


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """With score, the seed its blind set was drawn with: replay asks for the same set."""
    drawn = (result.get("challenge") or {}).get("seed")
    if isinstance(r.get("score"), dict) and drawn is not None:
        return {"score": {**r["score"], "seed": drawn}}
    return {}


def label_of(run: Run) -> Label:
    """The label a successful run recorded, with the scores its text had then."""
    given, result = run.given, run.result or {}
    return Label(run_id=run.id, sae=(run.resolved or {}).get("sae"), feature=int(given.get("feature", -1)),
                 label=str(given.get("label", "")), evidence=given.get("evidence"),
                 evidence_runs=list(given.get("evidence_runs") or []), label_id=result.get("label_id"),
                 scored=[b for b in result.get("scored") or [] if isinstance(b, dict)])


def replay_arguments(given: JSON, resolved: JSON, handed: Handed) -> JSON:
    """With score, the seed its blind set was drawn with."""
    drawn = (resolved.get("score") or {}).get("seed")
    if isinstance(given.get("score"), dict) and given["score"].get("seed") is None and drawn is not None:
        return {**given, "score": {**given["score"], "seed": drawn}}
    return given


def challenge_of(r: JSON) -> str | None:
    return ((r or {}).get("challenge") or {}).get("challenge_id")


SPEC = ToolSpec(
    name="label_feature",
    make=make,
    result=LabelRecorded,
    render=render,
    annotations=hands_out_challenges,  # it writes a label too; the same call twice records one label
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=("challenge.challenge_id", "challenge.expires_in_s"), bos="sae",
                      resolve=resolve, features=None, keeps_runs=True, looks_up=False, on_feature_page=False),
    export=ExportRule(cell=None, helpers=(), note=None, details=None, label=label_of, score=None),
    replay=ReplayRule(skip_in_place="writes a label (replayed only in a scratch data dir)",
                      arguments=replay_arguments, hands_out=challenge_of),
)
