"""Next-token tables (the tutorial's test_prompt) and the decoder logit lens (W_dec[f] @ W_U)."""

from __future__ import annotations

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import AnswerScore, NextToken, TokenLogit, TokenProb, VocabProjection, collect_warnings, rounded

ANCHOR = "\n"


def answer_token_ids(engine: Engine, answer: str) -> list[int]:
    """How `answer` tokenizes as a continuation of a prompt (no BOS); empty -> a clear error.

    Tokenizing the answer alone is wrong on SentencePiece tokenizers with a dummy prefix (Llama 2, Mistral,
    stories260K): "." becomes ['\u2581', '.'] and "Lily" the same id as " Lily". So we tokenize ANCHOR + answer
    and drop the anchor's ids, which is how the answer's tokens look after a prompt. When the tokenizer merges
    across the boundary (the anchor's ids are not a prefix), we fall back to the answer alone.
    """
    if answer is None or answer == "":
        raise InvalidInput("the answer is empty; pass the expected next token, e.g. ' Paris' (mind the leading space)")
    tok = engine.tokenizer
    anchor = tok(ANCHOR, add_special_tokens=False)["input_ids"]
    both = tok(ANCHOR + answer, add_special_tokens=False)["input_ids"]
    if both[: len(anchor)] == anchor:
        ids = both[len(anchor) :]
    else:
        ids = tok(answer, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids or [])
    ids = [i for i in ids if i not in special or i == tok.unk_token_id]
    if not ids:
        raise InvalidInput(f"the answer {answer!r} tokenizes to nothing; pass visible text")
    return ids


# A variant of the answer "much more likely" than the answer given: this many times its probability, and likely
# enough to matter (a variant at p=1e-5 beating an answer at p=1e-7 is noise either way).
VARIANT_RATIO = 10.0
VARIANT_MIN_PROBABILITY = 0.01


def space_variant(answer: str) -> str | None:
    """' Lily' <-> 'Lily': the answer with its leading space added or removed (None for an all-space answer)."""
    if answer.startswith(" "):
        return answer.lstrip(" ") or None
    return " " + answer


def answer_variant_warning(engine: Engine, last_logits: torch.Tensor, answer: str, answer_ids: list[int]
                           ) -> str | None:
    """A warning when the answer's space variant (' Lily' for 'Lily', or the reverse) is much more likely as the
    next token than the answer given, naming it; None otherwise. last_logits [d_vocab] after the prompt.

    Answers are scored as the next token, and most tokenizers fold the leading space into the word: 'Lily' after
    'named' is a different, rare token, so its tiny probability would read as 'the model does not predict Lily'."""
    variant = space_variant(answer)
    if variant is None:
        return None
    try:
        v_ids = answer_token_ids(engine, variant)
    except InvalidInput:
        return None
    if v_ids[0] == answer_ids[0]:  # a tokenizer that treats both alike (word-level)
        return None
    probs = last_logits.float().softmax(-1)  # [d_vocab]
    p_ans, p_var = float(probs[answer_ids[0]]), float(probs[v_ids[0]])
    if p_var < VARIANT_MIN_PROBABILITY or p_var < VARIANT_RATIO * p_ans:
        return None
    rank = int((last_logits > last_logits[v_ids[0]]).sum())
    return (f"{variant!r} is far more likely here (p={p_var:.3g}, rank {rank}) than {answer!r} (p={p_ans:.3g}): "
            f"answers are scored as the next token, whose leading space is part of it; pass answer={variant!r} "
            "if that is the word you mean")


def next_token_table(
    engine: Engine, last_logits: torch.Tensor, top_k: int, answer_ids: list[int] | None
) -> tuple[list[TokenProb], AnswerScore | None]:
    """last_logits [d_vocab] (one position) -> the top_k table and the answer's rank/probability/logit."""
    logits = last_logits.float()
    probs = logits.softmax(-1)  # [d_vocab]
    k = min(top_k, logits.shape[-1])
    top_p, top_i = probs.topk(k)
    top_l = logits[top_i]
    top = [
        TokenProb(token=engine.str_tokens(torch.tensor([i]))[0], token_id=int(i), probability=rounded(p, 6),
                  logit=rounded(logit))
        for p, i, logit in zip(top_p.tolist(), top_i.tolist(), top_l.tolist())
    ]
    answer = None
    if answer_ids:
        a = answer_ids[0]
        # rank = how many tokens have a strictly larger logit (ties share the better rank)
        rank = int((logits > logits[a]).sum().item())
        answer = AnswerScore(
            token=engine.str_tokens(torch.tensor([a]))[0],
            token_id=a,
            rank=rank,
            probability=rounded(probs[a].item(), 6),
            logit=rounded(logits[a].item()),
            answer_tokens=engine.str_tokens(torch.tensor(answer_ids)),
            multi_token=len(answer_ids) > 1,
        )
    return top, answer


