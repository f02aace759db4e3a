"""The forward to a residual-stream hook with fused attention: transformer-lens' own modules and processed weights,
the attention pattern computed by F.scaled_dot_product_attention instead of transformer-lens' explicit one.

transformer-lens computes each layer's attention as scores = q @ k^T / scale, a [batch, heads, pos, pos] causal
mask applied with torch.where, a softmax, a torch.where that zeroes NaNs, then pattern @ v: five passes over the
[batch, heads, pos, pos] tensors. Measured (CPU, 1 thread, the shared 2-core box): scanning 100k tokens of
stories260K spent 4.8 of 5.8 s in the forward, most of it there. Here the same q, k, v (transformer-lens'
calculate_qkv_matrices and apply_rotary, so its weights, biases, QK-norm, rotary variants and GQA grouping) go
through one fused causal SDPA kernel; the embedding (input_to_embed), the norms and the MLP (apply_mlp) are
transformer-lens' modules, called as its TransformerBlock calls them. Only the attention's arithmetic differs, so
the residual equals transformer-lens' up to float rounding (tests/test_fast_forward.py: fp32 and bf16, a GPT-2 style
LayerNorm model and the Llama-family stories260K, every layer). No weights are copied: the memory is the model's.

Measured (bench/bench_fast_forward.py, one run, the shared 2-core box, CPU, 1 thread; a scan batch, to the bench
SAE's layer), throughput against transformer-lens' forward stopped at the layer:
    stories260K (64 windows x 128, to blocks.2)   ours 4.35x   HF + SDPA 4.53x   compile TL 3.12x   compile ours 4.91x
    gpt2-small shape (10 x 128, to blocks.7)      ours 1.13x                     compile TL 1.22x   compile ours 1.29x
Kept: ours. The Hugging Face implementation is as fast but needs the HF weights in memory beside transformer-lens'
processed ones (loading.py discards them; a 2x for a large model) and, for LayerNorm models, transformer-lens'
centred residual re-derived from it; torch.compile adds 10-30% but compiled 4-12 s for each batch shape (a scan's
batches come in many lengths) and fails under inference_mode here. On CPU the gpt2 shape is bound by its matrix
products, so attention is a small share of it; on a GPU its share is unmeasured (the GPU figure is still open:
bench/bench_index.py).

It runs only where it is exact: a `blocks.L.hook_resid_pre` or `blocks.L.hook_resid_post` hook, on a pre-norm
causal decoder with standard or rotary positions (tested: GPT-2 processed as its SAEs ask, Llama as stories260K,
GPT-NeoX-style parallel attention and MLP; others of that form, e.g. Qwen or Pythia, take it too) on one device,
with no hook attached and no SAE spliced in. Everything else (attention
soft-capping, local/sliding attention, ALiBi, shortformer, post-norm, QK clipping, attention sinks, split-QKV or
per-head inputs, attention results, 4-bit weights, several devices) goes through transformer-lens (`supported`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

# Architectures whose attention forward does more than calculate_qkv_matrices + rotary + softmax(qk)v (QK-norm on
# the full projection, post-norm blocks): transformer-lens' forward handles them.
_OWN_ATTENTION = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def blocks_to_run(hook_name: str) -> int | None:
    """How many blocks run before the hook's value is the residual: L for blocks.L.hook_resid_pre, L + 1 for
    blocks.L.hook_resid_post; None for any other hook."""
    m = _HOOK.fullmatch(hook_name)
    if m is None:
        return None
    return int(m.group(1)) + (1 if m.group(2) == "post" else 0)


def supported(model, hook_name: str) -> bool:
    """Whether resid() reproduces transformer-lens' activation at `hook_name` for `model` as it is now."""
    from transformer_lens.components import Attention, GroupedQueryAttention, TransformerBlock
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    n = blocks_to_run(hook_name)
    cfg = model.cfg
    if n is None or hook_name not in model.hook_dict or model.training or getattr(model, "acts_to_saes", None):
        return False
    flags_off = ("use_attn_in", "use_split_qkv_input", "use_attn_result", "use_local_attn", "use_logn_attn",
                 "use_attention_sinks", "use_normalization_before_and_after", "load_in_4bit")
    if any(getattr(cfg, f, False) for f in flags_off) or getattr(cfg, "clip_qkv", None) is not None:
        return False
    cap = getattr(cfg, "attn_scores_soft_cap", None)
    if (cap is not None and cap > 0) or cfg.n_devices != 1 or cfg.attention_dir != "causal":
        return False
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return False
    arch = cfg.original_architecture or ""
    if arch in POST_NORM_ARCHITECTURES or arch in _OWN_ATTENTION:
        return False
    for block in model.blocks[:n]:
        if type(block) is not TransformerBlock or type(block.attn) not in (Attention, GroupedQueryAttention):
            return False
        if block.attn.attn_type != "global" or block.attn._attention_dir_override is not None:
            return False
    return not _hooked(model, n)


def _hooked(model, n: int) -> bool:
    """Any forward hook on the embedding or on blocks 0..n-1 (their activations must then pass its hook points)."""
    for name, hp in model.hook_dict.items():
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is not None and int(m.group(1)) >= n:
            continue
        if hp.fwd_hooks or hp._forward_hooks or hp._forward_pre_hooks:
            return True
    return False


def resid(model, tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """tokens [batch, pos] -> the residual stream after blocks 0..n_blocks-1 [batch, pos, d_model], every position
    attending causally to all before it (as transformer-lens with an all-ones attention mask)."""
    mask = torch.ones_like(tokens)
    residual, _, _, _ = model.input_to_embed(tokens, attention_mask=mask)  # [batch, pos, d_model]
    for block in model.blocks[:n_blocks]:
        residual = _block(block, residual)
    return residual


def _block(block, resid_pre: torch.Tensor) -> torch.Tensor:
    """transformer-lens' TransformerBlock.forward for a pre-norm block, with _attention for its attention."""
    attn_out = _attention(block.attn, block.ln1(resid_pre))  # [batch, pos, d_model]
    if block.cfg.attn_only:
        return resid_pre + attn_out
    if block.cfg.parallel_attn_mlp:  # GPT-J / GPT-NeoX: both read resid_pre
        return resid_pre + attn_out + block.apply_mlp(block.ln2(resid_pre))
    resid_mid = resid_pre + attn_out
    return resid_mid + block.apply_mlp(block.ln2(resid_mid))


def _attention(attn, x: torch.Tensor) -> torch.Tensor:
    """transformer-lens' attention of the normalised residual x [batch, pos, d_model], the pattern by SDPA."""
    q, k, v = attn.calculate_qkv_matrices(x, x, x)  # [batch, pos, heads, d_head]; k, v: [.., kv heads, ..]
    if attn.cfg.positional_embedding_type == "rotary":
        q, k = attn.apply_rotary(q, 0), attn.apply_rotary(k, 0)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, pos, d_head]
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / float(attn.attn_scale),
                                       enable_gqa=k.shape[1] != q.shape[1])  # [batch, heads, pos, d_head]
    b, h, t, d = z.shape
    z = z.transpose(1, 2).reshape(b, t, h * d)  # [batch, pos, heads * d_head]
    w = attn.W_O.reshape(h * d, -1).T.contiguous()  # [d_model, heads * d_head], as transformer-lens lays it out
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    return F.linear(z, w, attn.b_O)
