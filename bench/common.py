"""What the benches share: the bundled stories260K model and TinyStories corpus, the corpus cut into scan windows, a
random SAE made sparse like a trained one, and the two engines the scan benches measure (stories260K with a 4096-wide
SAE, and a gpt2-small-shaped random model with a 24576-wide SAE). Each bench imports from here and from no other
bench.

Importing this module makes the repo importable and the hub offline (the benches run as `python bench/<name>.py`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The model stack (transformer-lens, sae-lens) is imported where it is used: the HTTP benches need none of it.
import torch  # noqa: E402

from sae_mcp import demo  # noqa: E402
from sae_mcp.engine.corpus import Window, iter_windows, resolve_corpus  # noqa: E402

if TYPE_CHECKING:
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.engine.saes import LoadedSAE

STORIES_HF = demo.MODEL_DIR  # the bundled stories260K model (a Llama: RMSNorm, rotary, GQA; vocabulary 512)
CORPUS = demo.CORPUS  # the bundled TinyStories corpus (JSONL, ~384k tokens)
STORIES_SAE = demo.SAE_DIRS[1]  # the bundled trained SAE: 1024 features at blocks.3.hook_resid_pre
CONTEXT = 128  # a scan window: BOS + 127 tokens of one document


def corpus_windows(tokenizer, max_tokens: int, corpus: Path = CORPUS) -> list[Window]:
    """The windows a scan of max_tokens document tokens reads (BOS + 127 tokens of one document each)."""
    out, seen = [], 0
    for w in iter_windows(resolve_corpus(str(corpus)), tokenizer, CONTEXT, 1):
        if seen >= max_tokens:
            break
        out.append(w)
        seen += len(w.ids) - 1
    return out


def calibration_batch(tokenizer, n: int) -> torch.Tensor:
    """The corpus' first n full-length windows, [n, 128] token ids: what sparse_random_sae calibrates on."""
    full = [w.ids for w in corpus_windows(tokenizer, 4000) if len(w.ids) == CONTEXT]
    return torch.tensor(full[:n])


def sparse_random_sae(model, hook: str, layer: int, d_sae: int, calib: torch.Tensor, l0: int = 64) -> LoadedSAE:
    """A random StandardSAE whose b_enc makes ~l0 features fire per token on the calibration batch calib [B, T].
    A random SAE with a plain negative b_enc would fire a third of its features, and make every sparse path look
    slow for the wrong reason; trained SAEs (gpt2-small-res-jb) fire ~64 a token."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from sae_mcp.engine.saes import LoadedSAE

    d_in = model.cfg.d_model
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(
        hook_name=hook, model_name="bench", context_size=CONTEXT, prepend_bos=True)))
    sae.to(model.cfg.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(calib, names_filter=[hook], stop_at_layer=layer + 1)
        x = cache[hook].reshape(-1, d_in).float()  # [B*T, d_in]
        pre = (x - sae.b_dec) @ sae.W_enc  # [B*T, d_sae]
        # the quantile of a 4096-feature slice: torch.quantile refuses inputs over 16M entries
        q = torch.quantile(pre[:, : min(d_sae, 4096)].flatten().float(), 1 - l0 / d_sae)
    with torch.no_grad():
        sae.b_enc.fill_(-float(q))
    sae.to(model.cfg.dtype)  # as the model: a bf16 model gets a bf16 SAE (fp32 by default)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return LoadedSAE(sae=sae, key=hook, hook_name=hook, layer=layer, d_in=d_in, d_sae=d_sae, architecture="standard",
                     source=f"random-{d_sae}", release=None, sae_id=None, neuronpedia_id=None, prepend_bos=True,
                     context_size=CONTEXT, dataset_path=None)


def stories_engine(device: str) -> tuple[Engine, LoadedSAE]:
    """The bundled stories260K model with a random 4096-wide SAE at blocks.2.hook_resid_pre, L0 ~64 on TinyStories."""
    from sae_mcp.engine.loading import load_model
    from sae_mcp.engine.runtime import Engine

    loaded = load_model(str(STORIES_HF), device, torch.float32)
    calib = calibration_batch(loaded.model.tokenizer, 8).to(device)
    sae = sparse_random_sae(loaded.model, "blocks.2.hook_resid_pre", 2, 4096, calib)
    return Engine(loaded, [sae], device), sae


def gpt2_model(device: str, tokenizer=None, dtype: torch.dtype = torch.float32):
    """A gpt2-small-shaped HookedSAETransformer with random weights (a config, no download): 12 layers, d_model 768,
    vocabulary 50257; `tokenizer` may be None (then feed it token ids)."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LNPre", device=device, seed=0,
                                  dtype=dtype)
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def gpt2_engine(device: str, tokenizer, dtype: torch.dtype = torch.float32) -> tuple[Engine, LoadedSAE]:
    """The gpt2-small shape with a random 24576-wide SAE at blocks.7.hook_resid_pre, calibrated on corpus windows cut
    by `tokenizer` (the stories tokenizer's 512 ids are valid ids of the random model)."""
    from sae_mcp.engine.loading import LoadedModel
    from sae_mcp.engine.runtime import Engine

    model = gpt2_model(device, tokenizer, dtype)
    calib = calibration_batch(tokenizer, 2).to(device)
    sae = sparse_random_sae(model, "blocks.7.hook_resid_pre", 7, 24576, calib)
    return Engine(LoadedModel(model, "gpt2-shaped", "random", "generated"), [sae], device), sae
