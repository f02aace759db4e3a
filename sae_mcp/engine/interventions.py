"""Steering and ablation: causal tests of SAE features, with matched random-feature controls.

Hygiene: every hook lives inside a context manager (`model.hooks(fwd_hooks=...)`, `model.saes(saes=...,
use_error_term=...)`) entered inside `Engine.device_work()`, whose finally detaches anything left anyway.
SAE weights and `sae.use_error_term` are never touched: sae-lens 6 reads the error term at splice time, so it is
passed to `model.saes(...)` (library-facts.md).

Steering adds `coefficient * W_dec[f]` at the SAE's hook at every position, prompt and generated, through a
plain model hook (no SAE spliced). Generation is our own loop over transformer-lens' KV cache so that seed,
temperature and top_p are exact; the hook fires on every cached step too, so steering holds there (tested:
greedy steered output with the cache equals an independent full-forward greedy loop on stories260K). Measured
on stories260K, one CPU thread, 100 greedy tokens x 2 rows: 0.67 s with the cache, 1.2 s without. All runs (unsteered, each dose, each control) go as
rows of one batch, each row with its own generator seeded identically, so rows differ only by their steering.
The loop checks a CancelToken before every step and reports progress after each (the tool turns a client's
cancel into the token's, and the progress into MCP notifications).

Ablation zeroes features on `<hook>.hook_sae_acts_post`, the spliced SAE's own hook point. With the error term
sae-lens computes the error from a hook-free re-encode, so the model's output moves by exactly
-sum_f act_f * W_dec[f] at the ablated positions (tested against that plain computation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sae_mcp.engine.loading import LoadedSAE
from sae_mcp.engine.logits import answer_token_ids, next_token_table
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.errors import InvalidInput
from sae_mcp.results import r
from sae_mcp.results.causal import (
    AblatedFeature,
    AblationResult,
    Continuation,
    ControlRun,
    Controls,
    ControlStat,
    NextTokenTable,
    ReconstructionTable,
    SteerFeature,
    SteerResult,
    SteerRun,
)

# Ceilings on one call's work (the tool signatures repeat them so clients see them in the schema).
MAX_NEW_TOKENS = 256
MAX_STEER_FEATURES = 16
MAX_STRENGTHS = 12
MAX_CONTROLS = 16
MAX_STRENGTH = 1000.0  # |strength|: a multiple of max_activation, or the absolute coefficient
MAX_COEFFICIENT = 1e5  # |strength * max_activation| after calibration

MaxActivationFn = Callable[[LoadedSAE, int], tuple[float, str]]
ProgressFn = Callable[[int, int], None]  # (steps done, max_new_tokens), after each generated step

# Defaults shared by the engine and the tool: sampled as in the SAELens steering tutorial (temperature 1, top_p
# 0.9), which shows a feature's pull better than greedy decoding's repetition loops on small models; every row
# draws from its own generator seeded alike, so runs are reproducible by seed and rows differ only by steering.
# temperature=0 gives greedy decoding.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.9


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def resolve_positions(position: int | Sequence[int] | None, seq_len: int) -> list[int]:
    """None = all positions; an int or a list of ints, negative counting from the end -> sorted unique indices."""
    if position is None:
        return list(range(seq_len))
    items = [position] if isinstance(position, int) else list(position)
    if not items:
        raise InvalidInput("position is an empty list; omit it to ablate at all positions, or list some")
    out = set()
    for p in items:
        if not -seq_len <= int(p) < seq_len:
            raise InvalidInput(
                f"position {p} is out of range: the prompt has {seq_len} tokens (use 0..{seq_len - 1} or "
                f"-{seq_len}..-1)"
            )
        out.add(int(p) % seq_len)
    return sorted(out)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dim, from logits [..., d_vocab] -> [...] (float32)."""
    lp = p_logits.float().log_softmax(-1)
    lq = q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


# Elements of one float32 chunk in _prompt_stats (64 MiB): bounds the memory of the mean KL over the prompt.
KL_CHUNK_ELEMENTS = 2**24
FEW_CONTROLS = 5  # fewer control runs than this: exceeding all of them is weak evidence


