"""Generation for steering: one batch, one steering vector per row, sampled step by step.

Generation is our own loop over transformer-lens' KV cache so that seed, temperature and top_p are exact. The
steering hook fires on every cached step too, so steering holds there (tested: greedy steered output with the
cache equals an independent full-forward greedy loop on stories260K). Measured on stories260K, one CPU thread,
100 greedy tokens x 2 rows: 0.67 s with the cache, 1.2 s without. Every row draws from its own generator, seeded
alike (or one seed per row when a call asks for several seeds), so rows of one seed differ only by their steering.
The loop checks a CancelToken before every step and reports progress after each (the tool turns a client's cancel
into the token's, and the progress into MCP notifications).

Each step holds the device on its own: it enters Engine.device_work(), attaches the steering hook, runs one forward,
and leaves (the hook goes with it). A call queued meanwhile (a one-forward next_token beside a 36 s steer_generate)
takes the device between two steps and sees the plain model; the next step queues again behind it. The KV cache
holds only this call's tensors, which no other call touches, so the numbers are those of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sae_mcp.engine.controls import kl
from sae_mcp.engine.metric import Metric
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.results.causal import Continuation

# Elements of one float32 chunk in PromptStats.from_logits (64 MiB): bounds the memory of the mean KL.
KL_CHUNK_ELEMENTS = 2**24

ProgressFn = Callable[[int, int], None]  # (steps done, max_new_tokens), after each generated step


# Below this temperature logits / temperature overflows float32 (inf - inf = NaN in the softmax), and sampling is
# greedy to every digit anyway.
GREEDY_BELOW = 1e-4


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> torch.Tensor:
    """logits [B, d_vocab] -> next tokens [B]. temperature 0 = greedy; top_p keeps the smallest nucleus."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)  # [B, V] each
        # keep a token when the mass before it is < top_p, and always the first (a top_p that underflows
        # float32, e.g. 5e-324, would otherwise keep nothing and the draw would fail on NaN)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p  # [B, V]
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # [B, V], in vocabulary order
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    # one generator per row, all seeded alike: a row's draws do not depend on the other rows
    return torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(probs.shape[0])])


