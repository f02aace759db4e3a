"""score_explanation: a blind set for an explanation of a feature (held-out corpus contexts, half where it fires,
shuffled, no activations) to answer from the explanation alone with submit_predictions; with auto, the client's own
model answers it through MCP sampling and the score comes back (scoring/runs.py draws and scores).

Sampling, both wires: on 2026-07-28 connections the tool answers its first round with an InputRequiredResult
holding the sampling request (its request_state names the challenge), and the client retries the same call with
the model's answer; on older ones it asks over the session's back-channel (sampling/createMessage) and waits. A
client without the sampling capability gets the blind set with a note: the two-step protocol is the way.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Annotated, Literal

import anyio.from_thread
from mcp import MCPError
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import (
    ClientCapabilities,
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    SamplingCapability,
    SamplingMessage,
    TextContent,
)
from mcp_types import InputRequiredResult
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from sae_mcp.engine.runtime import CancelToken
from sae_mcp.errors import InvalidInput
from sae_mcp.ledger.export.rules import ExportRule, Handed, ReplayRule
from sae_mcp.ledger.rule import JSON, LedgerRule, ResolveContext
from sae_mcp.results.scoring import BlindSet, ScoreExplanation
from sae_mcp.scoring.blind_set import DEFAULT_MIN_ACTIVATION, MIN_ACTIVATION_RANGE
from sae_mcp.scoring.prompt import answer_tokens, read_predictions, scorer_prompt
from sae_mcp.scoring.runs import BlindSetRequest, ExplanationScorer, Issued
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.text import join, warnings_lines
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, hands_out_challenges
from sae_mcp.server.tools.submit_predictions import score_summary, score_text

log = logging.getLogger(__name__)

SAMPLING_KEY = "scorer"  # the InputRequiredResult's request key
STATE_PREFIX = "score:"  # request_state = STATE_PREFIX + challenge id
MAX_ID = 2**31 - 1
FUZZING_RATE = "fuzzing: fires on the marked token? (a quarter true)"  # detection: anywhere (half true)
NO_SAMPLING = ("the client does not offer MCP sampling, so the server cannot ask its model: answer this blind set "
               "yourself with submit_predictions (from the explanation alone)")


def make(deps: ToolDeps) -> Callable[..., ScoreExplanation | InputRequiredResult]:
    A, scorer = deps.args, deps.services.scorer
    low, high = MIN_ACTIVATION_RANGE

    def score_explanation(
        feature: Annotated[int, A.feature],
        explanation: Annotated[
            str | None, Field(max_length=1000, description="Or pass label_id")
        ] = None,
        sae: Annotated[str | None, A.sae] = None,
        n: Annotated[int, Field(ge=4, le=100, description="Contexts; half fire")] = 20,
        method: Annotated[Literal["detection", "fuzzing"], Field(description=FUZZING_RATE)] = "detection",
        seed: Annotated[int | None, Field(ge=0, le=MAX_ID)] = None,
        label_id: Annotated[int | None, Field(ge=1, le=MAX_ID)] = None,
        auto: Annotated[bool, Field(description="The client's model answers")] = False,
        min_activation: Annotated[float, Field(ge=low, le=high, description="Firing: max >= this x feature max")] = (
            DEFAULT_MIN_ACTIVATION),
        mcp_context: Context | None = None,
    ) -> ScoreExplanation | InputRequiredResult:  # (the SDK leaves InputRequiredResult out of the output schema)
        """Score an explanation blind: contexts to judge from the explanation alone, then submit_predictions."""
        session = deps.conversations.id_of(mcp_context)
        reply = _sampled_reply(mcp_context) if auto else None
        if reply is not None:
            return _score_reply(scorer, *reply, expect=(feature, method), session=session)
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "tokens scanned")
        request = BlindSetRequest(sae, feature, explanation, label_id, n, method, seed, min_activation,
                                  session=session, auto=auto)
        issued = scorer.issue(request, progress=progress, cancel=cancel)
        if not auto:
            return ScoreExplanation(challenge=issued.blind, submit_secret=issued.submit_secret)
        return _auto(scorer, issued, mcp_context, session)

    return score_explanation


def _can_sample(ctx: Context) -> bool:
    try:
        return bool(ctx.session.check_client_capability(ClientCapabilities(sampling=SamplingCapability())))
    except (AttributeError, ValueError):  # outside a request (the CLI): no client to ask
        return False


def _auto(scorer: ExplanationScorer, issued: Issued, ctx: Context | None, session: str | None
          ) -> ScoreExplanation | InputRequiredResult:
    """Ask the client's model to answer the blind set: an InputRequiredResult on the 2026 wire (its request_state,
    which only this client gets back, carries the submit secret), a back-channel request on older ones; the blind
    set and its secret with a note when the client cannot sample or the request failed."""
    blind, secret = issued.blind, issued.submit_secret
    if ctx is None or not _can_sample(ctx):
        return ScoreExplanation(challenge=blind, submit_secret=secret, note=NO_SAMPLING)
    prompt, max_tokens = scorer_prompt(blind), answer_tokens(len(blind.contexts))
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        request = CreateMessageRequest(params=_sampling_params(prompt, max_tokens))
        return InputRequiredResult(input_requests={SAMPLING_KEY: request},
                                   request_state=f"{STATE_PREFIX}{blind.challenge_id}:{secret}")
    try:
        result = anyio.from_thread.run(functools.partial(_create_message, ctx, prompt, max_tokens))
    except MCPError as exc:
        log.info("sampling failed: %s", exc)
        return ScoreExplanation(challenge=blind, submit_secret=secret, note=f"the client's model could not be asked "
                                f"({exc}); answer this blind set yourself with submit_predictions")
    return _score_reply(scorer, blind.challenge_id, secret, _text_of(result), result.model, expect=None,
                        session=session)


def _sampling_params(prompt: str, max_tokens: int) -> CreateMessageRequestParams:
    return CreateMessageRequestParams(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=max_tokens, temperature=0.0,
    )


async def _create_message(ctx: Context, prompt: str, max_tokens: int) -> CreateMessageResult:
    params = _sampling_params(prompt, max_tokens)
    with warnings.catch_warnings():  # deprecated on the 2026 wire; this is the older wire's way
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        return await ctx.session.create_message(params.messages, max_tokens=params.max_tokens,
                                                temperature=params.temperature, related_request_id=ctx.request_id)


def _text_of(result: object) -> str:
    """The text of a client's answer to a sampling request (a message: one content block or a list of them)."""
    content = getattr(result, "content", None)
    content = content if isinstance(content, list) else [content]
    return "".join(getattr(c, "text", "") for c in content)


