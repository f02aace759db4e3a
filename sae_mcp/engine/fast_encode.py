"""The SAE encode the engine runs: sae-lens' own encode, computed in place for the architectures where that is exact.

sae-lens 6 encodes a StandardSAE as
    relu((x.to(dtype) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
a JumpReLUSAE as relu(pre) * (pre > threshold) and a TopKSAE as topk(pre, k) -> relu -> scattered into zeros (pre
optionally times the decoder's row norms), each step a new [tokens, d_sae] tensor. Here the matrix product's output
is the only [tokens, d_sae] tensor: the bias, the decoder-norm rescale, the ReLU, the threshold and the top-k
scatter are applied to it in place (a JumpReLU adds one bool mask, a quarter of it). In fp32 these are the same
operations on the same values, so the result is sae-lens' (tests/test_fast_encode.py compares against sae-lens'
encode for each architecture).

Why: on the CPU a fresh [tokens, d_sae] tensor costs more than the arithmetic on it. A 128 MB allocation is
mapped fresh by malloc and page-faulted in: measured on the shared 2-core box (1 thread), filling a new
[8128, 4096] fp32 tensor takes ~55 ms against ~5 ms for one already touched; sae-lens' encode of 8128 tokens of
stories260K into 4096 features took 240 ms, the matrix product alone 100 ms, the product into a reused buffer plus
bias and ReLU in place 66 ms. So `out` lets a caller (the scan) hand in the buffer of its previous batch. On a GPU
under bf16 autocast the product is bf16 and the fp32 bias would promote sae-lens' sum to an fp32 [tokens, d_sae]
tensor; in place it stays in the scan's precision (bf16), half the bytes for the state update to read.

Blocks: into `out`, the product is computed a block of rows at a time (~2 MB, BLOCK_BYTES) where W_enc is no larger
than a block, and each block gets its bias and activation while in cache; `on_block` hands each finished block to
the caller, and the scan finds its firing entries there (index/firing.py). Measured on stories260K (8128
tokens x 4096 features, 1 thread, best of 5): the encode 67 -> 56 ms (the matrix product alone ~53). Blocked or
not, it equals sae-lens' encode to float tolerance (a BLAS may sum a block's products in another order).

Anything this cannot match exactly falls back to sae-lens' encode: another class (gated, batch-top-k, matryoshka,
transcoders, subclasses), a runtime normalisation of the input (normalize_activations other than "none"), hook_z
reshaping, sparse top-k activations, or a hook attached to one of the SAE's hook points (it must see the values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _kind(sae) -> str | None:
    """'standard', 'jumprelu' or 'topk' when sae-lens' encode of `sae` can be done in place, else None."""
    from sae_lens import JumpReLUSAE, StandardSAE, TopKSAE
    from sae_lens.saes.topk_sae import TopK

    cfg = sae.cfg
    if getattr(cfg, "normalize_activations", "none") != "none" or getattr(sae, "hook_z_reshaping_mode", False):
        return None
    for hp in (sae.hook_sae_input, sae.hook_sae_acts_pre, sae.hook_sae_acts_post):
        if hp._forward_hooks or hp._forward_pre_hooks or getattr(hp, "fwd_hooks", None):
            return None
    act = sae.activation_fn
    if type(sae) is StandardSAE and type(act) is nn.ReLU:
        return "standard"
    if type(sae) is JumpReLUSAE and type(act) is nn.ReLU:
        return "jumprelu"
    if type(sae) is TopKSAE and type(act) is TopK and not act.use_sparse_activations:
        return "topk"
    return None


def can_fuse(sae) -> bool:
    """Whether encode() computes `sae` in place (else it calls sae-lens' encode)."""
    return _kind(sae) is not None