def _as_hook_shape(vec: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """[B, d_in] -> broadcastable onto act [B, pos, d_in] or, at hook_z, [B, pos, n_heads, d_head]."""
    if act.ndim == 4:
        return vec.reshape(vec.shape[0], 1, act.shape[2], act.shape[3]).to(act.dtype)
    return vec[:, None, :].to(act.dtype)


@dataclass
class PromptStats:
    """What steering needs from the first forward's prompt logits [B, S, V], computed at once so the full tensor is
    not kept during generation. Row 0 is the reference (the unsteered row)."""

    last_logits: torch.Tensor  # [B, V]: the next-token logits after the prompt
    kl_last: list[float]  # KL(row 0 || row b) at the last position
    kl_mean: list[float]  # KL(row 0 || row b) averaged over the prompt's positions
    p_answer: list[float] | None  # P(answer) at the last position, when a metric is given
    metric: list[float] | None  # the metric at the last position (engine/metric.py), when given

    @classmethod
    def from_logits(cls, logits: torch.Tensor, metric: Metric | None) -> PromptStats:
        """logits [B, S, V] -> PromptStats, one row and a chunk of positions at a time (at most KL_CHUNK_ELEMENTS
        floats per temporary), never a full-size float copy."""
        S = logits.shape[1]
        kl_mean = [v / S for v in _summed_kl_from_row_0(logits)]  # [B]
        last = logits[:, -1].clone()  # [B, V]
        kl_last = kl(last[:1], last).tolist()  # [B]
        if metric is None:
            return cls(last_logits=last, kl_last=kl_last, kl_mean=kl_mean, p_answer=None, metric=None)
        p_answer = last.float().softmax(-1)[:, metric.answer].tolist()
        return cls(last_logits=last, kl_last=kl_last, kl_mean=kl_mean, p_answer=p_answer,
                   metric=metric.of(last).tolist())


def _summed_kl_from_row_0(logits: torch.Tensor) -> list[float]:
    """logits [B, S, V] -> per row b, sum over positions of KL(row 0 || row b), in chunks of positions."""
    B, S, V = logits.shape
    chunk = max(1, KL_CHUNK_ELEMENTS // V)
    kl_sum = [0.0] * B
    for start in range(0, S, chunk):
        ref = logits[0, start : start + chunk].float().log_softmax(-1)  # [c, V]
        p_ref = ref.exp()
        for b in range(1, B):
            lq = logits[b, start : start + chunk].float().log_softmax(-1)  # [c, V]
            kl_sum[b] += float((p_ref * (ref - lq)).sum(-1).clamp_min(0.0).sum())
        del ref, p_ref
    return kl_sum


def _generators(seeds: Sequence[int], B: int, device: torch.device) -> list[torch.Generator]:
    """One generator per row, row b seeded with seeds[b]."""
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} rows")
    return [torch.Generator(device=device).manual_seed(x) for x in seeds]


@dataclass(frozen=True)
class Decoding:
    """How every row draws its next token: the same settings for each row."""

    max_new_tokens: int  # tokens generated per row (fewer when every row has reached EOS)
    temperature: float  # softmax temperature; below GREEDY_BELOW greedy
    top_p: float  # the nucleus' probability mass, in (0, 1]


@dataclass(frozen=True)
class RowBatch:
    """One batch to generate: the prompt, a steering vector and a seed per row, what to score on the prompt."""

    tokens: torch.Tensor  # [1, S]: the prompt every row continues
    hook_name: str  # the hook each row's vector is added at, at every position
    vectors: torch.Tensor  # [B, d_in]: one steering vector per row (a zero row is the unsteered model)
    seeds: tuple[int, ...]  # [B]: each row's generator seed (rows of one seed draw alike)
    decoding: Decoding
    metric: Metric | None = None  # scored at the prompt's last position, when given
    stats_rows: int | None = None  # PromptStats covers the first stats_rows rows; None = all


def generate_rows(
    engine: Engine,
    batch: RowBatch,
    use_cache: bool = True,
    cancel: CancelToken | None = None,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, PromptStats, list[bool]]:
    """Generate one continuation per row of `batch.vectors` [B, d_in] (added at `batch.hook_name` at every
    position; a zero row is the unsteered model) from the prompt `batch.tokens` [1, S], each step in its own
    engine.device_work() (the first admitted under the queue's limits, the others continuations). `cancel` is checked
    before every step (a cancelled token raises Cancelled there; the hooks go with the context managers);
    `progress(step, max_new_tokens)` is called after every step (it may cancel the token, e.g. when the client is
    gone). Row b draws from a generator seeded with `batch.seeds[b]`: a row's draws depend only on its own seed, so
    its text is the one a batch of that seed alone gives.

    Returns (new tokens [B, T] (after EOS: EOS), PromptStats of the first forward against row 0 (KL at the last
    position and over the prompt, P(answer) and the metric, the last position's logits: the [B, S, d_vocab] logits
    themselves are dropped at once) over the first `batch.stats_rows` rows (default all: rows that repeat earlier
    ones under another seed have the same prompt logits), stopped_at_eos per row). Call outside device_work: it takes
    the device itself, step by step.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = engine.model
    tokens, vectors, metric, decoding = batch.tokens, batch.vectors, batch.metric, batch.decoding
    B = vectors.shape[0]
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    device = tokens.device
    gens = _generators(batch.seeds, B, device)
    n_stats = B if batch.stats_rows is None else batch.stats_rows

    def steer(act: torch.Tensor, hook) -> torch.Tensor:  # act [B, pos, d_in] (pos = 1 on cached steps)
        return act + _as_hook_shape(vectors, act)

    seq = tokens.expand(B, -1)  # [B, S]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, B) if use_cache else None
    new: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    stats: PromptStats | None = None
    step_input = seq

    def forward(x: torch.Tensor, kv=None) -> torch.Tensor:
        """One step's forward [B, x_len, V], holding the device and the steering hook only while it runs."""
        with engine.device_work(), torch.inference_mode(), model.hooks(fwd_hooks=[(batch.hook_name, steer)]):
            # An explicit all-ones mask: otherwise transformer-lens masks tokens equal to pad (= EOS = BOS for GPT-2)
            return model(x, return_type="logits", past_kv_cache=kv, attention_mask=torch.ones_like(x))

    for step in range(decoding.max_new_tokens):
        if cancel is not None:
            cancel.check()
        logits = forward(step_input, cache) if use_cache else forward(seq)
        with torch.inference_mode():
            if stats is None:
                stats = PromptStats.from_logits(logits[:n_stats], metric)  # [n_stats, S, V], then dropped
            last = logits[:, -1].clone()  # [B, V]: a copy, so the [B, S, V] storage goes with `del`
            del logits
            nxt = _sample(last, decoding.temperature, decoding.top_p, gens)  # [B]
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done = done | (nxt == eos)
        new.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)  # [B, S + step + 1]
        step_input = nxt[:, None]  # [B, 1]
        if progress is not None:
            progress(step + 1, decoding.max_new_tokens)
        if eos is not None and bool(done.all()):
            break
    if stats is None:  # max_new_tokens == 0: still score the prompt
        with torch.inference_mode():
            stats = PromptStats.from_logits(forward(seq)[:n_stats], metric)  # [n_stats, S, V]
    out = torch.stack(new, dim=1) if new else torch.zeros((B, 0), dtype=torch.long, device=device)  # [B, T]
    return out, stats, done.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Reading the generated rows


def generated_ids(row: torch.Tensor, eos: int | None) -> list[int]:
    """One row of new tokens [T] -> its ids before the first EOS."""
    ids = row.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return ids


def continuation(engine: Engine, row: torch.Tensor, eos: int | None, stopped: bool) -> Continuation:
    """One row of new tokens [T] -> its text up to EOS, as served."""
    ids = generated_ids(row, eos)
    text = engine.decode(ids) if ids else ""
    return Continuation(text=text, n_tokens=len(ids), stopped_at_eos=stopped)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where a and b differ (a shorter run differs where it ends); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
