"""The prompt-level tools: model_info, get_feature_acts, compare_prompts, next_token, project_to_vocab.

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from sae_mcp.engine import features as feat
from sae_mcp.engine import logits as lg
from sae_mcp.engine import prompt_sets
from sae_mcp.engine.runtime import Engine, model_info
from sae_mcp.errors import SaeMcpError
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
        """Start here: the model, its SAEs (keys, hooks, fidelity) and the corpus."""
        info = model_info(engine)
        for s in info.saes:
            s.fidelity, s.fidelity_note = services.fidelity(s.key)
            try:  # said once here: top_examples and build_index no longer repeat it in their text
                s.corpus = services.examples.corpus(engine.sae(s.key)).describe()
            except SaeMcpError:  # no corpus given and no training dataset known
                s.corpus = None
        return info

    @tool()
    def get_feature_acts(
        prompt: A.Prompt,
        sae: A.Sae = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 5,
        features: Annotated[A.Features | None, Field(description="Also trace these")] = None,
        position: A.Position | None = None,
    ) -> FeatureActs:
        """The SAE features firing at each token of a prompt (top_k per position), and `features` traced."""
        return feat.get_feature_acts(engine, prompt, sae=sae, top_k=top_k, features=features, position=position)

    @tool()
    def compare_prompts(
        prompt_a: A.Prompt | None = None,
        prompt_b: A.Prompt | None = None,
        prompts_a: Annotated[list[A.Prompt] | None, Field(max_length=max_sets)] = None,
        prompts_b: Annotated[list[A.Prompt] | None, Field(max_length=max_sets)] = None,
        sae: A.Sae = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
        position: A.Position = -1,
        sort_by: Literal["difference", "effect_size"] = "difference",
    ) -> PromptComparison:
        """Features whose activation differs most between two prompts, or two sets of minimal pairs."""
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
        return prompt_sets.compare_prompt_sets(
            engine, prompts_a, prompts_b, sae=sae, top_k=top_k, position=position, sort_by=sort_by
        )

    @tool()
    def next_token(
        prompt: A.Prompt,
        answer: A.Answer | None = None,
        top_k: Annotated[int, Field(ge=1, le=max_k)] = 10,
    ) -> NextToken:
        """The plain model's next-token prediction, and an answer's rank, probability and logit."""
        return lg.next_token(engine, prompt, answer=answer, top_k=top_k)

    @tool()
    def project_to_vocab(
        feature: A.Feature,
        sae: A.Sae = None,
        top_k: Annotated[int, Field(ge=1, le=max_k, description="Per side")] = 10,
        skip_special: Annotated[bool, Field(description="Without special and byte tokens")] = True,
    ) -> VocabProjection:
        """Logit lens: the tokens a feature's decoder direction promotes and suppresses most."""
        exclude = services.stats.builtin_excluded() if skip_special else frozenset()
        return lg.project_to_vocab(engine, feature, sae=sae, top_k=top_k, exclude=exclude)
