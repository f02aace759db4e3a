"""Statistics of each feature's logit weights, W_dec[f] @ W_U, over the whole vocabulary.

The tutorial's section on them (sae_lens.analysis.feature_statistics, removed in sae-lens 6) computed, per
feature, the mean, std, skewness and kurtosis of the decoder direction projected onto the unembedding, and a
token-set enrichment of those weights. Both are written here, computed in chunks of features on the device so
that a [chunk, d_vocab] block is the largest thing ever held (the full [d_sae, d_vocab] matrix is 5 GB for
gpt2-small's 24576 x 50257), and only the small per-feature numbers leave the device.

Moments (as the tutorial's get_stats_df): with x = W_dec[f] @ W_U over the V vocabulary tokens,
    mean = sum(x) / V,  std = sqrt(sum((x - mean)^2) / V)          (population std)
    skewness = mean(z^3),  kurtosis = mean(z^4),  z = (x - mean) / std   (Pearson: 3 for a Gaussian, not excess)
The mean is ~0 by construction for a model loaded with transformer-lens' center_unembed (its default, and how
sae-mcp loads local models): each row of W_U then sums to 0 over the vocabulary, so x does too, whatever the
feature. It is reported (as 0.0, never -0.0) for completeness; std, skewness and kurtosis carry the information.

Token-set enrichment: for a set S of tokens and a feature, is x larger on S than on the rest of the vocabulary?
We use the Mann-Whitney U statistic of x[S] against x[not S] (ties counted 1/2), reported as
    score = 2 * AUC - 1,  AUC = U / (|S| * |not S|)        (the rank-biserial correlation, in [-1, 1])
and its normal-approximation z = (U - |S||not S|/2) / sqrt(|S||not S|(V + 1)/12). score > 0 means the feature's
decoder promotes the set's tokens (direction 'promotes'), < 0 that it suppresses them. Rank-based, so a few
huge logits cannot dominate it and features with different norms are comparable; z says how surprising the
score is for a set of that size. (The tutorial's GSEA-style running-sum score answers the same question.)
"""

from __future__ import annotations

import math
import re
import unicodedata
import weakref

import torch

from sae_mcp.engine.loading import LoadedSAE
from sae_mcp.engine.logits import decoder_direction_in_resid
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput
from sae_mcp.results import r
from sae_mcp.results.explain import EnrichedFeature, FeatureStat, FeatureStats, SetEnrichment, TokenSetEnrichment

CHUNK_BYTES = 256 * 2**20  # working memory per chunk of features (bytes), whatever the device
SORT_KEYS = ("skewness", "kurtosis", "mean", "std", "density", "feature")

# Regex-defined token sets, matched against each token as the tokenizer writes it (leading space kept), over the
# vocabulary less its byte-fallback and control tokens (builtin_excluded): SentencePiece vocabularies (Llama,
# Gemma) hold 256 byte pieces <0x00>..<0xFF> that decode alone to control characters or U+FFFD, which
# punctuation's [^\w\s] would otherwise take (218 of stories260K's 512 tokens).
BUILTIN_SETS: dict[str, str] = {
    "starts_with_space": r"^ ",
    "capitalised": r"^ ?[A-Z]",
    "all_digits": r"^ ?[0-9]+$",
    "lowercase_word": r"^ ?[a-z]+$",
    "punctuation": r"^ ?[^\w\s]+$",
    "contains_newline": r"\n",
}

# Whole-SAE results are deterministic in the weights: kept per engine (weights are never mutated per request).
_moment_cache: "weakref.WeakKeyDictionary[Engine, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
_vocab_cache: "weakref.WeakKeyDictionary[Engine, list[str]]" = weakref.WeakKeyDictionary()
_excluded_cache: "weakref.WeakKeyDictionary[Engine, frozenset[int]]" = weakref.WeakKeyDictionary()
KEPT_WHITESPACE = " \t\n\r"  # byte pieces / control characters that are text: Llama's newline is <0x0A>


