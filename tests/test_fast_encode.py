"""The in-place encode (engine/fast_encode.py) against sae-lens' own encode, for each architecture it computes
(StandardSAE, JumpReLUSAE, TopKSAE, sae-lens 6 classes saved and loaded as SAELens folders like make_sae_folder's),
with and without apply_b_dec_to_input, on random inputs and on the real stories260K activations, whole or a block of
rows at a time; and the settings it cannot match falling back to sae-lens' encode (runtime normalisation, a hook on
the SAE, another class)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_mcp.engine import fast_encode
from sae_mcp.engine.saes import load_sae

from helpers.models import STORIES_SAE_L1

D_IN, D_SAE = 48, 320


def saved_sae(tmp_path, kind: str, seed: int = 0, **cfg):
    """A random sae-lens 6 SAE of `kind`, saved as a SAELens folder and loaded back through load_sae (the real
    loader). b_enc and the JumpReLU threshold are given both signs, so every branch of the activation is hit."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_pre", model_name="tiny", context_size=32, prepend_bos=True)
    classes = {"standard": (StandardSAE, StandardSAEConfig), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig),
               "topk": (TopKSAE, TopKSAEConfig)}
    cls, cfg_cls = classes[kind]
    if kind == "topk":
        cfg.setdefault("k", 12)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=meta, **cfg))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D_SAE) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN) * 0.5)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # unequal decoder norms (the top-k rescale)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.randn(D_SAE) * 0.2)  # some negative: relu and the step both matter
    folder = tmp_path / f"{kind}-{seed}-{'-'.join(f'{k}{v}' for k, v in sorted(cfg.items()))}"
    sae.save_model(str(folder))
    return load_sae(str(folder), "cpu", torch.float32).sae


def reference(sae, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return sae.encode(x)


CASES = [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}),
    ("jumprelu", {}), ("jumprelu", {"apply_b_dec_to_input": False}),
    ("topk", {}), ("topk", {"rescale_acts_by_decoder_norm": True}), ("topk", {"apply_b_dec_to_input": False}),
]


@pytest.mark.parametrize(("kind", "cfg"), CASES, ids=[f"{k}-{'-'.join(c) or 'default'}" for k, c in CASES])
def test_the_in_place_encode_equals_sae_lens_encode(tmp_path, kind, cfg):
    sae = saved_sae(tmp_path, kind, **cfg)
    assert fast_encode.can_fuse(sae)
    torch.manual_seed(1)
    x = torch.randn(257, D_IN)
    ref = reference(sae, x)
    assert (ref > 0).any() and (ref == 0).any()
    with torch.inference_mode():
        got = fast_encode.encode(sae, x)
        got3 = fast_encode.encode(sae, x.view(1, 257, D_IN))  # [batch, seq, d_in] as the prompt tools pass it
    assert_close(got, ref)
    assert_close(got3, ref.view(1, 257, D_SAE))
    if kind == "topk":
        assert int((got > 0).sum(1).max()) <= sae.cfg.k