@dataclass
class PromptStats:
    """What steering needs from the first forward's prompt logits [B, S, V], computed at once so the full tensor is
    not kept during generation. Row 0 is the reference (the unsteered row)."""

    last_logits: torch.Tensor  # [B, V]: the next-token logits after the prompt
    kl_last: list[float]  # KL(row 0 || row b) at the last position
    kl_mean: list[float]  # KL(row 0 || row b) averaged over the prompt's positions
    p_answer: list[float] | None  # P(answer_id) at the last position, when an answer id is given


def _prompt_stats(logits: torch.Tensor, answer_id: int | None) -> PromptStats:
    """logits [B, S, V] -> PromptStats, one row and a chunk of positions at a time (at most KL_CHUNK_ELEMENTS
    floats per temporary), never a full-size float copy."""
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
    last = logits[:, -1].clone()  # [B, V]
    kl_last = _kl(last[:1], last).tolist()  # [B]
    p_ans = last.float().softmax(-1)[:, answer_id].tolist() if answer_id is not None else None
    return PromptStats(last_logits=last, kl_last=kl_last, kl_mean=[v / S for v in kl_sum], p_answer=p_ans)


def _matched_controls(
    score: torch.Tensor, targets: list[int], n: int, seed: int, eligible: torch.Tensor
) -> tuple[list[list[int]], str | None]:
    """n control sets, one random feature per target, each drawn from the features nearest that target in
    `score` [d_sae] (activation or decoder norm). `eligible` [d_sae] bool excludes the targets and others."""
    score, eligible = score.float().cpu(), eligible.cpu().clone()
    eligible[targets] = False
    cand = eligible.nonzero().flatten()  # [n_eligible]
    pool_size = max(4 * n, 20)
    if cand.numel() < n * len(targets):
        return [], f"only {cand.numel()} eligible features; controls need {n * len(targets)}"
    g = torch.Generator().manual_seed(seed)
    pools = []
    for f in targets:
        # nearest in score: relative distance, so a large max and a small one are matched alike
        dist = (score[cand] - score[f]).abs() / max(abs(float(score[f])), 1e-6)
        pool = cand[dist.argsort()[:pool_size]]
        pools.append(pool[torch.randperm(pool.numel(), generator=g)].tolist())
    sets: list[list[int]] = []
    used: set[int] = set()
    for i in range(n):
        chosen = []
        for pool in pools:
            pick = next((c for c in pool if c not in used), None)
            if pick is None:
                break
            used.add(pick)
            chosen.append(pick)
        if len(chosen) < len(targets):
            break
        sets.append(chosen)
    note = None if len(sets) == n else f"only {len(sets)} control sets could be drawn without reusing a feature"
    return sets, note


def _control_stats(target: dict[str, float], runs: list[ControlRun]) -> list[ControlStat]:
    stats = []
    for metric, t in target.items():
        vals = torch.tensor([run.effects[metric] for run in runs], dtype=torch.float64)
        if vals.numel() == 0:
            continue
        mean = float(vals.mean())
        std = float(vals.std(unbiased=True)) if vals.numel() > 1 else 0.0
        stats.append(
            ControlStat(
                metric=metric,
                target=r(t, 6),
                control_mean=r(mean, 6),
                control_std=r(std, 6),
                control_min=r(float(vals.min()), 6),
                control_max=r(float(vals.max()), 6),
                z_score=r((t - mean) / std, 3) if std > 0 else None,
                exceeds_all_controls=bool(abs(t) > float(vals.abs().max())),
            )
        )
    return stats


