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

LogitWeightStats keeps what these reuse, per engine and built once by the server: every feature's moments per
SAE, the vocabulary's token strings, and the ids built-in token sets leave out (the weights are never mutated per
request, so none of it goes stale).
"""

from __future__ import annotations

import math
import threading

import torch

from sae_mcp.engine.logits import decoder_direction_in_resid
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.engine.token_sets import TokenSet, build_token_sets, excluded_from_builtin, vocab_strings
from sae_mcp.errors import InvalidInput
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.explain import EnrichedFeature, FeatureStat, FeatureStats, SetEnrichment, TokenSetEnrichment

CHUNK_BYTES = 256 * 2**20  # working memory per chunk of features (bytes), whatever the device
SORT_KEYS = ("skewness", "kurtosis", "mean", "std", "density", "feature")
MOMENT_COLUMN = {"mean": 0, "std": 1, "skewness": 2, "kurtosis": 3}


def chunk_rows(d_vocab: int, bytes_per_value: int) -> int:
    """Features per chunk so that a chunk's [c, d_vocab] working blocks fit in CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (d_vocab * bytes_per_value))


def feature_index(engine: Engine, sae: LoadedSAE, features: list[int] | None) -> torch.Tensor:
    """The named features (checked) or every feature of the SAE -> ids [n]."""
    if features is not None:
        if not features:
            raise InvalidInput("features is an empty list; omit it for every feature, or name some")
        for f in features:
            engine.check_feature(sae, f)
        return torch.tensor(features, dtype=torch.long)
    return torch.arange(sae.d_sae)


def logit_weights(engine: Engine, sae: LoadedSAE, idx: torch.Tensor) -> torch.Tensor:
    """Feature ids [c] -> their logit weights W_dec[f] @ W_U [c, d_vocab] in float32, on the device."""
    W_U = engine.model.W_U  # [d_model, d_vocab]
    dirs = decoder_direction_in_resid(engine, sae, idx.to(sae.sae.W_dec.device))  # [c, d_model]
    return dirs.float().to(W_U.device) @ W_U.float()  # [c, d_vocab]


def compute_moments(engine: Engine, sae: LoadedSAE, idx: torch.Tensor) -> torch.Tensor:
    """Features [n] -> [n, 4] (mean, std, skewness, kurtosis) on the CPU, in chunks. Weight-only (no forward, no
    hooks), so it needs no device queue (project_to_vocab's reasoning, logits.py): it runs beside forward passes,
    in CHUNK_BYTES blocks, whole-SAE passes one at a time (LogitWeightStats)."""
    rows = chunk_rows(engine.model.cfg.d_vocab, 3 * 4)  # x, centred x, powers: ~3 float32 blocks alive
    out = []
    with torch.inference_mode():
        for start in range(0, len(idx), rows):
            x = logit_weights(engine, sae, idx[start : start + rows])  # [c, V]
            mean = x.mean(dim=1)  # [c]
            d = x - mean[:, None]  # [c, V]
            std = d.pow(2).mean(dim=1).sqrt()  # [c]
            z = d / std.clamp_min(1e-30)[:, None]  # [c, V]
            skew = z.pow(3).mean(dim=1)
            kurt = z.pow(4).mean(dim=1)
            dead = std == 0  # an all-zero decoder row has no shape: report 0 rather than NaN
            skew[dead], kurt[dead] = 0.0, 0.0
            out.append(torch.stack([mean, std, skew, kurt], dim=1).cpu())  # [c, 4]
    return torch.cat(out)  # [n, 4]


