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

Anything this cannot match exactly falls back to sae-lens' encode: another class (gated, batch-top-k, matryoshka,
transcoders, subclasses), a runtime normalisation of the input (normalize_activations other than "none"), hook_z
reshaping, sparse top-k activations, or a hook attached to one of the SAE's hook points (it must see the values).
"""

from __future__ import annotations

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


def encode(sae, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., d_in] -> sae-lens' sae.encode(x) [..., d_sae]. With `out` (a contiguous [M, d_sae] buffer, M >= N,
    x 2-d [N, d_in]): the product is written into out's first N rows when they fit, and the result is a view of
    them, valid until the caller reuses the buffer; otherwise a new tensor."""
    kind = _kind(sae)
    if kind is None:
        return sae.encode(x)
    sae_in = x.to(sae.dtype)
    if sae.cfg.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec  # [..., d_in]: cheap next to [..., d_sae]
    pre = _product(sae_in, sae.W_enc, out)  # [..., d_sae], the one big tensor
    pre.add_(sae.b_enc)  # sae-lens: sae_in @ W_enc + b_enc
    if kind == "standard":
        return pre.relu_()
    if kind == "jumprelu":
        # relu(pre) * (pre > t): after relu_, an entry is zeroed where pre <= t. Where t >= 0, relu(pre) <= t
        # exactly when pre <= t; where t < 0, relu(pre) >= 0 > t is never zeroed, and pre in (t, 0] is 0 already.
        # NaN stays NaN both ways (NaN <= t is False).
        pre.relu_()
        return pre.masked_fill_(pre <= sae.threshold, 0)
    if sae.cfg.rescale_acts_by_decoder_norm:
        pre.mul_(sae.W_dec.norm(dim=-1))
    vals, idx = torch.topk(pre, k=sae.activation_fn.k, dim=-1, sorted=False)  # as sae-lens' TopK, [..., k]
    return pre.zero_().scatter_(-1, idx, vals.relu_())


def _product(sae_in: torch.Tensor, w_enc: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """sae_in @ W_enc, into out's first rows when out fits. Never under autocast (an out= product is not cast):
    there the device's caching allocator reuses memory anyway (CUDA), and the buffer is for the CPU."""
    n = sae_in.shape[0]
    if (out is None or sae_in.ndim != 2 or torch.is_autocast_enabled(sae_in.device.type)
            or out.ndim != 2 or out.shape[1] != w_enc.shape[1] or out.shape[0] < n
            or out.dtype != torch.promote_types(sae_in.dtype, w_enc.dtype) or out.device != sae_in.device
            or not out.is_contiguous()):
        return sae_in @ w_enc
    return torch.matmul(sae_in, w_enc, out=out[:n])
