"""Tool argument types whose bounds come from the loaded engine, shared by every tool module.

Bounds live in the input schema so a client sees them before calling: feature indices stop at the widest loaded
SAE's d_sae - 1 (each call still checks the addressed SAE), positions at the context length, prompt text at
32 characters a context token (a ceiling on work, generous for any real prompt).

No `from __future__ import annotations`: the SDK reads these annotations at registration.
"""

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from sae_mcp.engine.runtime import Engine

CHARS_PER_TOKEN_CEILING = 32


@dataclass(frozen=True)
class Args:
    """Annotated types for one engine: Feature, Features, Position, Prompt, Answer, Sae."""

    Feature: Any
    Features: Any
    Position: Any
    Prompt: Any
    Answer: Any
    Sae: Any
    max_feature: int
    n_ctx: int


def engine_args(engine: Engine) -> Args:
    max_feature = max((s.d_sae for s in engine.saes.values()), default=1) - 1
    n_ctx = int(engine.model.cfg.n_ctx)
    index = Annotated[int, Field(ge=0, le=max_feature)]
    return Args(
        Feature=index,
        Features=Annotated[list[index], Field(max_length=engine.limits.max_features_per_call)],
        Position=Annotated[int, Field(ge=-n_ctx, le=n_ctx - 1)],  # negative from the end (INSTRUCTIONS says so)
        Prompt=Annotated[str, Field(max_length=n_ctx * CHARS_PER_TOKEN_CEILING)],
        Answer=Annotated[str, Field(max_length=256)],  # a next token, leading space and all: INSTRUCTIONS says so
        Sae=Annotated[str | None, Field(max_length=256)],  # the SAE's key, optional with one SAE: likewise
        max_feature=max_feature,
        n_ctx=n_ctx,
    )