def _sampled_reply(ctx: Context | None) -> tuple[str, str, str, str] | None:
    """(challenge id, its submit secret, the model's answer, the model's name) when this call is the retry carrying
    a sampling answer (2026 wire), else None."""
    if ctx is None:
        return None
    try:
        state, responses = ctx.request_state, ctx.input_responses
    except (AttributeError, ValueError):
        return None
    if not state or not state.startswith(STATE_PREFIX) or not responses or SAMPLING_KEY not in responses:
        return None
    result = responses[SAMPLING_KEY]
    if not hasattr(result, "content"):
        raise InvalidInput("the client answered the sampling request with something that is not a message; call "
                           "score_explanation without auto and answer the blind set with submit_predictions")
    challenge_id, _, secret = state.removeprefix(STATE_PREFIX).partition(":")
    return challenge_id, secret, _text_of(result), getattr(result, "model", "") or "unknown model"


def _score_reply(scorer: ExplanationScorer, challenge_id: str, secret: str, reply: str, model: str,
                 expect: tuple[int, str] | None, session: str | None) -> ScoreExplanation:
    """The score of the model's reply on the challenge; the blind set with a note when it cannot be read."""
    blind = scorer.blind_set(challenge_id)
    if expect is not None and expect != (blind.feature, blind.method):
        raise InvalidInput(f"challenge {challenge_id} is for feature {blind.feature} ({blind.method}), not this "
                           "call's; call score_explanation again")
    try:
        predictions = read_predictions(reply, [c.id for c in blind.contexts])
    except InvalidInput as exc:
        return ScoreExplanation(challenge=blind, submit_secret=secret, note=f"the answer of the client's model "
                                f"({model}) could not be read: {exc}; answer this blind set yourself with "
                                "submit_predictions")
    return ScoreExplanation(score=scorer.submit(challenge_id, secret, predictions, scorer=f"sampling: {model}",
                                                session=session))


def blind_set_text(b: BlindSet, secret: str | None) -> str:
    return join([
        f"challenge {b.challenge_id}: {b.method} of {b.explanation!r} for feature {b.feature} (sae {b.sae}), "
        f"{len(b.contexts)} contexts (firing: max >= {b.min_activation:g} x its max activation), seed {b.seed}; "
        f"expires in {b.expires_in_s // 60} min",
        f"submit_secret {secret} (shown once: pass it with the challenge_id)" if secret else None,
        f"{b.question}. Judge from the explanation alone, then submit_predictions once: "
        '{"1": true, "2": false, ...}',
        *(f"{c.id}: {c.text}" for c in b.contexts),
        *warnings_lines(b.warnings),
    ])


def render(r: ScoreExplanation) -> str:
    return join([score_text(r.score) if r.score else None,
                 blind_set_text(r.challenge, r.submit_secret) if r.challenge else None,
                 f"note: {r.note}" if r.note else None])


def summary(r: JSON) -> str:
    if r.get("score"):
        return score_summary(r["score"])
    c = r.get("challenge") or {}
    return (f"blind set {c.get('challenge_id')}: {len(c.get('contexts') or [])} contexts ({c.get('method')}, seed "
            f"{c.get('seed')}) for {c.get('explanation', '')[:40]!r}")


def resolve(r: JSON, result: JSON, ctx: ResolveContext) -> JSON:
    """The seed drawn when none was given: replay asks for the same blind set."""
    drawn = (result.get("challenge") or result.get("score") or {}).get("seed")
    return {"seed": drawn if drawn is not None else r.get("seed")}


def challenge_of(r: JSON) -> str | None:
    """The id of the blind set a result handed out (or scored, with auto)."""
    return ((r or {}).get("challenge") or (r or {}).get("score") or {}).get("challenge_id")


def replay_arguments(given: JSON, resolved: JSON, handed: Handed) -> JSON:
    """The seed it drew, so that replay hands out the same blind set."""
    if given.get("seed") is None and resolved.get("seed") is not None:
        return {**given, "seed": resolved["seed"]}
    return given


def score_of(r: JSON) -> JSON | None:
    """With auto, the score of the client's model's answer."""
    return r.get("score")


SPEC = ToolSpec(
    name="score_explanation",
    make=make,
    result=ScoreExplanation,
    render=render,
    annotations=hands_out_challenges,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=("challenge.challenge_id", "challenge.expires_in_s",
                                                 "score.challenge_id", "score.score_id"),
                      bos="sae", resolve=resolve, features=None, keeps_runs=False, looks_up=False,
                      on_feature_page=False),
    export=ExportRule(cell=None, helpers=(), note=None, details=None, label=None, score=score_of),
    replay=ReplayRule(skip_in_place=None, arguments=replay_arguments, hands_out=challenge_of),
)
