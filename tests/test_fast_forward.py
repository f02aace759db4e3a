"""The fused-attention forward to residual-stream hooks (engine/fast_forward.py) against transformer-lens' own
activations at the hook (run_with_cache with an all-ones mask, as forward_to_hook calls it), at every layer's
hook_resid_pre and hook_resid_post: the real Llama-family stories260K (RMSNorm, rotary, grouped-query attention,
gated MLP), a GPT-2 model loaded from a Hugging Face folder through the real loader (so fold_ln and
center_writing_weights processed it: LayerNormPre, standard positions), the generated tiny LayerNorm model, and a
generated GPT-NeoX-style model (parallel attention and MLP, partial rotary); fp32 tight, bf16 autocast looser. And
everything it does not reproduce goes through transformer-lens."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import fast_forward

from helpers.models import engine_on, make_sae_folder, make_tiny_tokenizer


def cached(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[hook], attention_mask=torch.ones_like(tokens))
    return cache[hook]


def fast(model, tokens: torch.Tensor, hook: str) -> torch.Tensor:
    assert fast_forward.supported(model, hook), hook
    with torch.inference_mode():
        return fast_forward.resid(model, tokens, fast_forward.blocks_to_run(hook))


def random_tokens(model, batch: int = 3, seq: int = 21, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, seq), generator=g)
    tokens[:, 0] = 1
    return tokens


@pytest.fixture(scope="module")
def gpt2_folder_loaded(tmp_path_factory):
    """A random 3-layer GPT-2 saved as a Hugging Face folder (safetensors + the tiny tokenizer) and loaded through
    load_model, processed as gpt2-small's SAEs ask (fold_ln, center_writing_weights: LayerNormPre, a centred
    residual stream)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sae_mcp.engine.loading import load_model

    folder = tmp_path_factory.mktemp("gpt2_folder")
    tok = make_tiny_tokenizer(folder)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_ctx=64, n_embd=48, n_layer=3, n_head=4))
    hf.save_pretrained(folder)
    loaded = load_model(str(folder), "cpu", torch.float32)
    assert loaded.model.cfg.normalization_type == "LNPre" and loaded.processing["center_writing_weights"]
    return loaded


@pytest.fixture(scope="module")
def neox_model():
    """A generated GPT-NeoX-style model: parallel attention and MLP, rotary on half of each head, LayerNorm."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=60,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                  rotary_dim=4, parallel_attn_mlp=True, device="cpu", seed=1)
    model = HookedSAETransformer(cfg)
    model.eval()
    return model


def models(request) -> dict:
    return {"stories": lambda: request.getfixturevalue("stories_loaded").model,
            "gpt2-folder": lambda: request.getfixturevalue("gpt2_folder_loaded").model,
            "tiny-ln": lambda: request.getfixturevalue("tiny_loaded").model,
            "neox": lambda: request.getfixturevalue("neox_model")}


@pytest.mark.parametrize("which", ["stories", "gpt2-folder", "tiny-ln", "neox"])
def test_the_fast_forward_equals_transformer_lens_at_every_residual_hook_in_fp32(request, which):
    model = models(request)[which]()
    tokens = random_tokens(model)
    for layer in range(model.cfg.n_layers):
        for where in ("pre", "post"):
            hook = f"blocks.{layer}.hook_resid_{where}"
            assert_close(fast(model, tokens, hook), cached(model, tokens, hook), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["stories", "gpt2-folder"])
def test_the_fast_forward_under_bf16_autocast_is_close_to_transformer_lens_under_it(request, which):
    """The scan's precision on a GPU is bf16 autocast; CPU autocast stands in for it here. Both paths round to bf16
    at different points, so the tolerance is bf16's (~3 significant digits) times the residual's scale."""
    model = models(request)[which]()
    tokens = random_tokens(model, seed=1)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = fast(model, tokens, hook), cached(model, tokens, hook)
    exact = cached(model, tokens, hook)  # fp32, for the scale of the error bf16 itself makes
    scale = float(exact.abs().max())
    bf16_err = float((ref.float() - exact).abs().max())
    assert_close(got.float(), ref.float(), rtol=0, atol=max(2 * bf16_err, 1e-2 * scale))


def test_engine_forward_to_hook_takes_the_fast_path_for_the_stories_saes(stories_engine, stories_loaded, tmp_path):
    from helpers.models import STORIES_SAE_L1

    engine = engine_on(stories_loaded, STORIES_SAE_L1)
    for s in [*engine.saes.values(), *stories_engine.saes.values()]:
        assert fast_forward.supported(engine.model, s.hook_name)
        tokens = random_tokens(engine.model, seed=2)
        assert_close(engine.forward_to_hook(tokens, s), cached(engine.model, tokens, s.hook_name), rtol=1e-5,
                     atol=1e-5)


def test_other_hooks_models_and_a_hooked_model_go_through_transformer_lens(tiny_loaded, tmp_path):
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    model = tiny_loaded.model
    for hook in ("blocks.1.hook_resid_mid", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "hook_embed",
                 "blocks.2.hook_resid_pre", "blocks.1.ln1.hook_normalized"):
        assert not fast_forward.supported(model, hook), hook
    assert fast_forward.supported(model, "blocks.1.hook_resid_pre")
    # A hook anywhere before the SAE's layer must see the activations (and may change them).
    model.blocks[0].mlp.hook_post.add_hook(lambda act, hook: act * 0)
    try:
        assert not fast_forward.supported(model, "blocks.1.hook_resid_pre")
        assert fast_forward.supported(model, "blocks.0.hook_resid_pre")  # the hook is after it
        engine = engine_on(tiny_loaded, make_sae_folder(tmp_path / "sae", model.cfg.d_model, 16,
                                                        "blocks.1.hook_resid_pre"))
        (s,) = engine.saes.values()
        tokens = random_tokens(model, seed=3)
        hooked = engine.forward_to_hook(tokens, s)
    finally:
        model.reset_hooks()
    assert not torch.allclose(hooked, cached(model, tokens, "blocks.1.hook_resid_pre"))
    capped = HookedSAETransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=20, act_fn="gelu",
        normalization_type="RMS", attn_scores_soft_cap=50.0, device="cpu"))
    local = HookedSAETransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=20, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="shortformer", device="cpu"))
    for m in (capped, local):
        m.eval()
        assert not fast_forward.supported(m, "blocks.0.hook_resid_post")