def _chunk_rows(d_vocab: int, bytes_per_value: int) -> int:
    return max(1, CHUNK_BYTES // (d_vocab * bytes_per_value))


def _feature_index(engine: Engine, sae: LoadedSAE, features: list[int] | None) -> torch.Tensor:
    if features is not None:
        if not features:
            raise InvalidInput("features is an empty list; omit it for every feature, or name some")
        for f in features:
            engine.check_feature(sae, f)
        return torch.tensor(features, dtype=torch.long)
    return torch.arange(sae.d_sae)


def _logit_weights(engine: Engine, sae: LoadedSAE, idx: torch.Tensor) -> torch.Tensor:
    """Feature ids [c] -> their logit weights W_dec[f] @ W_U [c, d_vocab] in float32, on the device."""
    W_U = engine.model.W_U  # [d_model, d_vocab]
    dirs = decoder_direction_in_resid(engine, sae, idx.to(sae.sae.W_dec.device))  # [c, d_model]
    return dirs.float().to(W_U.device) @ W_U.float()  # [c, d_vocab]


def logit_weight_moments(engine: Engine, sae: LoadedSAE, features: list[int] | None = None) -> torch.Tensor:
    """[n, 4] (mean, std, skewness, kurtosis) on the CPU, for `features` or all. Call inside device_work()."""
    if features is None and sae.key in _moment_cache.get(engine, {}):
        return _moment_cache[engine][sae.key]
    idx = _feature_index(engine, sae, features)
    rows = _chunk_rows(engine.model.cfg.d_vocab, 3 * 4)  # x, centred x, powers: ~3 float32 blocks alive
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), rows):
            x = _logit_weights(engine, sae, idx[start : start + rows])  # [c, V]
            mean = x.mean(dim=1)  # [c]
            d = x - mean[:, None]  # [c, V]
            std = d.pow(2).mean(dim=1).sqrt()  # [c]
            z = d / std.clamp_min(1e-30)[:, None]  # [c, V]
            skew = z.pow(3).mean(dim=1)
            kurt = z.pow(4).mean(dim=1)
            dead = std == 0  # an all-zero decoder row has no shape: report 0 rather than NaN
            skew[dead], kurt[dead] = 0.0, 0.0
            out.append(torch.stack([mean, std, skew, kurt], dim=1).cpu())  # [c, 4]
    moments = torch.cat(out)  # [n, 4]
    if features is None:
        _moment_cache.setdefault(engine, {})[sae.key] = moments
    return moments


def feature_stats(
    engine: Engine,
    sae: str | None = None,
    features: list[int] | None = None,
    sort_by: str = "skewness",
    descending: bool = True,
    top: int = 20,
    densities: torch.Tensor | None = None,
    min_density: float | None = None,
    max_density: float | None = None,
) -> FeatureStats:
    """Moments of every (or the named) feature's logit weights, filtered by density when indexed, sorted."""
    s = engine.sae(sae)
    if sort_by not in SORT_KEYS:
        raise InvalidInput(f"sort_by={sort_by!r}: use one of {', '.join(SORT_KEYS)}")
    if densities is None and (sort_by == "density" or min_density is not None or max_density is not None):
        raise InvalidInput(
            "densities are not indexed for this SAE, so sort_by='density' and density filters cannot work: "
            "call build_index (or run `sae-mcp index`) first, or sort by skewness/kurtosis/mean/std"
        )
    with engine.device_work():
        moments = logit_weight_moments(engine, s, features)  # [n, 4]
    idx = _feature_index(engine, s, features)
    dens = densities.float().cpu()[idx] if densities is not None else None  # [n]
    keep = torch.ones(len(idx), dtype=torch.bool)
    if dens is not None and min_density is not None:
        keep &= dens >= min_density
    if dens is not None and max_density is not None:
        keep &= dens <= max_density
    kept = keep.nonzero().flatten()
    column = {"mean": 0, "std": 1, "skewness": 2, "kurtosis": 3}
    if sort_by == "feature":
        key = idx[kept].float()
    elif sort_by == "density":
        key = dens[kept]
    else:
        key = moments[kept, column[sort_by]]
    order = kept[key.argsort(descending=descending, stable=True)][:top]
    rows = [
        FeatureStat(
            feature=int(idx[i]),
            mean=r(moments[i, 0]),
            std=r(moments[i, 1]),
            skewness=r(moments[i, 2]),
            kurtosis=r(moments[i, 3]),
            density=r(dens[i], 6) if dens is not None else None,
        )
        for i in order.tolist()
    ]
    return FeatureStats(
        sae=s.key,
        sort_by=sort_by,
        n_features=len(kept),
        densities="indexed" if dens is not None else "not indexed: call build_index or run sae-mcp index",
        features=rows,
    )


