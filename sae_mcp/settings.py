"""One frozen settings object: which model and SAEs to load, where, and the limits every tool obeys."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "gpt2-small"
DEFAULT_SAE = "gpt2-small-res-jb/blocks.7.hook_resid_pre"


def default_data_dir() -> Path:
    """The platform's user data dir (e.g. ~/.local/share/sae-mcp), overridable by SAE_MCP_DATA_DIR."""
    env = os.environ.get("SAE_MCP_DATA_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("sae-mcp", appauthor=False))


class Limits(BaseModel):
    """Ceilings on work per call. Tool parameter bounds are written against these numbers."""

    model_config = ConfigDict(frozen=True)

    max_top_k: int = 100
    """Largest top_k any listing tool returns."""
    max_prompts_per_set: int = 64
    """Largest prompt set for compare_prompts(prompts_a=..., prompts_b=...)."""
    max_features_per_call: int = 64
    """Most explicit features one call may name."""
    busy_timeout_s: float = 120.0
    """How long a call waits for the device before answering 'busy'."""


class Settings(BaseModel):
    """Everything `serve`, `call` and `index` need to build an engine and a store."""

    model_config = ConfigDict(frozen=True)

    model: str = DEFAULT_MODEL
    """A transformer-lens official model name, or a local Hugging Face model folder."""
    saes: tuple[str, ...] = (DEFAULT_SAE,)
    """SAE specs: `RELEASE/SAE_ID`, a local SAELens folder, either optionally prefixed `ALIAS=`."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    dtype: str = "float32"
    """float32 | float16 | bfloat16 (model and SAEs)."""
    corpus: str | None = None
    """Corpus spec for scans: HF dataset name or a local .txt/.jsonl/.parquet file; None = the SAE's dataset."""
    data_dir: Path = Field(default_factory=default_data_dir)
    """Where SQLite stores (feature index, labels, explanations) live."""
    limits: Limits = Limits()
