"""What a steered continuation says: the concept readout, the degeneration guard, and their spread over seeds.

Concept readout. Steering adds the feature's direction at the hook, so the feature "fires" there by construction;
whether the concept made it into the *text* is another question. We read every generated continuation back through
the UNSTEERED model (prompt + generated ids, forward to the SAE's hook, encode) and average each target feature over
the generated positions. All rows go in one forward (chunked only past READOUT_CHUNK_TOKENS tokens); the tokens after
a row's EOS are filler that no earlier position attends to (causal attention), so they change nothing we read.

Degeneration. A strong dose often makes small models loop ("the the the", or one sentence again and again); such
text carries no concept, and target and controls alike degenerate at the largest doses. Rule (on the generated ids
before EOS, from MIN_TOKENS_JUDGED tokens on): degenerate when at least MAX_REPEAT_SHARE of its 3-grams repeat an
earlier 3-gram (a loop of period p over n tokens repeats 1 - p / (n - 2) of them), or when one token is more than
MAX_TOKEN_SHARE of the tokens. Natural TinyStories/GPT-2 continuations of 30 tokens repeat well under 0.2 of their
3-grams; the thresholds are meant to flag loops, not style.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE

# Tokens per readout forward (rows x length): bounds the attention memory; typical calls fit in one forward.
READOUT_CHUNK_TOKENS = 2**15
# Floats per encoded chunk ([positions, d_sae]): bounds the dense feature matrix of a wide SAE (64 MiB in float32).
ENCODE_CHUNK_ELEMENTS = 2**24

NGRAM = 3
MIN_TOKENS_JUDGED = 8  # fewer tokens: too short to call a loop (and the 3-gram share is too coarse)
MAX_REPEAT_SHARE = 0.5  # repeated 3-grams at or above this share: a loop
MAX_TOKEN_SHARE = 0.5  # one token more than this share of the tokens: a loop


# ---------------------------------------------------------------------------------------------------------------
# Concept readout (device work)


def concept_readout(
    engine: Engine, sae: LoadedSAE, prompt: torch.Tensor, new: torch.Tensor, lengths: list[int], features: list[int]
) -> list[list[float] | None]:
    """Per row of `new` [B, T] (generated ids, `lengths[b]` of them before EOS): each target feature's mean SAE
    activation over the row's generated positions of prompt [1, S] + the row, read by the unsteered model; None for
    a row that generated nothing. Call inside device_work (no hook may be attached: this is the plain model)."""
    B, T = new.shape
    S = prompt.shape[1]
    if T == 0:
        return [None] * B
    seqs = torch.cat([prompt.expand(B, -1), new.to(prompt.device)], dim=1)  # [B, S + T]
    per_forward = max(1, READOUT_CHUNK_TOKENS // seqs.shape[1])
    out: list[list[float] | None] = []
    for start in range(0, B, per_forward):
        n = lengths[start : start + per_forward]
        acts = engine.forward_to_hook(seqs[start : start + per_forward], sae)[:, S:]  # [b, T, d_in], generated part
        valid = torch.arange(T, device=acts.device)[None, :] < torch.tensor(n, device=acts.device)[:, None]  # [b, T]
        vals = _encode_features(engine, sae, acts[valid], features)  # [sum(n), n_feat], row by row in order
        out += [v.mean(0).tolist() if len(v) else None for v in vals.split(n)]
    return out


def _encode_features(engine: Engine, sae: LoadedSAE, acts: torch.Tensor, features: list[int]) -> torch.Tensor:
    """acts [N, d_in] -> the target features' activations [N, n_feat] (float32), encoded in chunks of positions:
    every architecture (top-k, JumpReLU, ...) needs the full encode, but only n_feat columns are kept."""
    cols = torch.tensor(features, device=acts.device)  # [n_feat]
    step = max(1, ENCODE_CHUNK_ELEMENTS // sae.d_sae)
    parts = [engine.encode(sae, acts[i : i + step])[:, cols].float() for i in range(0, acts.shape[0], step)]
    return torch.cat(parts) if parts else torch.zeros((0, len(features)))  # [N, n_feat]


# ---------------------------------------------------------------------------------------------------------------
# Degeneration (pure, on token ids)


def repetition(ids: list[int]) -> float | None:
    """Share of the NGRAM-grams of `ids` that repeat an earlier one (0 = none); None below MIN_TOKENS_JUDGED."""
    if len(ids) < MIN_TOKENS_JUDGED:
        return None
    grams = [tuple(ids[i : i + NGRAM]) for i in range(len(ids) - NGRAM + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def is_degenerate(ids: list[int]) -> bool:
    """The module's rule: repeated 3-grams >= MAX_REPEAT_SHARE, or one token > MAX_TOKEN_SHARE of the tokens."""
    rep = repetition(ids)
    if rep is None:
        return False
    top_share = max(Counter(ids).values()) / len(ids)
    return rep >= MAX_REPEAT_SHARE or top_share > MAX_TOKEN_SHARE


# ---------------------------------------------------------------------------------------------------------------
# Spread over seeds (pure)


def mean_std(values: list[list[float] | None]) -> tuple[list[float] | None, list[float] | None]:
    """Per-seed vectors (None = a seed with no reading, left out) -> per component (mean, sample std with n - 1);
    mean None when no seed reads, std None below 2 seeds."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    t = torch.tensor(kept, dtype=torch.float64)  # [n_seeds_kept, n_feat]
    std = t.std(0, correction=1).tolist() if len(kept) > 1 else None
    return t.mean(0).tolist(), std


def mean_change(run: list[list[float] | None], base: list[list[float] | None]) -> float | None:
    """Mean over seeds and features of run - base (same seed); seeds where either generated nothing left out."""
    diffs = [r - b for rv, bv in zip(run, base) if rv is not None and bv is not None for r, b in zip(rv, bv)]
    return math.fsum(diffs) / len(diffs) if diffs else None