# ---------------------------------------------------------------------------------------------------------------
# Token-set enrichment


def vocab_strings(engine: Engine) -> list[str]:
    """Every token id -> its text as the tokenizer writes it (leading space kept); cached per engine."""
    if engine not in _vocab_cache:
        _vocab_cache[engine] = engine.str_tokens(torch.arange(engine.model.cfg.d_vocab))
    return _vocab_cache[engine]


def builtin_excluded(engine: Engine) -> frozenset[int]:
    """Token ids no built-in set may contain: special tokens (BOS, EOS, pad, unk), byte-fallback pieces
    ('<0x..>' from convert_ids_to_tokens) other than space/tab/newline/CR, and tokens whose text holds a control
    character (Unicode category C*: control, format, unassigned...) other than tab/newline/CR. Cached per engine."""
    if engine not in _excluded_cache:
        vocab = vocab_strings(engine)
        tok = engine.model.tokenizer
        pieces = tok.convert_ids_to_tokens(list(range(len(vocab)))) if tok is not None else [None] * len(vocab)
        special = set(getattr(tok, "all_special_ids", None) or [])
        out = set()
        for i, (text, piece) in enumerate(zip(vocab, pieces)):
            byte_piece = isinstance(piece, str) and piece.startswith("<0x") and text not in KEPT_WHITESPACE
            control = any(unicodedata.category(c).startswith("C") and c not in KEPT_WHITESPACE for c in text)
            if i in special or byte_piece or control:
                out.add(i)
        _excluded_cache[engine] = frozenset(out)
    return _excluded_cache[engine]


def build_token_sets(
    engine: Engine,
    sets: list[str] | None = None,
    token_sets: dict[str, list[str]] | None = None,
    regex_sets: dict[str, str] | None = None,
    skipped: list[str] | None = None,
) -> list[tuple[str, list[int], list[str]]]:
    """Named sets -> [(name, token ids, unmatched given tokens)]. Built-in names, token lists, or regexes.

    Built-in sets never contain builtin_excluded's byte-fallback and control tokens (your own regexes and
    token lists are taken as given). sets=None with no token/regex sets means every built-in set; then a set that is empty (or the whole
    vocabulary) in this tokenizer is left out and its name appended to `skipped` instead of being an error."""
    vocab = vocab_strings(engine)
    excluded = builtin_excluded(engine)
    lenient = sets is None and not token_sets and not regex_sets
    if lenient:
        sets = list(BUILTIN_SETS)
    wanted: list[tuple[str, str | None, list[str] | None, bool]] = []  # (name, regex, tokens, built-in)
    for name in sets or []:
        if name not in BUILTIN_SETS:
            raise InvalidInput(f"unknown token set {name!r}; built-in sets: {', '.join(BUILTIN_SETS)}")
        wanted.append((name, BUILTIN_SETS[name], None, True))
    for name, pattern in (regex_sets or {}).items():
        wanted.append((name, pattern, None, False))
    for name, tokens in (token_sets or {}).items():
        wanted.append((name, None, list(tokens), False))
    if not wanted:
        raise InvalidInput(
            f"no token sets given: name built-in sets ({', '.join(BUILTIN_SETS)}), or pass token_sets / regex_sets"
        )
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(vocab):
        by_text.setdefault(t, []).append(i)
    out = []
    for name, pattern, tokens, builtin in wanted:
        unmatched: list[str] = []
        if pattern is not None:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise InvalidInput(f"token set {name!r}: the regex {pattern!r} does not compile ({exc})") from None
            ids = [i for i, t in enumerate(vocab) if rx.search(t) and not (builtin and i in excluded)]
        else:
            ids = []
            for t in tokens or []:
                hit = by_text.get(t)
                if hit:
                    ids.extend(hit)
                else:
                    unmatched.append(t)
            ids = sorted(set(ids))
        if (not ids or len(ids) >= len(vocab)) and lenient:
            if skipped is not None:
                skipped.append(name)
            continue
        if not ids or len(ids) >= len(vocab):
            raise InvalidInput(
                f"token set {name!r} has {len(ids)} of the {len(vocab)} vocabulary tokens; enrichment needs a set "
                "that is neither empty nor the whole vocabulary"
                + (f" (not single tokens here: {', '.join(map(repr, unmatched[:5]))}; mind the leading space)" if unmatched else "")
            )
        out.append((name, ids, unmatched))
    return out


