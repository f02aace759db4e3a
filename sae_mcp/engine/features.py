"""Feature activations per token, top features per position, and prompt comparisons.

Activations are the SAE's post-activation values on the model's real activations at the SAE's hook, with BOS
prepended as the SAE was trained (metadata.prepend_bos). That equals `hook_sae_acts_post` from the tutorial's
run_with_cache_with_saes, but we stop the forward after the SAE's layer and never splice the SAE in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sae_mcp.engine.runtime import Engine, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import (
    FeatureActivation,
    FeatureActs,
    FeatureDiff,
    FeatureSetDiff,
    FeatureTrace,
    PositionTopFeatures,
    PromptComparison,
    rounded,
)

MAX_LISTED_ACTIVATIONS = 25_000  # positions x top_k in one get_feature_acts answer (~0.5 MB of JSON)


def prompt_feature_acts(engine: Engine, sae: LoadedSAE, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt -> (tokens [seq], feature activations [seq, d_sae]) on the device. Call inside device_work()."""
    tokens = engine.to_tokens(prompt, prepend_bos=sae.prepend_bos)
    acts = engine.forward_to_hook(tokens, sae)  # [1, seq, d_in]
    return tokens[0], engine.encode(sae, acts)[0].float()  # [seq, d_sae]


def get_feature_acts(
    engine: Engine, prompt: str, sae: str | None = None, top_k: int = 5, features: list[int] | None = None
) -> FeatureActs:
    s = engine.sae(sae)
    features = engine.check_features(s, features)
    with engine.device_work():
        tokens, acts = prompt_feature_acts(engine, s, prompt)  # [seq], [seq, d_sae]
        if len(tokens) * top_k > MAX_LISTED_ACTIVATIONS:
            raise InvalidInput(
                f"{len(tokens)} tokens x top_k {top_k} would list {len(tokens) * top_k} activations (at most "
                f"{MAX_LISTED_ACTIVATIONS}); lower top_k or shorten the prompt"
            )
        k = min(top_k, s.d_sae)
        values, indices = acts.topk(k, dim=-1)  # [seq, k] each: only these leave the device
        values, indices = values.cpu(), indices.cpu()
        traces = acts[:, features].T.cpu() if features else None  # [n_features, seq]
    str_tokens = engine.str_tokens(tokens)
    positions = [
        PositionTopFeatures(
            position=p,
            token=str_tokens[p],
            top=[
                FeatureActivation(feature=int(f), activation=rounded(v))
                for v, f in zip(values[p].tolist(), indices[p].tolist())
                if v > 0
            ],
        )
        for p in range(len(str_tokens))
    ]
    return FeatureActs(
        sae=s.key,
        tokens=str_tokens,
        positions=positions,
        features=[
            FeatureTrace(feature=f, activations=[rounded(a) for a in traces[i].tolist()])
            for i, f in enumerate(features)
        ] if features else None,
    )


def compare_prompts(
    engine: Engine, prompt_a: str, prompt_b: str, sae: str | None = None, top_k: int = 10, position: int = -1
) -> PromptComparison:
    """Features whose activation at `position` differs most between two prompts."""
    s = engine.sae(sae)
    with engine.device_work():
        tok_a, acts_a = prompt_feature_acts(engine, s, prompt_a)
        tok_b, acts_b = prompt_feature_acts(engine, s, prompt_b)
        pa = position_index(position, len(tok_a), "prompt_a")
        pb = position_index(position, len(tok_b), "prompt_b")
        a, b = acts_a[pa], acts_b[pb]  # [d_sae] each
        diff = a - b
        k = min(top_k, s.d_sae)
        idx = diff.abs().topk(k).indices
        rows = torch.stack([idx.float(), a[idx], b[idx], diff[idx]], dim=1).cpu().tolist()  # [k, 4]
    return PromptComparison(
        sae=s.key,
        mode="pair",
        position=position,
        token_a=engine.str_tokens(tok_a[pa])[0],
        token_b=engine.str_tokens(tok_b[pb])[0],
        diffs=[
            FeatureDiff(feature=int(f), activation_a=rounded(x), activation_b=rounded(y), difference=rounded(d))
            for f, x, y, d in rows
            if d != 0
        ],
    )


@dataclass
class SetStatistics:
    """Per-feature statistics of two sets of activations, each [d_sae]."""

    mean_a: torch.Tensor
    mean_b: torch.Tensor
    difference: torch.Tensor  # mean_a - mean_b
    cohens_d: torch.Tensor  # difference / pooled sd; NaN when a set has one member or both are constant
    rank_biserial: torch.Tensor  # 2 * P(a > b) + P(a == b) - 1, in [-1, 1]: bounded and robust at small n
    separated: torch.Tensor  # bool: the sets do not overlap (every a above every b, or below) and differ