def enrichment_scores(engine: Engine, sae: LoadedSAE, idx: torch.Tensor, set_ids: list[list[int]]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n] x sets -> (rank-biserial score [n, n_sets], Mann-Whitney z [n, n_sets]). Inside device_work()."""
    V = engine.model.cfg.d_vocab
    rows = chunk_rows(V, 4 + 4 + 8)  # x, sorted x, sort indices
    device = engine.model.W_U.device
    sets = [torch.tensor(ids, dtype=torch.long, device=device) for ids in set_ids]
    scores, zs = [], []
    with torch.inference_mode():
        for start in range(0, len(idx), rows):
            x = logit_weights(engine, sae, idx[start : start + rows])  # [c, V]
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


class LogitWeightStats:
    """feature_stats and token_set_enrichment of one engine, with the whole-SAE moments, the vocabulary's strings
    and the built-in sets' exclusions computed once and kept here."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._moments: dict[str, torch.Tensor] = {}  # SAE key -> [d_sae, 4]
        self._vocab: list[str] | None = None
        self._excluded: frozenset[int] | None = None
        self._lock = threading.Lock()
        # One whole-SAE moments pass at a time, outside the device queue: two calls asking together compute it
        # once, and at most one pass's CHUNK_BYTES blocks sit beside the forward passes.
        self._weights = threading.Lock()

    def moments(self, sae: LoadedSAE, features: list[int] | None = None) -> torch.Tensor:
        """[n, 4] (mean, std, skewness, kurtosis) for `features`, or every feature (kept). Weight-only: never waits
        for the device (a feature_stats call once failed busy after 30 s behind a steer_generate)."""
        if features is not None:
            return compute_moments(self.engine, sae, feature_index(self.engine, sae, features))
        with self._weights:
            if sae.key not in self._moments:
                self._moments[sae.key] = compute_moments(self.engine, sae, feature_index(self.engine, sae, None))
            return self._moments[sae.key]

    @property
    def centred_unembed(self) -> bool:
        """Whether W_U's rows sum to 0 over the vocabulary (transformer-lens' center_unembed), so that every
        feature's logit-weight mean is 0 by construction and not worth reporting."""
        return bool(self.engine.loaded_model.processing.get("center_unembed", False))

    def vocab(self) -> list[str]:
        with self._lock:
            if self._vocab is None:
                self._vocab = vocab_strings(self.engine)
            return self._vocab

    def builtin_excluded(self) -> frozenset[int]:
        vocab = self.vocab()
        with self._lock:
            if self._excluded is None:
                self._excluded = excluded_from_builtin(self.engine, vocab)
            return self._excluded

    def token_sets(self, sets: list[str] | None = None, token_sets: dict[str, list[str]] | None = None,
                   regex_sets: dict[str, str] | None = None) -> tuple[list[TokenSet], list[str]]:
        """build_token_sets over this engine's vocabulary -> (sets, built-in names skipped)."""
        return build_token_sets(self.vocab(), self.builtin_excluded(), sets, token_sets, regex_sets)

    def feature_stats(
        self,
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
        s = self.engine.sae(sae)
        if sort_by not in SORT_KEYS:
            raise InvalidInput(f"sort_by={sort_by!r}: use one of {', '.join(SORT_KEYS)}")
        if min_density is not None and max_density is not None and min_density > max_density:
            raise InvalidInput(f"min_density {min_density:g} is above max_density {max_density:g}, so no feature "
                               "could pass: swap them, or give min_density <= max_density")
        if densities is None and (sort_by == "density" or min_density is not None or max_density is not None):
            raise InvalidInput(
                "densities are not indexed for this SAE, so sort_by='density' and density filters cannot work: "
                "call build_index (or run `sae-mcp index`) first, or sort by skewness/kurtosis/mean/std"
            )
        moments = self.moments(s, features)  # [n, 4], weight-only: not behind device work
        idx = feature_index(self.engine, s, features)
        dens = densities.float().cpu()[idx] if densities is not None else None  # [n]
        keep = torch.ones(len(idx), dtype=torch.bool)
        if dens is not None and min_density is not None:
            keep &= dens >= min_density
        if dens is not None and max_density is not None:
            keep &= dens <= max_density
        kept = keep.nonzero().flatten()
        if dens is not None and len(idx) and not len(kept):  # an empty table would read as "no such features"
            raise InvalidInput(
                f"no feature of the {len(idx)} considered has a density in [{min_density or 0:g}, "
                f"{1 if max_density is None else max_density:g}]; their densities run from {float(dens.min()):.4g} "
                f"to {float(dens.max()):.4g}: widen min_density / max_density"
            )
        if sort_by == "feature":
            key = idx[kept].float()
        elif sort_by == "density":
            assert dens is not None  # refused above when the SAE has no densities
            key = dens[kept]
        else:
            key = moments[kept, MOMENT_COLUMN[sort_by]]
        order = kept[key.argsort(descending=descending, stable=True)][:top]
        return FeatureStats(
            sae=s.key,
            sort_by=sort_by,
            n_features=len(kept),
            densities="indexed" if dens is not None else "not indexed: call build_index or run sae-mcp index",
            features=[_feature_stat(int(idx[i]), moments[i], None if dens is None else dens[i], self.centred_unembed)
                      for i in order.tolist()],
        )

    def token_set_enrichment(
        self,
        sets: list[str] | None = None,
        token_sets: dict[str, list[str]] | None = None,
        regex_sets: dict[str, str] | None = None,
        sae: str | None = None,
        features: list[int] | None = None,
        top: int = 10,
    ) -> TokenSetEnrichment:
        """For each token set: the features whose logit weights most promote it, and most suppress it."""
        s = self.engine.sae(sae)
        idx = feature_index(self.engine, s, features)
        named, skipped = self.token_sets(sets, token_sets, regex_sets)
        with self.engine.device_work():
            score, z = enrichment_scores(self.engine, s, idx, [ts.ids for ts in named])  # [n, n_sets] each
        vocab = self.vocab()
        return TokenSetEnrichment(
            sae=s.key,
            n_features=len(idx),
            skipped=skipped or None,
            sets=[_set_enrichment(ts, vocab, idx, score[:, col], z[:, col], top) for col, ts in enumerate(named)],
            warnings=collect_warnings(small_sets_warning(named)),
        )


SMALL_SET = 5  # tokens: below this a set's score is one or two tokens' ranks, not a category's enrichment


def small_sets_warning(named: list[TokenSet]) -> str | None:
    """Sets of fewer than SMALL_SET tokens: among thousands of features some rank one token at the top of the
    vocabulary by chance, so r near +-1 there says little (z stays small)."""
    small = [f"'{ts.name}' ({len(ts.ids)})" for ts in named if len(ts.ids) < SMALL_SET]
    if not small:
        return None
    return (f"set(s) {', '.join(small)} hold fewer than {SMALL_SET} tokens: a score near +-1 there is one or two "
            "tokens' rank in the feature's logit weights, which some of thousands of features reach by chance; "
            "read z (small for small sets), add tokens (words without and with a leading space, capitalised), "
            "or use project_to_vocab for single tokens")


def _feature_stat(feature: int, m: torch.Tensor, density: torch.Tensor | None, centred: bool) -> FeatureStat:
    """One row: m [4] = (mean, std, skewness, kurtosis); the mean left out when it is 0 by construction."""
    return FeatureStat(
        feature=feature, mean=None if centred else rounded(float(m[0])), std=rounded(float(m[1])),
        skewness=rounded(float(m[2])), kurtosis=rounded(float(m[3])),
        density=rounded(float(density), 6) if density is not None else None,
    )


def _set_enrichment(ts: TokenSet, vocab: list[str], idx: torch.Tensor, score: torch.Tensor, z: torch.Tensor,
                    top: int) -> SetEnrichment:
    """One set's top promoting and suppressing features; score, z [n] over the features idx [n]."""

    def rows(order: torch.Tensor) -> list[EnrichedFeature]:
        return [
            EnrichedFeature(feature=int(idx[i]), score=rounded(float(score[i])), z=rounded(float(z[i]), 2))
            for i in order.tolist()
        ]

    k = min(top, len(idx))
    up = score.argsort(descending=True, stable=True)[:k]
    down = score.argsort(descending=False, stable=True)[:k]
    return SetEnrichment(
        name=ts.name,
        size=len(ts.ids),
        examples=[vocab[i] for i in ts.ids[:8]],
        unmatched=ts.unmatched or None,
        promoted=[e for e in rows(up) if e.score > 0],
        suppressed=[e for e in rows(down) if e.score < 0],
    )