@pytest.mark.parametrize("kind", ["standard", "jumprelu", "topk"])
def test_the_encode_writes_into_a_reused_buffer_and_equals_sae_lens(tmp_path, kind):
    sae = saved_sae(tmp_path, kind)
    buf = torch.full((300, D_SAE), float("nan"))  # stale values from a previous batch must not leak
    torch.manual_seed(2)
    for n in (300, 123):
        x = torch.randn(n, D_IN)
        with torch.inference_mode():
            got = fast_encode.encode(sae, x, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.shape == (n, D_SAE)
        assert_close(got, reference(sae, x))
    with torch.inference_mode():  # a buffer that does not fit is ignored
        small = fast_encode.encode(sae, torch.randn(301, D_IN), out=buf)
    assert small.data_ptr() != buf.data_ptr() and small.shape == (301, D_SAE)


@pytest.mark.parametrize(("kind", "cfg"), CASES, ids=[f"{k}-{'-'.join(c) or 'default'}" for k, c in CASES])
def test_the_encode_in_blocks_of_rows_equals_sae_lens_and_hands_each_block_once(tmp_path, kind, cfg, monkeypatch):
    """Into a buffer, a block of rows at a time (BLOCK_BYTES made small: 4 blocks of 64 rows and a short one): the
    result is sae-lens' encode, and on_block sees every row once, in order, already final (a view of the result);
    where W_enc is larger than a block, one block of all rows."""
    sae = saved_sae(tmp_path, kind, **cfg)
    torch.manual_seed(6)
    x = torch.randn(301, D_IN)
    buf = torch.empty(400, D_SAE)
    for block_bytes, firsts in ((64 * D_SAE * 4, [0, 64, 128, 192, 256]), (D_IN * D_SAE * 4 - 1, [0])):
        monkeypatch.setattr(fast_encode, "BLOCK_BYTES", block_bytes)  # W_enc: D_IN * D_SAE * 4 bytes
        seen = []
        with torch.inference_mode():
            got = fast_encode.encode(sae, x, out=buf, on_block=lambda b, r0: seen.append((r0, b.clone(), b)))
            ref = reference(sae, x)
        assert got.data_ptr() == buf.data_ptr() and got.shape == (301, D_SAE)
        assert_close(got, ref)
        assert [r0 for r0, _, _ in seen] == firsts
        assert torch.equal(torch.cat([c for _, c, _ in seen]), got)  # final when handed
        assert all(b.data_ptr() == got[r0].data_ptr() for r0, _, b in seen)
    seen = []
    with torch.inference_mode():
        got = fast_encode.encode(sae, x, on_block=lambda b, r0: seen.append((r0, b)))  # no buffer: one block
    assert len(seen) == 1 and seen[0][0] == 0 and seen[0][1].data_ptr() == got.data_ptr()


def test_the_jumprelu_threshold_is_strict_at_the_exact_pre_activation(tmp_path):
    """An entry whose pre-activation equals its threshold is zeroed (sae-lens: pre > threshold)."""
    sae = saved_sae(tmp_path, "jumprelu")
    torch.manual_seed(3)
    x = torch.randn(40, D_IN)
    with torch.inference_mode():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # the same operations the encode runs
        cols = torch.arange(0, D_SAE, 7)
        sae.threshold[cols] = pre[5, cols]  # on the boundary for row 5, both signs among them
        ref = reference(sae, x)
        got = fast_encode.encode(sae, x)
    assert (ref[5, cols] == 0).all()
    assert_close(got, ref)


def test_the_trained_stories_sae_on_real_activations_equals_sae_lens(stories_engine, stories_loaded):
    """The bundled layer-1 SAE (StandardSAE) on stories260K's residual stream, through Engine.encode."""
    from helpers.models import engine_on

    engine = engine_on(stories_loaded, STORIES_SAE_L1)
    (s,) = engine.saes.values()
    assert fast_encode.can_fuse(s.sae)
    tokens = torch.randint(3, 512, (4, 64))
    tokens[:, 0] = 1
    x = engine.forward_to_hook(tokens, s).reshape(-1, s.d_in)
    assert_close(engine.encode(s, x), reference(s.sae, x))


def test_bf16_autocast_encodes_in_bf16_close_to_fp32(tmp_path):
    """Under autocast (the scan's bf16 on a GPU; CPU autocast here) the result stays in the product's precision
    instead of sae-lens' fp32 [tokens, d_sae] sum, and agrees with it to bf16 precision."""
    sae = saved_sae(tmp_path, "standard")
    torch.manual_seed(4)
    x = torch.randn(64, D_IN)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast_encode.encode(sae, x)
        ref = reference(sae, x)
    assert got.dtype == torch.bfloat16 and ref.dtype == torch.float32
    scale = float(ref.abs().max())
    assert_close(got.float(), ref, rtol=0, atol=2e-2 * scale)


def test_what_it_cannot_match_falls_back_to_sae_lens(tmp_path):
    from sae_lens import GatedSAE, GatedSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(5)
    x = torch.randn(50, D_IN)
    normed = saved_sae(tmp_path, "standard", normalize_activations="layer_norm")
    hooked = saved_sae(tmp_path, "standard", seed=1)
    hooked.hook_sae_acts_pre.add_hook(lambda act, hook: act * 2)  # a hook must see (and change) the values
    meta = SAEMetadata(hook_name="blocks.1.hook_resid_pre", model_name="tiny")
    gated = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta))
    for sae in (normed, hooked, gated):
        assert not fast_encode.can_fuse(sae)
        with torch.inference_mode():
            assert_close(fast_encode.encode(sae, x), sae.encode(x), rtol=0, atol=0)
    with torch.inference_mode():
        assert not torch.equal(fast_encode.encode(hooked, x), fast_encode.encode(saved_sae(tmp_path, "standard",
                                                                                           seed=1), x))
    hooked.reset_hooks()
    assert fast_encode.can_fuse(hooked)
