"""Scored explanations: the agent explains a feature, and the server measures how good the explanation is.

register(server, tool, engine, services) adds:
    score_explanation    a blind set of held-out corpus contexts for an explanation (services/score_runs.py); with
                         auto, the client's own model answers it through MCP sampling and the score comes back
    submit_predictions   the predictions on a blind set -> the score, stored with the explanation

Sampling, both wires: on 2026-07-28 connections the tool answers its first round with an InputRequiredResult
holding the sampling request (its request_state names the challenge), and the client retries the same call with
the model's answer; on older ones it asks over the session's back-channel (sampling/createMessage) and waits. A
client without the sampling capability gets the blind set with a note: the two-step protocol is the way.

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

import functools
import logging
import warnings
from typing import Annotated, Any, Literal

import anyio.from_thread
from mcp import MCPError
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import (
    ClientCapabilities,
    CreateMessageRequest,
    CreateMessageRequestParams,
    SamplingCapability,
    SamplingMessage,
    TextContent,
    ToolAnnotations,
)
from mcp_types import InputRequiredResult
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.errors import InvalidInput
from sae_mcp.results.scoring import BlindSet, ExplanationScore, ScoreExplanation
from sae_mcp.server.args import engine_args
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.wiring import ToolDecorator
from sae_mcp.services import Services
from sae_mcp.services.score_prompt import answer_tokens, read_predictions, scorer_prompt
from sae_mcp.services.score_runs import ExplanationScorer

log = logging.getLogger(__name__)

SAMPLING_KEY = "scorer"  # the InputRequiredResult's request key
STATE_PREFIX = "score:"  # request_state = STATE_PREFIX + challenge id
MAX_ID = 2**31 - 1
# Each call hands out a new challenge (and stores it): neither read-only nor idempotent.
CHALLENGES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                             open_world_hint=False)
NO_SAMPLING = ("the client does not offer MCP sampling, so the server cannot ask its model: answer this blind set "
               "yourself with submit_predictions (from the explanation alone)")


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    A = engine_args(engine)
    scorer = ExplanationScorer(services)

    @tool(annotations=CHALLENGES)
    def score_explanation(
        feature: A.Feature,
        explanation: Annotated[
            str | None, Field(max_length=1000, description="The hypothesis, e.g. 'the word play'; or label_id")
        ] = None,
        sae: A.Sae = None,
        n: Annotated[int, Field(ge=4, le=100, description="Contexts; half fire")] = 20,
        method: Literal["detection", "fuzzing"] = "detection",
        seed: Annotated[int | None, Field(ge=0, le=MAX_ID, description="Same seed, same contexts")] = None,
        label_id: Annotated[int | None, Field(ge=1, le=MAX_ID, description="Score this label instead")] = None,
        auto: Annotated[bool, Field(description="Your client's model answers, via MCP sampling")] = False,
        mcp_context: Context = None,
    ) -> ScoreExplanation:
        """Score an explanation blind: n held-out corpus contexts (half where the feature fires, across its
        activation bands; half where it does not, some near misses), shuffled, no activations. Predict for each
        (detection: fires somewhere; fuzzing: fires on the <<marked>> token) from the explanation alone, without
        looking them up, then call submit_predictions once (within 30 min). auto: the client's model answers."""
        reply = _sampled_reply(mcp_context) if auto else None
        if reply is not None:
            return _score_reply(scorer, *reply, expect=(feature, method))
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "tokens scanned")
        blind = scorer.issue(sae, feature, explanation, label_id, n, method, seed, auto=auto, progress=progress,
                             cancel=cancel)
        if not auto:
            return ScoreExplanation(challenge=blind)
        return _auto(scorer, blind, mcp_context)

    @tool(annotations=CHALLENGES)
    def submit_predictions(
        challenge_id: Annotated[str, Field(min_length=1, max_length=64)],
        predictions: Annotated[
            dict[Annotated[str, Field(max_length=16)], bool],
            Field(min_length=1, max_length=100, description='{"1": true, "2": false, ...}: every context id'),
        ],
    ) -> ExplanationScore:
        """The score of your predictions on a score_explanation blind set: balanced accuracy (0.5 = chance) with its
        95% interval, precision, recall, F1, per activation band, and the contexts misjudged with their
        activations. Stored with the explanation (label_feature, search_explanations and feature_card show it)."""
        return scorer.submit(challenge_id, {k.strip(): v for k, v in predictions.items()})