def next_token(engine: Engine, prompt: str, answer: str | None = None, top_k: int = 10) -> NextToken:
    """The plain model's next-token distribution after `prompt` (BOS prepended as the model expects)."""
    answer_ids = answer_token_ids(engine, answer) if answer is not None else None
    prepend = bool(getattr(engine.model.cfg, "default_prepend_bos", True))
    with engine.device_work():
        tokens = engine.to_tokens(prompt, prepend_bos=prepend)  # [1, seq]
        if answer_ids and len(answer_ids) > 1:
            # Teacher forcing: one forward over prompt + answer scores every answer token at once.
            answer_t = torch.tensor([answer_ids], device=tokens.device)
            full = torch.cat([tokens, answer_t[:, :-1]], dim=1)  # [1, seq + n_answer - 1]
            if full.shape[1] > engine.model.cfg.n_ctx:
                raise InvalidInput("the prompt plus the answer is longer than the model's context; shorten the prompt")
        else:
            full = tokens
        with torch.inference_mode():
            all_logits = engine.model(full, return_type="logits", attention_mask=torch.ones_like(full))[0]
        seq = tokens.shape[1]
        top, ans = next_token_table(engine, all_logits[seq - 1], top_k, answer_ids)  # [d_vocab] after the prompt
        if ans is not None and answer_ids is not None and len(answer_ids) > 1:
            logp = all_logits[seq - 1 :].float().log_softmax(-1)  # [n_answer, d_vocab]
            ids = torch.tensor(answer_ids, device=logp.device)[:, None]  # [n_answer, 1]
            ans.sequence_log_probability = rounded(logp.gather(1, ids).sum().item())
        variant = (answer_variant_warning(engine, all_logits[seq - 1], answer, answer_ids)
                   if answer_ids and answer is not None else None)
    return NextToken(tokens=engine.str_tokens(tokens), top=top, answer=ans, warnings=collect_warnings(variant))


def decoder_direction_in_resid(engine: Engine, sae: LoadedSAE, features: torch.Tensor | None = None) -> torch.Tensor:
    """W_dec rows as residual-stream directions [n, d_model]. hook_z SAEs go through W_O of their layer."""
    W_dec = sae.sae.W_dec if features is None else sae.sae.W_dec[features]  # [n, d_in]
    d_model = engine.model.cfg.d_model
    if sae.hook_name.endswith("hook_z"):
        W_O = engine.model.W_O[sae.layer]  # [n_heads, d_head, d_model]
        per_head = W_dec.reshape(W_dec.shape[0], W_O.shape[0], W_O.shape[1]).to(W_O.dtype)  # [n, n_heads, d_head]
        return torch.einsum("nhd,hdm->nm", per_head, W_O)
    if sae.d_in != d_model:
        raise InvalidInput(
            f"SAE {sae.key} reads {sae.hook_name} (width {sae.d_in}), not the residual stream (d_model {d_model}); "
            "its decoder directions cannot be projected onto the vocabulary directly"
        )
    return W_dec


def project_to_vocab(engine: Engine, feature: int, sae: str | None = None, top_k: int = 10,
                     exclude: frozenset[int] = frozenset()) -> VocabProjection:
    """The decoder direction through the unembedding: W_dec[f] @ W_U, top and bottom tokens, leaving out the
    token ids in `exclude` (e.g. special and byte-fallback tokens).

    Without the device lock, on purpose: the lock serialises forward passes, because hooks and spliced SAEs are
    attached to the one shared model and a concurrent forward would run through them. This reads two weight
    matrices (never mutated: requires_grad is off and nothing writes them) and multiplies one row by W_U: no
    forward, no module call, no hook, and inference mode and autocast are per thread. So it can run while
    another call generates or scans, and a logit lens answers at once instead of queueing behind that work."""
    s = engine.sae(sae)
    engine.check_feature(s, feature)
    with torch.inference_mode():
        direction = decoder_direction_in_resid(engine, s, torch.tensor([feature], device=s.sae.W_dec.device))[0]
        W_U = engine.model.W_U  # [d_model, d_vocab]
        logits = direction.to(W_U.dtype) @ W_U  # [d_vocab]
        keep = torch.ones_like(logits, dtype=torch.bool)  # [d_vocab]
        keep[list(exclude)] = False
        ids = keep.nonzero().flatten()  # [n_kept]: topk over the kept tokens only, ids mapped back
        kept = logits[ids]  # [n_kept]
        k = min(top_k, kept.shape[0])
        pos_v, pos_i = kept.topk(k)
        neg_v, neg_i = (-kept).topk(k)
        pos = list(zip(pos_v.float().tolist(), ids[pos_i].tolist()))
        neg = list(zip((-neg_v).float().tolist(), ids[neg_i].tolist()))

    def rows(pairs):
        return [TokenLogit(token=engine.str_tokens(torch.tensor([i]))[0], token_id=int(i), logit=rounded(v))
                for v, i in pairs]

    return VocabProjection(sae=s.key, feature=feature, top_positive=rows(pos), top_negative=rows(neg))
