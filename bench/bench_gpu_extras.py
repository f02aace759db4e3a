"""The GPU figures bench_index.py --gpu-extras adds, at gpt2-small shapes (24576 x 50257 logit weights):

    feature_stats and token_set_enrichment over every feature (goal on an H200: < 2 s each, warm)
    bf16-autocast scan vs fp32 scan of the same windows: do the top examples agree, and to what tolerance?

token_set_enrichment needs a 50257-token vocabulary with text: a synthetic word-level tokenizer stands in for
GPT-2's (which needs the hub), with some digit, capitalised and punctuation tokens so every built-in set exists.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.index import scan as scan_mod


def synthetic_vocab_tokenizer(n: int = 50257):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<s>"] + [(" " if i % 3 else "") + (str(i) if i % 7 == 0 else ("W" if i % 11 == 0 else "w") + str(i))
                       for i in range(1, n - 1)] + ["."]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # transformer-lens reloads a tokenizer by its name_or_path (to add BOS handling), which a tokenizer built in
    # memory lacks (KeyError 'name_or_path'): save it to a folder and load it from there.
    folder = tempfile.mkdtemp(prefix="synthetic-vocab-")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<s>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` calls after one warm-up call (synced)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bf16_vs_fp32(engine, sae, windows) -> None:
    """The same windows scanned under bf16 autocast and in fp32: top-1 agreement and the value tolerance."""
    states = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        real = scan_mod._autocast_dtype
        scan_mod._autocast_dtype = (lambda e: dtype) if dtype is None else real
        try:
            states[name] = scan_mod.scan(engine, sae, windows, context_size=128, bos=True, max_tokens=10**12)
        finally:
            scan_mod._autocast_dtype = real
    a, b = (states[n].top_vals.float().cpu().numpy() for n in ("bf16", "fp32"))  # [k, d_sae], rank-major
    pa, pb = (states[n].top_pos.cpu().numpy() for n in ("bf16", "fp32"))
    fired = np.nonzero(b[0] > 0)[0]
    scale = b[0, fired]  # each feature's fp32 max: the tolerance is relative to it
    rel = np.abs(a[:, fired] - b[:, fired]) / scale  # [k, n_fired] value gap at equal ranks
    top1 = pa[0, fired] == pb[0, fired]
    # Where the top-1 window differs: how far below the fp32 max is bf16's choice, in fp32? (a near-tie or not)
    gaps = []
    for j in np.nonzero(~top1)[0]:
        f = fired[j]
        hit = np.nonzero(pb[:, f] == pa[0, f])[0]
        gaps.append((b[0, f] - b[hit[0], f]) / b[0, f] if len(hit) else np.inf)
    gaps = np.array(gaps)
    print(f"bf16 vs fp32 on {len(windows)} windows, {len(fired)} firing features: top-1 window equal for "
          f"{top1.mean():.4f}; top-10 windows equal as sets for "
          f"{np.mean([set(pa[:10, f]) == set(pb[:10, f]) for f in fired]):.4f}")
    print(f"  values at equal ranks, |bf16 - fp32| / the feature's fp32 max: median {np.median(rel):.2e}, "
          f"p99 {np.quantile(rel, 0.99):.2e}, max {rel.max():.2e}")
    if len(gaps):
        print(f"  where top-1 differs, bf16's window is within x of the fp32 max (fp32 values): p50 "
              f"{np.median(gaps):.2e}, p99 {np.quantile(gaps, 0.99):.2e}, max {gaps.max():.2e} "
              f"(inf: not in fp32's top {b.shape[0]})")


def gpu_extras(engine, sae, windows, gpt2_engine) -> None:
    """gpt2_engine: bench_index's factory of the gpt2-shaped engine, passed in (this module imports nothing from
    bench_index, which imports this one)."""
    stats = LogitWeightStats(engine)
    print(f"feature_stats over {sae.d_sae} features: {timed(lambda: LogitWeightStats(engine).feature_stats()):.3f} s "
          "(cold moments each time)")
    w_engine, _ = gpt2_engine(str(engine.device), synthetic_vocab_tokenizer())
    w_stats = LogitWeightStats(w_engine)
    w_stats.builtin_excluded()  # the vocabulary's strings, once per server
    print(f"token_set_enrichment (every built-in set, {sae.d_sae} features, 50257 tokens): "
          f"{timed(lambda: w_stats.token_set_enrichment(top=10)):.3f} s")
    del stats
    bf16_vs_fp32(engine, sae, windows)
