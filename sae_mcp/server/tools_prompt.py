"""The prompt-level tools: model_info, get_feature_acts, compare_prompts, next_token, project_to_vocab.

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from sae_mcp.engine import features as feat
from sae_mcp.engine import logits as lg
from sae_mcp.engine.runtime import Engine, model_info
from sae_mcp.results import FeatureActs, ModelInfo, NextToken, PromptComparison, VocabProjection
from sae_mcp.server.args import engine_args
from sae_mcp.server.wiring import ToolDecorator
from sae_mcp.services import Services


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    max_k = engine.limits.max_top_k
    max_sets = engine.limits.max_prompts_per_set
    A = engine_args(engine)

    @tool(name="model_info")
    def model_info_tool() -> ModelInfo:
        """The loaded model (architecture, layers, d_model, context, vocab, device, dtype) and every loaded SAE
        (hook, d_in, d_sae, architecture, release/id or folder, Neuronpedia id)."""
        return model_info(engine)

    @tool()
    def get_feature_acts(
        prompt: A.Prompt,
        sae: A.Sae = None,
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
        prompt_a: Annotated[A.Prompt | None, Field(description="First prompt (or use prompts_a for a set)")] = None,
        prompt_b: Annotated[A.Prompt | None, Field(description="Second prompt (or use prompts_b for a set)")] = None,
        prompts_a: Annotated[
            list[A.Prompt] | None,
            Field(max_length=max_sets, description="Set A of prompts (e.g. one side of minimal pairs)"),
        ] = None,
        prompts_b: Annotated[list[A.Prompt] | None, Field(max_length=max_sets, description="Set B of prompts")] = None,
        sae: A.Sae = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Features to return")] = 10,
        position: Annotated[
            A.Position, Field(description="Token position compared in every prompt; -1 = last token")
        ] = -1,
        sort_by: Annotated[
            str,
            Field(pattern="^(difference|effect_size)$", description="Sets only: rank by |difference| or |effect size|"),
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
        prompt: A.Prompt,
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
        sae: A.Sae = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Tokens per side")] = 10,
    ) -> VocabProjection:
        """Logit lens on a feature's decoder direction (W_dec[feature] @ W_U): the tokens it promotes most
        (top_positive) and suppresses most (top_negative)."""
        return lg.project_to_vocab(engine, feature, sae=sae, top_k=top_k)