def _can_sample(ctx: Any) -> bool:
    try:
        return bool(ctx.session.check_client_capability(ClientCapabilities(sampling=SamplingCapability())))
    except (AttributeError, ValueError):  # outside a request (the CLI): no client to ask
        return False


def _auto(scorer: ExplanationScorer, blind: BlindSet, ctx: Any) -> Any:
    """Ask the client's model to answer the blind set: an InputRequiredResult on the 2026 wire, a back-channel
    request on older ones; the blind set with a note when the client cannot sample or the request failed."""
    if ctx is None or not _can_sample(ctx):
        return ScoreExplanation(challenge=blind, note=NO_SAMPLING)
    prompt, max_tokens = scorer_prompt(blind), answer_tokens(len(blind.contexts))
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        request = CreateMessageRequest(params=_sampling_params(prompt, max_tokens))
        return InputRequiredResult(input_requests={SAMPLING_KEY: request},
                                   request_state=STATE_PREFIX + blind.challenge_id)
    try:
        result = anyio.from_thread.run(functools.partial(_create_message, ctx, prompt, max_tokens))
    except MCPError as exc:
        log.info("sampling failed: %s", exc)
        return ScoreExplanation(challenge=blind, note=f"the client's model could not be asked ({exc}); answer this "
                                "blind set yourself with submit_predictions")
    return _score_reply(scorer, blind.challenge_id, _text_of(result), result.model, expect=None)


def _sampling_params(prompt: str, max_tokens: int) -> CreateMessageRequestParams:
    return CreateMessageRequestParams(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=max_tokens, temperature=0.0,
    )


async def _create_message(ctx: Any, prompt: str, max_tokens: int) -> Any:
    params = _sampling_params(prompt, max_tokens)
    with warnings.catch_warnings():  # deprecated on the 2026 wire; this is the older wire's way
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        return await ctx.session.create_message(params.messages, max_tokens=params.max_tokens,
                                                temperature=params.temperature, related_request_id=ctx.request_id)


def _text_of(result: Any) -> str:
    content = result.content if isinstance(result.content, list) else [result.content]
    return "".join(getattr(c, "text", "") for c in content)


def _sampled_reply(ctx: Any) -> tuple[str, str, str] | None:
    """(challenge id, the model's answer, the model's name) when this call is the retry carrying a sampling answer
    (2026 wire), else None."""
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
    return state.removeprefix(STATE_PREFIX), _text_of(result), getattr(result, "model", "") or "unknown model"


def _score_reply(scorer: ExplanationScorer, challenge_id: str, reply: str, model: str,
                 expect: tuple[int, str] | None) -> ScoreExplanation:
    """The score of the model's reply on the challenge; the blind set with a note when it cannot be read."""
    blind = scorer.blind_set(challenge_id)
    if expect is not None and expect != (blind.feature, blind.method):
        raise InvalidInput(f"challenge {challenge_id} is for feature {blind.feature} ({blind.method}), not this "
                           "call's; call score_explanation again")
    try:
        predictions = read_predictions(reply, [c.id for c in blind.contexts])
    except InvalidInput as exc:
        return ScoreExplanation(challenge=blind, note=f"the answer of the client's model ({model}) could not be "
                                f"read: {exc}; answer this blind set yourself with submit_predictions")
    return ScoreExplanation(score=scorer.submit(challenge_id, predictions, scorer=f"sampling: {model}"))
