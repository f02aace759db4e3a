"""Tool argument bounds that come from the loaded engine, shared by every tool module.

Bounds live in the input schema so a client sees them before calling: feature indices stop at the widest loaded
SAE's d_sae - 1 (each call still checks the addressed SAE), positions at the context length, prompt text at
32 characters a context token (a ceiling on work, generous for any real prompt).

Each bound is a pydantic FieldInfo that a tool's parameter puts beside its type, so mypy reads the type and the SDK
the bound, e.g. `feature: Annotated[int, A.feature]`, `sae: Annotated[str | None, A.sae] = None`,
`features: Annotated[list[Annotated[int, A.feature]], A.features]`.
"""

from dataclasses import dataclass

from pydantic import Field
from pydantic.fields import FieldInfo

from sae_mcp.engine.runtime import Engine

CHARS_PER_TOKEN_CEILING = 32


@dataclass(frozen=True)
class Args:
    """The bounds of one engine's tool arguments (each goes with the type named in its doc)."""

    feature: FieldInfo
    """int: a feature index, 0..max_feature."""
    features: FieldInfo
    """list[Annotated[int, feature]]: at most Limits.max_features_per_call of them."""
    position: FieldInfo
    """int: a token position, -n_ctx..n_ctx - 1 (negative from the end: INSTRUCTIONS says so)."""
    prompt: FieldInfo
    """str: prompt text, at most n_ctx * CHARS_PER_TOKEN_CEILING characters."""
    answer: FieldInfo
    """str: a next token, leading space and all (INSTRUCTIONS says so), at most 256 characters."""
    sae: FieldInfo
    """str | None: the SAE's key (optional with one SAE: likewise), at most 256 characters."""
    max_feature: int
    """The widest loaded SAE's d_sae - 1."""
    n_ctx: int
    """The model's context length."""


def engine_args(engine: Engine) -> Args:
    max_feature = max((s.d_sae for s in engine.saes.values()), default=1) - 1
    n_ctx = int(engine.model.cfg.n_ctx)
    return Args(
        feature=Field(ge=0, le=max_feature),
        features=Field(max_length=engine.limits.max_features_per_call),
        position=Field(ge=-n_ctx, le=n_ctx - 1),
        prompt=Field(max_length=n_ctx * CHARS_PER_TOKEN_CEILING),
        answer=Field(max_length=256),
        sae=Field(max_length=256),
        max_feature=max_feature,
        n_ctx=n_ctx,
    )
