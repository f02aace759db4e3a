"""Engine.forward_to_hook, the forward every scan, fidelity measure and blind set reads activations with: for a
residual-stream hook of a pre-norm decoder it runs fast_forward.py (transformer-lens' modules with fused attention:
equal up to float rounding, tests/test_fast_forward.py); for any other residual-stream-before-block hook it stops the
forward before that block instead of caching inside it (the same operations, so equal up to float noise). Compared
with transformer-lens' own cache at the hook (fp32), on the real Llama-architecture model and a generated
GPT-2-style (LayerNorm) model, at every layer, both ways; other hooks keep the cache.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from helpers.models import engine_on, make_sae_folder


def _cached(model, tokens, hook: str) -> torch.Tensor:
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[hook], attention_mask=torch.ones_like(tokens))
    return cache[hook]


@pytest.mark.parametrize("fast", [True, False], ids=["fast-forward", "stop-at-layer"])
@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_forward_to_hook_equals_the_cached_activation_at_every_resid_pre_hook(which, fast, stories_loaded, tiny_loaded,
                                                                              tmp_path, monkeypatch):
    from sae_mcp.engine import fast_forward

    if not fast:  # transformer-lens' own forward, stopped before the block (a model fast_forward does not run)
        monkeypatch.setattr(fast_forward, "supported", lambda model, hook_name: False)
    tol = 1e-5 if fast else 1e-6  # fused attention rounds differently; stopping early runs the same operations
    loaded = stories_loaded if which == "stories" else tiny_loaded
    model = loaded.model
    d = model.cfg.d_model
    torch.manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 17))
    tokens[:, 0] = 1
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.hook_resid_pre"
        engine = engine_on(loaded, make_sae_folder(tmp_path / f"{which}{layer}", d, 16, hook))
        (s,) = engine.saes.values()
        assert fast_forward.supported(model, hook) == fast
        assert_close(engine.forward_to_hook(tokens, s), _cached(model, tokens, hook), rtol=tol, atol=tol)


def test_forward_to_hook_reads_other_hooks_from_the_cache(tiny_loaded, tmp_path):
    model = tiny_loaded.model
    hook = "blocks.1.hook_resid_mid"
    engine = engine_on(tiny_loaded, make_sae_folder(tmp_path / "mid", model.cfg.d_model, 16, hook))
    (s,) = engine.saes.values()
    tokens = torch.tensor([[1, 5, 6, 7]])
    assert_close(engine.forward_to_hook(tokens, s), _cached(model, tokens, hook), rtol=1e-6, atol=1e-6)
