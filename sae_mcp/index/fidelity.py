"""How faithful each SAE is on this model, measured once per server on the first windows of its corpus.

    explained variance   1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean x||^2 over the document tokens
    L0                   mean active features per token
    dead in sample       features that never fired on these tokens (an upper bound on dead features: small sample)
    losses               next-token cross-entropy of the plain model, with the SAE's reconstruction spliced in
                         (no error term), and with the hook's activation zeroed; loss recovered =
                         (zero - spliced) / (zero - clean), 1 when the reconstruction loses nothing

The windows are the corpus scans' windows (BOS + context_size - 1 document tokens); only full-length ones are
used, so no padding enters the losses. Cost: FIDELITY_WINDOWS windows through the whole model three times.
"""

from __future__ import annotations

import torch

from sae_mcp.engine.corpus import iter_windows, window_context
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.index.scan import bos_id
from sae_mcp.index.source import ExampleSource
from sae_mcp.results import SaeFidelity, rounded

FIDELITY_WINDOWS = 4  # windows of the SAE's context size: 512 tokens for a 128-token SAE
MEAN_TOKENS = 8128  # mean ablation's sample (trace_circuit): ~8k document tokens, 64 windows of a 128-token SAE, so
# a feature firing on 1 token in 1,000 is seen ~8 times; an SAE of longer contexts takes fewer, longer windows


def mean_windows(engine: Engine, s: LoadedSAE) -> int:
    """Windows of the SAE's corpus that hold MEAN_TOKENS document tokens (each window: BOS + length - 1 of them)."""
    length = window_context(s.context_size, engine.model.cfg.n_ctx)
    return max(1, -(-MEAN_TOKENS // max(length - 1, 1)))


def sample_tokens(examples: ExampleSource, engine: Engine, s: LoadedSAE, windows: int = FIDELITY_WINDOWS
                  ) -> torch.Tensor:
    """The first `windows` full-length windows of the SAE's corpus -> tokens [B, T] (B may be fewer; 0 rows when
    the corpus has no full window). Raises the corpus' NotFound/LoadError when there is none."""
    length = window_context(s.context_size, engine.model.cfg.n_ctx)
    rows = []
    for w in iter_windows(examples.corpus(s), engine.corpus_tokenizer, length, bos_id(engine, s), hub=engine.hub):
        if len(w.ids) == length:
            rows.append(w.ids)
        if len(rows) == windows:
            break
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


def measure_fidelity(engine: Engine, s: LoadedSAE, tokens: torch.Tensor) -> SaeFidelity:
    """tokens [B, T] -> the SAE's fidelity on them. Call inside device_work()."""
    model, tokens = engine.model, tokens.to(engine.device)
    first = 1 if s.prepend_bos else 0  # BOS is context, not a document token
    with torch.inference_mode():
        x = engine.forward_to_hook(tokens, s)[:, first:].flatten(0, 1).float()  # [N, d_in]
        acts = engine.encode(s, x)  # [N, d_sae]
        x_hat = s.sae.decode(acts).float().reshape(x.shape)  # [N, d_in]
        ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        fired = (acts > 0)  # [N, d_sae]
        clean = float(model(tokens, return_type="loss"))
        with model.saes(saes=[s.sae], use_error_term=False):
            spliced = float(model(tokens, return_type="loss"))
        with model.hooks(fwd_hooks=[(s.hook_name, lambda act, hook: torch.zeros_like(act))]):
            zeroed = float(model(tokens, return_type="loss"))
    recovered = (zeroed - spliced) / (zeroed - clean) if zeroed != clean else 1.0
    return SaeFidelity(
        tokens=int(x.shape[0]),
        explained_variance=rounded(float(ev)),
        l0=rounded(float(fired.sum(-1).float().mean()), 2),
        dead_in_sample=int((~fired.any(0)).sum()),
        loss_clean=rounded(clean),
        loss_spliced=rounded(spliced),
        loss_zero_ablated=rounded(zeroed),
        loss_recovered=rounded(recovered),
    )