def encode(sae, x: torch.Tensor, out: torch.Tensor | None = None,
           on_block: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """x [..., d_in] -> sae-lens' sae.encode(x) [..., d_sae]. With `out` (a contiguous [M, d_sae] buffer, M >= N,
    x 2-d [N, d_in]): the result is written into out's first N rows when they fit, a block of rows at a time where
    that pays (_block_rows), and is a view of them, valid until the caller reuses the buffer; otherwise a new
    tensor. `on_block(block [r, d_sae], first_row)` is called on every finished block of rows in order, while it is
    still in the CPU's cache (the scan finds its firing entries there); on the whole result when not blocked."""
    kind = _kind(sae)
    if kind is None:
        return _each(sae.encode(x), on_block)
    sae_in = x.to(sae.dtype)
    if sae.cfg.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec  # [..., d_in]: cheap next to [..., d_sae]
    scale = sae.W_dec.norm(dim=-1) if kind == "topk" and sae.cfg.rescale_acts_by_decoder_norm else None  # [d_sae]
    target = _into(sae_in, sae.W_enc, out)  # [N, d_sae]: out's first N rows, or None
    if target is None:
        return _each(_activate(sae, kind, sae_in @ sae.W_enc, scale), on_block)
    step = _block_rows(sae.W_enc, target)
    for r0 in range(0, target.shape[0], step):
        block = torch.matmul(sae_in[r0 : r0 + step], sae.W_enc, out=target[r0 : r0 + step])  # [r, d_sae]
        _activate(sae, kind, block, scale)
        if on_block is not None:
            on_block(block, r0)
    return target


def _activate(sae, kind: str, pre: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """pre = sae_in @ W_enc [..., d_sae] -> the SAE's activations, in place (rows independent of each other)."""
    pre.add_(sae.b_enc)  # sae-lens: sae_in @ W_enc + b_enc
    if kind == "standard":
        return pre.relu_()
    if kind == "jumprelu":
        # relu(pre) * (pre > t): after relu_, an entry is zeroed where pre <= t. Where t >= 0, relu(pre) <= t
        # exactly when pre <= t; where t < 0, relu(pre) >= 0 > t is never zeroed, and pre in (t, 0] is 0 already.
        # NaN stays NaN both ways (NaN <= t is False).
        pre.relu_()
        return pre.masked_fill_(pre <= sae.threshold, 0)
    if scale is not None:
        pre.mul_(scale)
    vals, idx = torch.topk(pre, k=sae.activation_fn.k, dim=-1, sorted=False)  # as sae-lens' TopK, [..., k]
    return pre.zero_().scatter_(-1, idx, vals.relu_())


def _each(acts: torch.Tensor, on_block: Callable[[torch.Tensor, int], None] | None) -> torch.Tensor:
    if on_block is not None:
        on_block(acts.reshape(-1, acts.shape[-1]), 0)
    return acts


def _into(sae_in: torch.Tensor, w_enc: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor | None:
    """out's first N rows when the product sae_in @ W_enc can be written there, else None. Never under autocast
    (an out= product is not cast): there the device's caching allocator reuses memory anyway (CUDA), and the
    buffer is for the CPU."""
    n = sae_in.shape[0]
    if (out is None or sae_in.ndim != 2 or torch.is_autocast_enabled(sae_in.device.type)
            or out.ndim != 2 or out.shape[1] != w_enc.shape[1] or out.shape[0] < n
            or out.dtype != torch.promote_types(sae_in.dtype, w_enc.dtype) or out.device != sae_in.device
            or not out.is_contiguous()):
        return None
    return out[:n]


# A block of the product's rows is finished (bias, activation) while it is in cache: ~2 MB, L2 + some of L3. Only
# where W_enc is as small (it is read again for every block): stories260K's 64 x 4096 (1 MB), not gpt2-small's
# 768 x 24576 (75 MB), whose product is bound by the matrix product anyway.
BLOCK_BYTES = 2 << 20


def _block_rows(w_enc: torch.Tensor, target: torch.Tensor) -> int:
    """Rows per block of `target` [N, d_sae]: BLOCK_BYTES of them where W_enc fits in BLOCK_BYTES, else all."""
    row = target.shape[1] * target.element_size()
    if w_enc.numel() * w_enc.element_size() > BLOCK_BYTES or row == 0:
        return max(target.shape[0], 1)
    return max(1, BLOCK_BYTES // row)