def _as_hook_shape(vec: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """[B, d_in] -> broadcastable onto act [B, pos, d_in] or, at hook_z, [B, pos, n_heads, d_head]."""
    if act.ndim == 4:
        return vec.reshape(vec.shape[0], 1, act.shape[2], act.shape[3]).to(act.dtype)
    return vec[:, None, :].to(act.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Generation: our own sampling loop over the KV cache


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> torch.Tensor:
    """logits [B, d_vocab] -> next tokens [B]. temperature 0 = greedy; top_p keeps the smallest nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # [B, V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep a token when the mass before it is < top_p (the first token is always kept)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    # one generator per row, all seeded alike: a row's draws do not depend on the other rows
    return torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(probs.shape[0])])


def generate_rows(
    engine: Engine,
    tokens: torch.Tensor,
    hook_name: str,
    vectors: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    use_cache: bool = True,
    cancel: CancelToken | None = None,
    progress: ProgressFn | None = None,
    answer_id: int | None = None,
) -> tuple[torch.Tensor, PromptStats, list[bool]]:
    """Generate one continuation per row of `vectors` [B, d_in] (added at `hook_name` at every position; a zero
    row is the unsteered model) from prompt `tokens` [1, S]. `cancel` is checked before every step (a cancelled
    token raises Cancelled there; the hooks go with the context managers); `progress(step, max_new_tokens)` is
    called after every step (it may cancel the token, e.g. when the client is gone).

    Returns (new tokens [B, T] (after EOS: EOS), PromptStats of the first forward against row 0 (KL at the last
    position and over the prompt, P(answer_id), the last position's logits: the [B, S, d_vocab] logits themselves
    are dropped at once), stopped_at_eos per row). Call inside device_work().
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = engine.model
    B = vectors.shape[0]
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    device = tokens.device
    gens = [torch.Generator(device=device).manual_seed(seed) for _ in range(B)]

    def steer(act: torch.Tensor, hook) -> torch.Tensor:  # act [B, pos, d_in] (pos = 1 on cached steps)
        return act + _as_hook_shape(vectors, act)

    seq = tokens.expand(B, -1)  # [B, S]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, B) if use_cache else None
    new: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stats: PromptStats | None = None
    step_input = seq
    with torch.inference_mode(), model.hooks(fwd_hooks=[(hook_name, steer)]):
        for step in range(max_new_tokens):
            if cancel is not None:
                cancel.check()
            x = step_input if use_cache else seq
            # An explicit all-ones mask: otherwise transformer-lens masks tokens equal to pad (= EOS = BOS for GPT-2)
            logits = model(x, return_type="logits", past_kv_cache=cache, attention_mask=torch.ones_like(x))
            if stats is None:
                stats = _prompt_stats(logits, answer_id)  # from the [B, S, V] prompt logits, then drop them
            last = logits[:, -1].clone()  # [B, V]: a copy, so the [B, S, V] storage goes with `del`
            del logits
            nxt = _sample(last, temperature, top_p, gens)  # [B]
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done = done | (nxt == eos)
            new.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if progress is not None:
                progress(step + 1, max_new_tokens)
            if eos is not None and bool(done.all()):
                break
        if stats is None:  # max_new_tokens == 0: still score the prompt
            stats = _prompt_stats(model(seq, return_type="logits", attention_mask=torch.ones_like(seq)), answer_id)
    out = torch.stack(new, dim=1) if new else torch.zeros((B, 0), dtype=torch.long, device=device)
    return out, stats, done.tolist()


def _generated_ids(row: torch.Tensor, eos: int | None) -> list[int]:
    ids = row.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return ids


def _continuation(engine: Engine, row: torch.Tensor, eos: int | None, stopped: bool) -> Continuation:
    ids = _generated_ids(row, eos)
    text = engine.model.tokenizer.decode(ids) if ids else ""
    return Continuation(text=text, n_tokens=len(ids), stopped_at_eos=stopped)


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where a and b differ (a shorter run differs where it ends); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _few_controls_caution(n_runs: int) -> str | None:
    if n_runs >= FEW_CONTROLS:
        return None
    return (
        f"only {n_runs} control run(s): exceeding all of so few controls is weak evidence; use n_controls >= "
        f"{FEW_CONTROLS} (at most {MAX_CONTROLS})"
    )


# ---------------------------------------------------------------------------------------------------------------
# steer_generate


def steer_generate(
    engine: Engine,
    prompt: str,
    features: Sequence[tuple[int, float]],
    sae: str | None = None,
    max_new_tokens: int = 30,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    seed: int = 0,
    calibration: str = "max_activation",
    max_activation_fn: MaxActivationFn | None = None,
    strengths: Sequence[float] | None = None,
    answer: str | None = None,
    controls: bool = False,
    n_controls: int = 5,
    use_cache: bool = True,
    cancel: CancelToken | None = None,
    progress: ProgressFn | None = None,
) -> SteerResult:
    """Generate unsteered and steered continuations side by side. `features` = [(feature, strength)];
    coefficient = strength * max_activation(feature) ('max_activation') or strength ('absolute');
    `strengths` = doses: one run per value, every coefficient multiplied by it. All rows are generated as one
    batch: `cancel` stops it between steps (Cancelled), `progress(step, max_new_tokens)` follows it."""
    s = engine.sae(sae)
    feats = engine.check_features(s, [f for f, _ in features], MAX_STEER_FEATURES, required=True, unique=True)
    given = [float(st) for _, st in features]
    scales = [1.0] if strengths is None else [float(x) for x in strengths]
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InvalidInput(f"max_new_tokens={max_new_tokens}: use 0..{MAX_NEW_TOKENS}")
    if not 0 <= temperature <= 10 or not math.isfinite(temperature):
        raise InvalidInput(f"temperature={temperature}: use 0 (greedy) .. 10")
    if not 0 < top_p <= 1:
        raise InvalidInput(f"top_p={top_p}: use a value in (0, 1]")
    if not 1 <= len(scales) <= MAX_STRENGTHS:
        raise InvalidInput(f"{len(scales)} strengths given; pass 1..{MAX_STRENGTHS}")
    for x in given + scales:
        if not math.isfinite(x) or abs(x) > MAX_STRENGTH:
            raise InvalidInput(
                f"strength {x} is not allowed: strengths must be finite with |strength| <= {MAX_STRENGTH:g}"
            )
    if calibration not in ("max_activation", "absolute"):
        raise InvalidInput(f"calibration={calibration!r}: use 'max_activation' or 'absolute'")
    if controls and not 1 <= n_controls <= MAX_CONTROLS:
        raise InvalidInput(f"n_controls={n_controls}: use 1..{MAX_CONTROLS}")
    answer_ids = answer_token_ids(engine, answer) if answer is not None else None

    # Calibration first, outside device_work: the max may come from an on-demand scan that takes the lock itself.
    maxes: list[tuple[float, str] | None] = [None] * len(feats)
    if calibration == "max_activation":
        if max_activation_fn is None:
            raise InvalidInput(
                "calibration='max_activation' needs each feature's max activation, and none is available here; "
                "start the server with --corpus, or pass calibration='absolute'"
            )
        maxes = [max_activation_fn(s, f) for f in feats]
        for f, (m, _) in zip(feats, maxes):
            if not math.isfinite(m) or m <= 0:
                raise InvalidInput(
                    f"feature {f} never fired in the corpus (max activation {m}); max_activation calibration "
                    "cannot scale it: pass calibration='absolute' with a coefficient"
                )
    base = [st * (m[0] if m else 1.0) for st, m in zip(given, maxes)]  # coefficient per feature at scale 1
    for f, c in zip(feats, base):
        for x in scales:
            if abs(c * x) > MAX_COEFFICIENT:
                raise InvalidInput(
                    f"feature {f}: coefficient {c * x:.4g} exceeds {MAX_COEFFICIENT:g}; lower the strength"
                )

    with engine.device_work():
        tokens = engine.to_tokens(prompt, prepend_bos=s.prepend_bos)  # [1, S]
        if tokens.shape[1] + max_new_tokens > engine.model.cfg.n_ctx:
            raise InvalidInput(
                f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {engine.model.cfg.n_ctx}; shorten one"
            )
        W_dec = s.sae.W_dec  # [d_sae, d_in]
        norms = W_dec.norm(dim=-1)  # [d_sae]
        f_idx = torch.tensor(feats, device=W_dec.device)
        coef = torch.tensor(base, device=W_dec.device, dtype=W_dec.dtype)  # [n_feats]
        target_vec = coef @ W_dec[f_idx]  # [d_in]: the scale-1 steering vector

        # Rows: 0 = unsteered, then one per dose, then one per control set (at the strongest dose).
        rows = [torch.zeros_like(target_vec)] + [x * target_vec for x in scales]
        control_sets: list[list[int]] = []
        note = None
        ctrl_scale = max(scales, key=abs)
        if controls:
            eligible = torch.ones(s.d_sae, dtype=torch.bool)
            control_sets, note = _matched_controls(norms, feats, n_controls, seed, eligible)
            for cs in control_sets:
                rows.append(ctrl_scale * (coef @ W_dec[torch.tensor(cs, device=W_dec.device)]))
        vectors = torch.stack(rows)  # [B, d_in]

        # Effects of each row against row 0, on the prompt (identical input, so the comparison is exact), taken
        # from the first forward at once: the [B, S, V] prompt logits are not kept during generation
        new, stats, stopped = generate_rows(
            engine, tokens, s.hook_name, vectors, max_new_tokens, temperature, top_p, seed, use_cache, cancel,
            progress, answer_id=answer_ids[0] if answer_ids else None,
        )
        new = new.cpu()
        kl_last, kl_mean, p_ans = stats.kl_last, stats.kl_mean, stats.p_answer
        str_prompt = engine.str_tokens(tokens)
        answer_strs = engine.str_tokens(torch.tensor(answer_ids)) if answer_ids else None

    eos = engine.model.tokenizer.eos_token_id
    conts = [_continuation(engine, new[b], eos, stopped[b]) for b in range(new.shape[0])]
    gen_ids = [_generated_ids(new[b], eos) for b in range(new.shape[0])]

    def effects(b: int) -> dict[str, float]:
        e = {"kl_next_token": kl_last[b], "mean_kl_prompt": kl_mean[b]}
        if p_ans is not None:
            e["answer_probability_change"] = p_ans[b] - p_ans[0]
        return e

    runs = [
        SteerRun(
            scale=x,
            coefficients=[r(c * x, 6) for c in base],
            continuation=conts[1 + i],
            changed=conts[1 + i].text != conts[0].text,
            first_divergent_token=_first_divergence(gen_ids[0], gen_ids[1 + i]),
            kl_next_token=r(kl_last[1 + i], 6),
            mean_kl_prompt=r(kl_mean[1 + i], 6),
            answer_probability=r(p_ans[1 + i], 6) if p_ans else None,
            answer_probability_change=r(p_ans[1 + i] - p_ans[0], 6) if p_ans else None,
        )
        for i, x in enumerate(scales)
    ]
    ctrl = None
    if controls:
        first = 1 + len(scales)
        ctrl_runs = [
            ControlRun(
                features=cs,
                effects={k: r(v, 6) for k, v in effects(first + i).items()},
                continuation=conts[first + i].text,
            )
            for i, cs in enumerate(control_sets)
        ]
        target_row = 1 + scales.index(ctrl_scale)
        ctrl = Controls(
            matched_on=f"decoder norm (nearest {max(4 * n_controls, 20)}, drawn by seed), same coefficients, "
            f"at scale {ctrl_scale:g}",
            seed=seed,
            runs=ctrl_runs,
            stats=_control_stats(effects(target_row), ctrl_runs),
            note=note,
            caution=_few_controls_caution(len(ctrl_runs)),
        )
    return SteerResult(
        sae=s.key,
        hook_name=s.hook_name,
        calibration=calibration,
        features=[
            SteerFeature(
                feature=f,
                strength=st,
                max_activation=r(m[0], 6) if m else None,
                max_activation_source=m[1] if m else None,
                decoder_norm=r(float(norms[f]), 6),
                coefficient=r(c, 6),
            )
            for f, st, m, c in zip(feats, given, maxes, base)
        ],
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        prompt_tokens=str_prompt,
        unsteered=conts[0],
        unsteered_answer_probability=r(p_ans[0], 6) if p_ans else None,
        answer_tokens=answer_strs,
        multi_token=len(answer_ids) > 1 if answer_ids else None,
        steered=runs,
        controls=ctrl,
    )


# ---------------------------------------------------------------------------------------------------------------
# ablate_and_test


def _ablation_hook(rows: list[list[int]], positions: list[int], device) -> Callable:
    """A hook for <hook>.hook_sae_acts_post that zeroes, in batch row b, features rows[b] at `positions`."""
    pos = torch.tensor(positions, device=device)[:, None]  # [n_pos, 1]
    idx = [torch.tensor(fs, device=device)[None, :] if fs else None for fs in rows]  # [1, n_feats] per row

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:  # acts [B, S, d_sae]
        acts = acts.clone()
        for b, fs in enumerate(idx):
            if fs is not None:
                acts[b, pos, fs] = 0.0
        return acts

    return hook


def _spliced_logits(
    engine: Engine, sae: LoadedSAE, tokens: torch.Tensor, rows: list[list[int]], positions: list[int], error_term: bool
) -> torch.Tensor:
    """Last-position logits [B, d_vocab] with the SAE spliced in and rows[b]'s features zeroed in row b."""
    model = engine.model
    hook = _ablation_hook(rows, positions, tokens.device)
    with model.saes(saes=[sae.sae], use_error_term=error_term):
        with model.hooks(fwd_hooks=[(f"{sae.hook_name}.hook_sae_acts_post", hook)]):
            return model(tokens.expand(len(rows), -1), return_type="logits")[:, -1]


def ablate_and_test(
    engine: Engine,
    prompt: str,
    answer: str,
    features: Sequence[int],
    sae: str | None = None,
    position: int | Sequence[int] | None = None,
    top_k: int = 10,
    controls: bool = False,
    n_controls: int = 5,
    seed: int = 0,
) -> AblationResult:
    """Zero `features` at `position` (None = all) with the SAE spliced in; next-token tables for the plain model,
    the reconstruction alone, the ablation with the error term and the ablation without it."""
    s = engine.sae(sae)
    feats = engine.check_features(s, features, engine.limits.max_features_per_call, required=True, unique=True)
    answer_ids = answer_token_ids(engine, answer)
    if controls and not 1 <= n_controls <= MAX_CONTROLS:
        raise InvalidInput(f"n_controls={n_controls}: use 1..{MAX_CONTROLS}")
    with engine.device_work():
        tokens = engine.to_tokens(prompt, prepend_bos=s.prepend_bos)  # [1, S]
        positions = resolve_positions(position, tokens.shape[1])
        with torch.inference_mode():
            base = engine.model(tokens, return_type="logits")[0, -1]  # [V]
            acts = engine.encode(s, engine.forward_to_hook(tokens, s))[0].float()  # [S, d_sae]
            act_sum = acts[positions].sum(0)  # [d_sae]: how much each feature fires where we ablate
            act_max = acts[positions].max(0).values  # [d_sae]
            fired = (acts[positions] != 0).any(0)  # [d_sae]
            control_sets, ctrl_note = [], None
            if controls:
                control_sets, ctrl_note = _matched_controls(act_sum, feats, n_controls, seed, act_sum > 0)
            # without the error term: row 0 = nothing ablated (the SAE's own distortion), row 1 = ablated
            no_err = _spliced_logits(engine, s, tokens, [[], feats], positions, error_term=False)
            # with the error term: row 0 = the targets, then one row per control set
            with_err = _spliced_logits(engine, s, tokens, [feats, *control_sets], positions, error_term=True)
        str_tokens = engine.str_tokens(tokens)

        def table(logits: torch.Tensor) -> NextTokenTable:
            top, ans = next_token_table(engine, logits, top_k, answer_ids)
            return NextTokenTable(
                top=top,
                answer=ans,
                answer_probability_change=r(ans.probability - base_ans.probability, 6),
                answer_logit_change=r(ans.logit - base_ans.logit),
                kl_from_baseline=r(float(_kl(base, logits)), 6),
            )

        def changes(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
            """(P(answer) change, answer logit change, KL(ref || this)), unrounded."""
            a = answer_ids[0]
            lp_r, lp = ref.float().log_softmax(-1), logits.float().log_softmax(-1)
            return float(lp[a].exp() - lp_r[a].exp()), float(logits[a] - ref[a]), float(_kl(ref, logits))

        def effects(logits: torch.Tensor) -> dict[str, float]:
            dp, dl, kl = changes(logits, base)
            return {"answer_logit_change": dl, "answer_probability_change": dp, "kl_next_token": kl}

        base_top, base_ans = next_token_table(engine, base, top_k, answer_ids)
        no_err_table = table(no_err[1])
        dp_rec, dl_rec, kl_rec = changes(no_err[1], no_err[0])  # the ablation alone, SAE spliced without error
        dp_abl, dl_abl, kl_abl = changes(with_err[0], base)  # the ablation's causal effect
        dp_sae, _, kl_sae = changes(no_err[0], base)  # the SAE's own distortion
        silent = [f for f in feats if not bool(fired[f])]
        summary = (
            f"causal effect of the ablation (ablated vs baseline, with the error term): P(answer) {dp_abl:+.4g}, "
            f"logit {dl_abl:+.4g}, KL {kl_abl:.4g}; without the error term (vs reconstruction_only): P(answer) "
            f"{dp_rec:+.4g}, logit {dl_rec:+.4g}, KL {kl_rec:.4g}; the SAE's own distortion (reconstruction_only "
            f"vs baseline): KL {kl_sae:.4g}, P(answer) {dp_sae:+.4g}"
        )
        note = None
        if silent:
            none = len(silent) == len(feats)
            note = (
                f"feature(s) {silent} have zero activation at the ablated positions: ablating them changes nothing"
                + (" (every target is silent, so the ablated tables equal baseline and reconstruction_only by "
                   "construction)" if none else "")
                + "; pick positions where they fire (get_feature_acts) or other features"
            )
        result = AblationResult(
            sae=s.key,
            hook_name=s.hook_name,
            tokens=str_tokens,
            positions=positions,
            features=[
                AblatedFeature(
                    feature=f, fired=bool(fired[f]), activation_sum=r(float(act_sum[f])),
                    max_activation=r(float(act_max[f])),
                )
                for f in feats
            ],
            baseline=NextTokenTable(
                top=base_top, answer=base_ans, answer_probability_change=0.0, answer_logit_change=0.0,
                kl_from_baseline=0.0,
            ),
            reconstruction_only=table(no_err[0]),
            ablated=table(with_err[0]),
            ablated_without_error_term=ReconstructionTable(
                **no_err_table.model_dump(),
                answer_probability_change_vs_reconstruction=r(dp_rec, 6),
                answer_logit_change_vs_reconstruction=r(dl_rec),
                kl_from_reconstruction=r(kl_rec, 6),
            ),
            summary=summary,
            note=note,
        )
        if controls:
            runs = [
                ControlRun(features=cs, effects={k: r(v, 6) for k, v in effects(with_err[1 + i]).items()})
                for i, cs in enumerate(control_sets)
            ]
            if not runs and ctrl_note is None:
                ctrl_note = "no control could be drawn"
            if len(silent) == len(feats):
                ctrl_note = (ctrl_note + "; " if ctrl_note else "") + "the target features do not fire at these " \
                    "positions: ablating them changes nothing"
            result.controls = Controls(
                matched_on=f"summed activation at the ablated positions (nearest {max(4 * n_controls, 20)} "
                "firing features, drawn by seed); ablated with the error term",
                seed=seed,
                runs=runs,
                stats=_control_stats(effects(with_err[0]), runs),
                note=ctrl_note,
                caution=_few_controls_caution(len(runs)),
            )
    return result
