"""Shared fixtures: a generated tiny model + SAE (no files needed), and the real stories260K model from
../shared with a small SAE trained here by sae-lens' own runner (skipped with a reason when ../shared is absent).

Everything is offline and CPU, one thread (a busy 2-core box stalls 50x with two).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAE_MCP_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "fixtures" / "stories260K"
STORIES_HF = STORIES / "hf"
STORIES_CORPUS = STORIES / "corpus" / "tinystories_val.jsonl"
STORIES_HOOK = "blocks.2.hook_resid_pre"

needs_stories = pytest.mark.skipif(
    not (STORIES_HF / "config.json").exists(),
    reason=f"the real stories260K fixture is not at {STORIES_HF} (../shared beside the repo); "
    "set SAE_MCP_SHARED to the shared folder to run the end-to-end tests",
)


def stories_texts(n: int | None = None) -> list[str]:
    texts = [json.loads(line)["text"] for line in STORIES_CORPUS.open(encoding="utf-8") if line.strip()]
    return texts[:n] if n else texts


# ------------------------------------------------------------------------------------------ generated tiny


def _make_tiny_tokenizer(folder: Path):
    """A word-level tokenizer over a small vocabulary, saved and reloaded (transformer-lens reloads by path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = (
        "the a cat dog sat on mat ran to park Lily Tom ball red big little girl boy saw played happy sad "
        "and was is in of one day she he it they with . , ! ? 0 1 2 3 4 5 6 7 8 9"
    ).split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    """A 2-layer random-weight transformer with a real tokenizer, as a LoadedModel."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    from sae_mcp.engine.loading import LoadedModel

    tok = _make_tiny_tokenizer(tiny_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=len(tok),
        act_fn="gelu_new", normalization_type="LN", device="cpu", seed=0,
    )
    model = HookedSAETransformer(cfg, tokenizer=tok)
    model.eval()
    return LoadedModel(model=model, name="tiny", source=str(tiny_dir), architecture="generated")


def make_sae_folder(folder: Path, d_in: int, d_sae: int, hook_name: str, kind: str = "standard", seed: int = 0) -> Path:
    """A random SAE saved as a real SAELens folder (cfg.json + sae_weights.safetensors)."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook_name, model_name="tiny", context_size=32, prepend_bos=True)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        # Random init leaves b_enc at 0 and W_enc = W_dec.T; a small positive bias makes more features fire.
        sae.b_enc.add_(0.05)
    sae.save_model(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_sae_dir(tiny_dir) -> Path:
    return make_sae_folder(tiny_dir / "sae_l1", 32, 128, "blocks.1.hook_resid_pre")


@pytest.fixture(scope="session")
def tiny_engine(tiny_loaded, tiny_sae_dir):
    from sae_mcp.engine.loading import check_compatible, load_sae
    from sae_mcp.engine.runtime import Engine

    s = load_sae(str(tiny_sae_dir), "cpu", torch.float32)
    check_compatible(tiny_loaded, s)
    return Engine(tiny_loaded, [s], "cpu")


# ----------------------------------------------------------------------------------------------- stories260K


@pytest.fixture(scope="session")
def stories_loaded():
    if not (STORIES_HF / "config.json").exists():
        pytest.skip(f"the real stories260K fixture is not at {STORIES_HF} (../shared beside the repo)")
    from sae_mcp.engine.loading import load_model

    return load_model(str(STORIES_HF), "cpu", torch.float32)


@pytest.fixture(scope="session")
def stories_sae_dir(stories_loaded, tmp_path_factory) -> Path:
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
    from sae_mcp.engine.loading import check_compatible, load_sae
    from sae_mcp.engine.runtime import Engine

    s = load_sae(str(stories_sae_dir), "cpu", torch.float32)
    check_compatible(stories_loaded, s)
    return Engine(stories_loaded, [s], "cpu")
