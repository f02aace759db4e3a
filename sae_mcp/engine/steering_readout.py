"""What a steered continuation says: the concept readout, the degeneration guards, and their spread over seeds.

Concept readout. Steering adds the feature's direction at the hook, so the feature "fires" there by construction;
whether the concept made it into the *text* is another question. We read every generated continuation back through
the UNSTEERED model (prompt + generated ids, forward to the SAE's hook, encode) and average each target feature over
the generated positions: a mean over generated tokens. All rows go in one forward (chunked only past
READOUT_CHUNK_TOKENS tokens); the tokens after a row's EOS are filler that no earlier position attends to (causal
attention), so they change nothing we read.

Degeneration, two ways (on the generated ids before EOS, from MIN_TOKENS_JUDGED tokens on):
- loops: a strong dose often makes small models loop ("the the the", or one sentence again and again). Degenerate
  when at least MAX_REPEAT_SHARE of its 3-grams repeat an earlier 3-gram (a loop of period p over n tokens repeats
  1 - p / (n - 2) of them), or when one token is more than MAX_TOKEN_SHARE of the tokens. Natural TinyStories/GPT-2
  continuations of 30 tokens repeat well under 0.2 of their 3-grams.
- word salad that does not loop ("mom her herse her mom"): its mean per-token loss under the UNSTEERED model, over
  the mean entropy of the unsteered model's next-token distribution along the same seed's unsteered continuation
  (the loss a typical continuation has there; under greedy decoding the unsteered text's own loss is far below it,
  so it would make a poor reference): loss_ratio. Degenerate above MAX_LOSS_RATIO. Measured on stories260K with the
  bundled layer-3 SAE, the issue's Lily prompt, 30 tokens, 15 features, 3 seeds sampled and greedy: unsteered
  0.48-0.79; fluent steered texts at 2x a feature's max activation 0.45-2.2; word salad (5-290x, and 2x for some
  features) 3-14; a few half-fluent texts fall near 3 on either side.
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

# Logits per loss forward ([rows, positions, d_vocab]; 2^25 floats = 128 MiB in float32).
LOSS_CHUNK_ELEMENTS = 2**25

NGRAM = 3
MIN_TOKENS_JUDGED = 8  # fewer tokens: too short to call a loop (and the 3-gram share is too coarse)
MAX_REPEAT_SHARE = 0.5  # repeated 3-grams at or above this share: a loop
MAX_TOKEN_SHARE = 0.5  # one token more than this share of the tokens: a loop
MAX_LOSS_RATIO = 3.0  # per-token loss over the unsteered entropy above this: word salad (see the docstring)


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


def continuation_losses(engine: Engine, prompt: torch.Tensor, new: torch.Tensor, lengths: list[int]
                        ) -> tuple[list[float | None], list[float | None]]:
    """Per row of `new` [B, T] (its first lengths[b] ids before EOS), read by the plain (unsteered) model after
    prompt [1, S]: (mean per-token loss of its generated ids, mean entropy of the model's next-token distribution at
    those positions); None for a row that generated nothing. Rows in chunks under LOSS_CHUNK_ELEMENTS logits. Call
    inside device_work (no hook may be attached)."""
    B, T = new.shape
    S = prompt.shape[1]
    if T == 0:
        return [None] * B, [None] * B
    seqs = torch.cat([prompt.expand(B, -1), new.to(prompt.device)], dim=1)  # [B, S + T]
    per = max(1, LOSS_CHUNK_ELEMENTS // (seqs.shape[1] * engine.model.cfg.d_vocab))
    losses: list[float | None] = []
    entropies: list[float | None] = []
    with torch.inference_mode():
        for start in range(0, B, per):
            chunk = seqs[start : start + per]
            logits = engine.model(chunk, return_type="logits", attention_mask=torch.ones_like(chunk))  # [b, S+T, V]
            lp = logits[:, S - 1 : S + T - 1].float().log_softmax(-1)  # [b, T, V]: predicts each generated id
            del logits
            nll = -lp.gather(-1, chunk[:, S:, None]).squeeze(-1)  # [b, T]
            ent = -(lp.exp() * lp).sum(-1)  # [b, T]
            for j, n in enumerate(lengths[start : start + per]):
                losses.append(float(nll[j, :n].mean()) if n else None)
                entropies.append(float(ent[j, :n].mean()) if n else None)
    return losses, entropies


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


def loss_ratio(loss: float | None, reference_entropy: float | None) -> float | None:
    """A continuation's per-token loss over the unsteered model's entropy along the same seed's unsteered text."""
    if loss is None or not reference_entropy or reference_entropy <= 0:
        return None
    return loss / reference_entropy


def is_degenerate(ids: list[int], ratio: float | None = None) -> bool:
    """The module's rules: repeated 3-grams >= MAX_REPEAT_SHARE, or one token > MAX_TOKEN_SHARE of the tokens, or
    a loss ratio above MAX_LOSS_RATIO (from MIN_TOKENS_JUDGED tokens on)."""
    rep = repetition(ids)
    if rep is None:
        return False
    top_share = max(Counter(ids).values()) / len(ids)
    return rep >= MAX_REPEAT_SHARE or top_share > MAX_TOKEN_SHARE or (ratio is not None and ratio > MAX_LOSS_RATIO)


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
