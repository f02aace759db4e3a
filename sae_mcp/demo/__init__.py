"""The bundled demo: a real pretrained model, two SAEs trained on it, and a corpus, all inside the package.

    stories260K/                  Karpathy's llama2.c TinyStories model (260k parameters, Llama architecture, MIT)
                                  as a local Hugging Face folder, with its licenses
    saes/blocks.1.hook_resid_pre  a standard (ReLU, L1) SAE of 1024 features at the residual stream before block 1
    saes/blocks.3.hook_resid_pre  the same at block 3 (two layers: circuits run from one SAE to the next)
    corpus/tinystories.jsonl      1,140 TinyStories validation stories, one {"text": ...} a line

`sae-mcp serve --demo` (and call, index, dashboard, doctor) loads exactly these, offline, and on first use indexes
the corpus for every SAE (DEMO_INDEX_TOKENS), so every tool answers at once. SOURCES.md says where each file came
from, the command that trained each SAE and its fidelity. The test suite runs on the same files, so a fresh clone
in any folder needs nothing beside it.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "stories260K"
SAE_DIRS = (HERE / "saes" / "blocks.1.hook_resid_pre", HERE / "saes" / "blocks.3.hook_resid_pre")
CORPUS = HERE / "corpus" / "tinystories.jsonl"
# The whole corpus (384,448 document tokens in 3,581 windows of 128): every view and blind set draws from all of it.
DEMO_INDEX_TOKENS = 400_000


def missing() -> list[str]:
    """The demo files this installation lacks (an sdist or a wheel built without package data): [] when whole."""
    files = [MODEL_DIR / "config.json", MODEL_DIR / "model.safetensors", MODEL_DIR / "tokenizer.json", CORPUS]
    files += [d / name for d in SAE_DIRS for name in ("cfg.json", "sae_weights.safetensors")]
    return [str(f) for f in files if not f.is_file()]
