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
    busy_timeout_s: float = 30.0
    """How long a call waits for the device before answering 'busy' (with how many calls are ahead and how long
    the current one has run). Calls that never run the model (model_info, search_explanations, label_feature,
    index reads, feature_card, project_to_vocab) never wait for it."""
    max_queued: int = 16
    """Calls that may wait for the device at once; one more is answered 'busy' at once. Each waiting call holds
    one of the SDK's 40 worker threads, so this also keeps threads free for the calls that need no device."""


class Settings(BaseModel):
    """Everything `serve`, `call` and `index` need to build an engine and a store."""

    model_config = ConfigDict(frozen=True)

    model: str = DEFAULT_MODEL
    """A transformer-lens official model name, or a local Hugging Face model folder."""
    saes: tuple[str, ...] = (DEFAULT_SAE,)
    """SAE specs: `RELEASE/SAE_ID`, a local SAELens folder, either optionally prefixed `ALIAS=`."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    n_devices: int = 1
    """GPUs the model's blocks are split over (transformer-lens' n_devices), from cuda:0."""
    dtype: str = "float32"
    """float32 | float16 | bfloat16 (model and SAEs)."""
    corpus: str | None = None
    """Corpus spec for scans: HF dataset name or a local .txt/.jsonl/.parquet file; None = the SAE's dataset."""
    data_dir: Path = Field(default_factory=default_data_dir)
    """Where SQLite stores (feature index, labels, explanations) live."""
    limits: Limits = Limits()
    demo: bool = False
    """Loaded from the bundled demo (`--demo`: sae_mcp/demo/): the index is built on first use."""
    dashboard_url: str | None = None
    """Where the feature pages are served (`serve --transport http` sets its own address; `--dashboard-url` names
    another, e.g. a `sae-mcp dashboard`): results naming one feature then carry its page URL. None: no links."""
