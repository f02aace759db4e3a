"""The models and SAEs the tests build: the bundled stories260K model, its two SAEs and its corpus (sae_mcp/demo/),
a generated word-level tokenizer, random SAEs saved as real SAELens folders, and engines over them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae_mcp import demo
from sae_mcp.engine.loading import LoadedModel
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE

REPO = Path(__file__).resolve().parents[2]
STORIES_HF = demo.MODEL_DIR
STORIES_CORPUS = demo.CORPUS
STORIES_SAE_L1, STORIES_SAE_L3 = demo.SAE_DIRS  # 1024 features each, at blocks.1 / blocks.3.hook_resid_pre
STORIES_HOOK = "blocks.3.hook_resid_pre"  # the hook of stories_sae_dir


def stories_texts(n: int | None = None) -> list[str]:
    """The bundled corpus' documents (the first n)."""
    texts = [json.loads(line)["text"] for line in STORIES_CORPUS.open(encoding="utf-8") if line.strip()]
    return texts[:n] if n else texts


def make_tiny_tokenizer(folder: Path):
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


def engine_on(loaded: LoadedModel, *sae_folders: Path, **engine_kwargs) -> Engine:
    """An Engine over a loaded model and the SAE folders, each checked against the model, as a server loads them."""
    from sae_mcp.engine.loading import check_compatible
    from sae_mcp.engine.saes import load_sae

    saes = [load_sae(str(folder), "cpu", torch.float32) for folder in sae_folders]
    for s in saes:
        check_compatible(loaded, s)
    return Engine(loaded, saes, "cpu", **engine_kwargs)


def only_sae(engine: Engine) -> LoadedSAE:
    """The engine's one loaded SAE."""
    (s,) = engine.saes.values()
    return s