def set_statistics(A: torch.Tensor, B: torch.Tensor) -> SetStatistics:
    """A [n_a, d_sae], B [n_b, d_sae] -> per-feature means, Cohen's d, rank-biserial correlation, separation.

    Cohen's d alone misleads here: at the differing token of minimal pairs every feature is constant within each
    set (pooled sd 0, d unbounded), and with 2-3 prompts a set d swings wildly. The rank-biserial correlation
    (the Mann-Whitney AUC rescaled to [-1, 1]) is bounded and says how often a prompt of A beats one of B;
    `separated` marks non-overlapping sets, the strongest evidence a handful of prompts can give.
    """
    A, B = A.float(), B.float()
    na, nb = A.shape[0], B.shape[0]
    mean_a, mean_b = A.mean(0), B.mean(0)
    diff = mean_a - mean_b
    # "Equal" up to float noise: the same token after different suffix lengths can differ in the last bits.
    tol = 1e-6 * (mean_a.abs() + mean_b.abs()) + 1e-9
    if na >= 2 and nb >= 2:
        pooled = (((na - 1) * A.var(0) + (nb - 1) * B.var(0)) / (na + nb - 2)).sqrt()
        d = torch.where(pooled > tol, diff / pooled.clamp_min(1e-30), torch.full_like(diff, float("nan")))
    else:
        d = torch.full_like(diff, float("nan"))
    wins = torch.zeros_like(diff)
    ties = torch.zeros_like(diff)
    for i in range(na):  # n_a passes over [n_b, d_sae]: no [n_a, n_b, d_sae] tensor
        delta = A[i][None, :] - B
        wins += (delta > tol).sum(0)
        ties += (delta.abs() <= tol).sum(0)
    rank_biserial = (2 * wins + ties) / (na * nb) - 1
    separated = (rank_biserial.abs() == 1) & (diff.abs() > tol)
    return SetStatistics(mean_a, mean_b, diff, d, rank_biserial, separated)


def compare_prompt_sets(
    engine: Engine,
    prompts_a: list[str],
    prompts_b: list[str],
    sae: str | None = None,
    top_k: int = 10,
    position: int = -1,
    sort_by: str = "difference",
) -> PromptComparison:
    """Mean activation at `position` over each set, per feature, with Cohen's d (pooled sd)."""
    s = engine.sae(sae)
    cap = engine.limits.max_prompts_per_set
    for name, ps in (("prompts_a", prompts_a), ("prompts_b", prompts_b)):
        if not ps:
            raise InvalidInput(f"{name} is empty; give at least one prompt per set")
        if len(ps) > cap:
            raise InvalidInput(f"{name} has {len(ps)} prompts; at most {cap} per set")
    if sort_by not in ("difference", "effect_size"):
        raise InvalidInput("sort_by must be 'difference' or 'effect_size'")
    if sort_by == "effect_size" and (len(prompts_a) < 2 or len(prompts_b) < 2):
        raise InvalidInput("sort_by='effect_size' needs at least two prompts in each set")

    def stack(prompts: list[str], which: str) -> torch.Tensor:
        rows = []
        for i, p in enumerate(prompts):
            tok, acts = prompt_feature_acts(engine, s, p)
            rows.append(acts[position_index(position, len(tok), f"{which}[{i}]")])
        return torch.stack(rows)  # [n, d_sae]

    with engine.device_work():
        A, B = stack(prompts_a, "prompts_a"), stack(prompts_b, "prompts_b")
        st = set_statistics(A, B)
        k = min(top_k, s.d_sae)
        if sort_by == "effect_size":
            # separated features first (by |difference|), then the rest by |d|
            sep = st.separated.nonzero()[:, 0]
            rest = (~st.separated).nonzero()[:, 0]
            d_abs = st.cohens_d.nan_to_num(0.0).abs()
            by_difference = sep[st.difference[sep].abs().argsort(descending=True)]
            idx = torch.cat([by_difference, rest[d_abs[rest].argsort(descending=True)]])[:k]
        else:
            idx = st.difference.abs().topk(k).indices
        rows = torch.stack(
            [idx.float(), st.mean_a[idx], st.mean_b[idx], st.difference[idx], st.cohens_d[idx],
             st.separated[idx].float(), st.rank_biserial[idx]], dim=1
        ).cpu().tolist()
    na, nb = len(prompts_a), len(prompts_b)
    return PromptComparison(
        sae=s.key,
        mode="sets",
        position=position,
        n_a=na,
        n_b=nb,
        sort_by=sort_by,
        diffs=[
            FeatureSetDiff(
                feature=int(row[0]),
                mean_a=rounded(row[1]),
                mean_b=rounded(row[2]),
                difference=rounded(row[3]),
                effect_size=None if math.isnan(row[4]) else rounded(row[4], 3),
                rank_biserial=rounded(row[6], 3),
                separated=bool(row[5]),
            )
            for row in rows
            if row[3] != 0 or row[6] != 0
        ],
    )
