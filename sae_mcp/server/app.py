"""The MCP face: build_server(engine, settings) -> MCPServer.

A tool body validates its arguments (bounds live in the signature, so every client sees them in the input
schema), calls one engine function and returns its pydantic result (structured content + output schema).
Domain errors (SaeMcpError) become `isError` results with the engine's message; the server keeps working.

No `from __future__ import annotations` here: the SDK reads the tools' annotations at registration.
"""

import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from sae_mcp.engine import features as feat
from sae_mcp.engine import logits as lg
from sae_mcp.engine.runtime import Engine, model_info
from sae_mcp.errors import SaeMcpError
from sae_mcp.server.args import engine_args
from sae_mcp.results import FeatureActs, ModelInfo, NextToken, PromptComparison, VocabProjection
from sae_mcp.settings import Settings

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

INSTRUCTIONS = """\
sae-mcp runs sparse-autoencoder (SAE) experiments on a loaded transformer language model.
Start with model_info (the model and its SAEs; address an SAE by its key, optional when one is loaded).
Read: get_feature_acts (features firing per token), compare_prompts (pairs, or sets of minimal pairs with effect
sizes), next_token, project_to_vocab (what a decoder direction promotes), top_examples (max-activating corpus
examples; build_index indexes every feature at once), feature_card (everything known about a feature),
search_explanations, feature_stats, token_set_enrichment.
Test cause: ablate_and_test (the effect is `ablated` vs `baseline`; read `summary`; use controls), steer_generate
(calibrated, dose-response, controls), attribute (gradient x activation, error share).
Record what you learn with label_feature. Activations depend on context: prompts get BOS prepended as the SAE was
trained. The MCP prompts hold investigation recipes."""


def domain_errors(fn: F) -> F:
    """Turn our domain errors into the SDK's ToolError, so the caller sees our message as an isError result."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SaeMcpError as exc:
            raise ToolError(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def build_server(engine: Engine, settings: Settings | None = None, store: Any = None) -> MCPServer:
    """Wire every tool, resource and prompt to the engine (and the SQLite store when given)."""
    settings = settings or Settings()
    max_k = engine.limits.max_top_k
    max_sets = engine.limits.max_prompts_per_set
    A = engine_args(engine)
    SaeArg, Prompt = A.Sae, A.Prompt
    server = MCPServer("sae-mcp", instructions=INSTRUCTIONS)

    def tool(**kw: Any) -> Callable[[F], F]:
        def register(fn: F) -> F:
            server.tool(annotations=kw.pop("annotations", READ_ONLY), **kw)(domain_errors(fn))
            return fn

        return register

    @tool(name="model_info")
    def model_info_tool() -> ModelInfo:
        """The loaded model (architecture, layers, d_model, context, vocab, device, dtype) and every loaded SAE
        (hook, d_in, d_sae, architecture, release/id or folder, Neuronpedia id)."""
        return model_info(engine)

    @tool()
    def get_feature_acts(
        prompt: Prompt,
        sae: SaeArg = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Features listed per token position")] = 5,
        features: Annotated[
            A.Features | None, Field(description="Also return these features' activation at every position")
        ] = None,
    ) -> FeatureActs:
        """SAE feature activations for each token of a prompt: the top_k features firing at every position
        (activation > 0) and, when `features` is given, those features' activations at every position."""
        return feat.get_feature_acts(engine, prompt, sae=sae, top_k=top_k, features=features)

    @tool()
    def compare_prompts(
        prompt_a: Annotated[Prompt | None, Field(description="First prompt (or use prompts_a for a set)")] = None,
        prompt_b: Annotated[Prompt | None, Field(description="Second prompt (or use prompts_b for a set)")] = None,
        prompts_a: Annotated[
            list[Prompt] | None, Field(max_length=max_sets, description="Set A of prompts (e.g. one side of minimal pairs)")
        ] = None,
        prompts_b: Annotated[list[Prompt] | None, Field(max_length=max_sets, description="Set B of prompts")] = None,
        sae: SaeArg = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Features to return")] = 10,
        position: Annotated[A.Position, Field(description="Token position compared in every prompt; -1 = last token")] = -1,
        sort_by: Annotated[
            str, Field(pattern="^(difference|effect_size)$", description="Sets only: rank by |difference| or |effect size|")
        ] = "difference",
    ) -> PromptComparison:
        """Features whose activation at `position` differs most between two prompts (prompt_a/prompt_b), or between
        two sets of prompts (prompts_a/prompts_b: per-feature means, difference and Cohen's d effect size)."""
        single = prompt_a is not None or prompt_b is not None
        sets = prompts_a is not None or prompts_b is not None
        if single == sets:
            raise ToolError("pass either prompt_a and prompt_b, or prompts_a and prompts_b (not both, not neither)")
        if single:
            if prompt_a is None or prompt_b is None:
                raise ToolError("pass both prompt_a and prompt_b")
            return feat.compare_prompts(engine, prompt_a, prompt_b, sae=sae, top_k=top_k, position=position)
        if prompts_a is None or prompts_b is None:
            raise ToolError("pass both prompts_a and prompts_b")
        return feat.compare_prompt_sets(
            engine, prompts_a, prompts_b, sae=sae, top_k=top_k, position=position, sort_by=sort_by
        )

    @tool()
    def next_token(
        prompt: Prompt,
        answer: Annotated[A.Answer | None, Field(description="Expected next token to score, e.g. ' Paris'")] = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Most likely next tokens to list")] = 10,
    ) -> NextToken:
        """The plain model's next-token prediction (the tutorial's test_prompt): top tokens with probability and
        logit, and the answer's rank (0 = most likely), probability and logit. A multi-token answer is ranked on
        its first token and says so, and gets the whole answer's log-probability (teacher forcing)."""
        return lg.next_token(engine, prompt, answer=answer, top_k=top_k)

    @tool()
    def project_to_vocab(
        feature: A.Feature,
        sae: SaeArg = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Tokens per side")] = 10,
    ) -> VocabProjection:
        """Logit lens on a feature's decoder direction (W_dec[feature] @ W_U): the tokens it promotes most
        (top_positive) and suppresses most (top_negative)."""
        return lg.project_to_vocab(engine, feature, sae=sae, top_k=top_k)

    # Tool modules of the other areas: each has register(server, tool, engine, settings), where `tool` is the
    # decorator above (read-only annotations and domain-error translation by default).
    # --- more tool modules register here ---
    from sae_mcp.server import tools_corpus; tools_corpus.register(server, tool, engine, settings)  # noqa: E702
    from sae_mcp.server import tools_causal; tools_causal.register(server, tool, engine, settings)  # noqa: E702
    from sae_mcp.server import tools_explain

    tools_explain.register(server, tool, engine, settings)

    return server