def enrichment_scores(engine: Engine, sae: LoadedSAE, idx: torch.Tensor, set_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n] x sets -> (rank-biserial score [n, n_sets], Mann-Whitney z [n, n_sets]). Inside device_work()."""
    V = engine.model.cfg.d_vocab
    rows = _chunk_rows(V, 4 + 4 + 8)  # x, sorted x, sort indices
    device = engine.model.W_U.device
    sets = [torch.tensor(ids, dtype=torch.long, device=device) for ids in set_ids]
    scores, zs = [], []
    with torch.inference_mode():
        for start in range(0, len(idx), rows):
            x = _logit_weights(engine, sae, idx[start : start + rows])  # [c, V]
            sorted_x = x.sort(dim=1).values  # [c, V]
            s_cols, z_cols = [], []
            for ids in sets:
                n1, n2 = len(ids), V - len(ids)
                v = x[:, ids].contiguous()  # [c, n1]
                # Midrank (1-based) of each set member among all V values: ties share the average rank.
                lo = torch.searchsorted(sorted_x, v, right=False)  # [c, n1] values strictly smaller
                hi = torch.searchsorted(sorted_x, v, right=True)  # [c, n1] values smaller or equal
                rank_sum = (lo + hi + 1).double().sum(dim=1) / 2  # [c]
                U = rank_sum - n1 * (n1 + 1) / 2  # pairs (set, rest) with set > rest, ties 1/2
                s_cols.append(2 * U / (n1 * n2) - 1)
                z_cols.append((U - n1 * n2 / 2) / math.sqrt(n1 * n2 * (V + 1) / 12))
            scores.append(torch.stack(s_cols, dim=1).float().cpu())  # [c, n_sets]
            zs.append(torch.stack(z_cols, dim=1).float().cpu())
    return torch.cat(scores), torch.cat(zs)


def token_set_enrichment(
    engine: Engine,
    sets: list[str] | None = None,
    token_sets: dict[str, list[str]] | None = None,
    regex_sets: dict[str, str] | None = None,
    sae: str | None = None,
    features: list[int] | None = None,
    top: int = 10,
) -> TokenSetEnrichment:
    """For each token set: the features whose logit weights most promote it, and most suppress it."""
    s = engine.sae(sae)
    idx = _feature_index(engine, s, features)
    skipped: list[str] = []
    named = build_token_sets(engine, sets, token_sets, regex_sets, skipped)
    vocab = vocab_strings(engine)
    with engine.device_work():
        score, z = enrichment_scores(engine, s, idx, [ids for _, ids, _ in named])  # [n, n_sets] each

    def rows(col: int, order: torch.Tensor) -> list[EnrichedFeature]:
        return [
            EnrichedFeature(
                feature=int(idx[i]),
                score=r(score[i, col]),
                z=r(z[i, col], 2),
                direction="promotes" if score[i, col] >= 0 else "suppresses",
            )
            for i in order.tolist()
        ]

    k = min(top, len(idx))
    out = []
    for col, (name, ids, unmatched) in enumerate(named):
        up = score[:, col].argsort(descending=True, stable=True)[:k]
        down = score[:, col].argsort(descending=False, stable=True)[:k]
        out.append(
            SetEnrichment(
                name=name,
                size=len(ids),
                examples=[vocab[i] for i in ids[:8]],
                unmatched=unmatched or None,
                promoted=[e for e in rows(col, up) if e.score > 0],
                suppressed=[e for e in rows(col, down) if e.score < 0],
            )
        )
    return TokenSetEnrichment(
        sae=s.key,
        n_features=len(idx),
        skipped=skipped or None,
        method="Mann-Whitney rank-biserial r = 2*AUC-1 of the set's W_dec[f] @ W_U values vs the rest; z from U",
        sets=out,
    )
