"""Shared fixtures: a generated tiny model + SAE (no files needed), and the real stories260K model with the two SAEs
and the corpus that the package bundles for `--demo` (sae_mcp/demo/), so nothing outside the repo is needed. The plain
helpers these fixtures are built with, and that tests import by name, are in tests/helpers/.

Everything is offline and CPU, one thread (a busy 2-core box stalls 50x with two).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# A server built without a data dir (Settings() defaults) must never write into the user's real one
# (~/.local/share/sae-mcp: the ledger, labels, indexes); subprocesses inherit this too.
if "SAE_MCP_DATA_DIR" not in os.environ:
    import tempfile

    os.environ["SAE_MCP_DATA_DIR"] = tempfile.mkdtemp(prefix="sae-mcp-tests-")

import pytest
import torch

from helpers.models import (
    STORIES_CORPUS,
    STORIES_HF,
    STORIES_HOOK,
    STORIES_SAE_L3,
    engine_on,
    make_sae_folder,
    make_tiny_tokenizer,
)
from helpers.servers import server_at, stories_settings_at

torch.set_num_threads(1)


@pytest.fixture
def lexical_only(monkeypatch):
    """Explanation search ranks lexically: the optional MiniLM model is never loaded by accident."""
    monkeypatch.setenv("SAE_MCP_SEMANTIC", "0")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where the browser tests keep their screenshots: $SAE_MCP_ARTIFACTS, else a tmp dir of the module's."""
    where = os.environ.get("SAE_MCP_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ generated tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    """A 2-layer random-weight transformer with a real tokenizer, as a LoadedModel."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from sae_mcp.engine.loading import LoadedModel

    tok = make_tiny_tokenizer(tiny_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tok),
        act_fn="gelu_new", normalization_type="LN", device="cpu", seed=0,
    )
    model = HookedSAETransformer(cfg, tokenizer=tok)
    model.eval()
    return LoadedModel(model=model, name="tiny", source=str(tiny_dir), architecture="generated")


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_dir) -> Path:
    return make_sae_folder(tiny_dir / "sae_l1", 32, 128, "blocks.1.hook_resid_pre")


@pytest.fixture(scope="session")
def tiny_engine(tiny_loaded, tiny_sae_dir):
    return engine_on(tiny_loaded, tiny_sae_dir)


@pytest.fixture(scope="session")
def two_sae_engine(tiny_loaded, tiny_dir, tiny_sae_dir):
    """The tiny model with its SAE at blocks.1.hook_resid_pre and a second, 96 features wide, at
    blocks.0.hook_resid_post."""
    l0 = make_sae_folder(tiny_dir / "sae_l0", 32, 96, "blocks.0.hook_resid_post", seed=3)
    return engine_on(tiny_loaded, tiny_sae_dir, l0)


# ----------------------------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="session")
def stories_loaded():
    from sae_mcp.engine.loading import load_model

    return load_model(str(STORIES_HF), "cpu", torch.float32)


@pytest.fixture(scope="session")
def stories_sae_dir() -> Path:
    """The bundled layer-3 SAE (1024 features at blocks.3.hook_resid_pre), trained by `sae-mcp train-sae`."""
    return STORIES_SAE_L3


@pytest.fixture(scope="session")
def trained_sae_dir(stories_loaded, tmp_path_factory) -> Path:
    """A standard SAE trained in this session on the real model by sae-lens' runner (~20 s, 300k tokens)."""
    from sae_mcp.engine.corpus import resolve_corpus
    from sae_mcp.engine.training import train_sae

    out = tmp_path_factory.mktemp("stories_sae")
    return train_sae(
        stories_loaded.model, resolve_corpus(str(STORIES_CORPUS)), hook_name=STORIES_HOOK, out_dir=out, d_sae=256,
        training_tokens=300_000, context_size=128, model_name="stories260K",
        dataset_path=str(STORIES_CORPUS), model_processing=stories_loaded.processing,
    )


@pytest.fixture(scope="session")
def stories_engine(stories_loaded, stories_sae_dir):
    return engine_on(stories_loaded, stories_sae_dir)


# ------------------------------------------------------------------------------------------------ MCP servers


@pytest.fixture(scope="module")
def tiny_server(tiny_engine, tmp_path_factory):
    """The MCP server over the tiny engine (no corpus), its stores in a temporary data dir of the module's own."""
    return server_at(tiny_engine, tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def stories_settings(stories_sae_dir, tmp_path):
    """Settings of a server over stories260K and its TinyStories corpus, stores in this test's tmp_path."""
    return stories_settings_at(tmp_path, stories_sae_dir)


@pytest.fixture
def stories_server(stories_engine, stories_settings):
    from sae_mcp.server.app import build_server

    return build_server(stories_engine, stories_settings)
