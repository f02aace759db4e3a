"""Two sets of prompts compared feature by feature at one token position: means, difference, Cohen's d, the
rank-biserial correlation and whether the sets separate (compare_prompts with prompts_a / prompts_b).

Minimal pairs are the usual input ("He is a doctor" / "She is a doctor"): the sets then differ at one token, and
the position compared is that token in every prompt; the result lists the token compared in each prompt, so a
misaligned position (a prompt that tokenizes differently) is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sae_mcp.engine.features import POOR_RECONSTRUCTION, few_differ_note, prompt_feature_acts
from sae_mcp.engine.runtime import Engine, position_index
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.results import FeatureSetDiff, PromptComparison, collect_warnings, rounded

SORT_BY = ("difference", "effect_size")
CHANCE_SEPARATION = 0.05  # above this chance of separating by luck, a `separated` flag gets a warning


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


@dataclass
class SetReadout:
    """One set's activations at the compared position."""

    acts: torch.Tensor  # [n, d_sae]
    tokens: list[str]  # the token compared in each prompt
    poorly_reconstructed: list[str]  # 'prompts_a[2]' where the SAE reconstructs the compared position poorly
    too_long: list[str]  # prompts longer than the SAE's training context


def _check_sets(engine: Engine, prompts_a: list[str], prompts_b: list[str], sort_by: str) -> None:
    cap = engine.limits.max_prompts_per_set
    for name, ps in (("prompts_a", prompts_a), ("prompts_b", prompts_b)):
        if not ps:
            raise InvalidInput(f"{name} is empty; give at least one prompt per set")
        if len(ps) > cap:
            raise InvalidInput(f"{name} has {len(ps)} prompts; at most {cap} per set")
    if sort_by not in SORT_BY:
        raise InvalidInput("sort_by must be 'difference' or 'effect_size'")
    if sort_by == "effect_size" and (len(prompts_a) < 2 or len(prompts_b) < 2):
        raise InvalidInput("sort_by='effect_size' needs at least two prompts in each set")


def _read_set(engine: Engine, s: LoadedSAE, prompts: list[str], position: int, which: str) -> SetReadout:
    """Each prompt's activations at `position`. Inside device_work()."""
    out = SetReadout(acts=torch.empty(0), tokens=[], poorly_reconstructed=[], too_long=[])
    rows = []
    for i, prompt in enumerate(prompts):
        pa = prompt_feature_acts(engine, s, prompt)
        p = position_index(position, len(pa.tokens), f"{which}[{i}]")
        rows.append(pa.acts[p])
        out.tokens.append(engine.str_tokens(pa.tokens[p])[0])
        first = 1 if s.prepend_bos else 0
        if p >= first and float(pa.recon_error[p]) > POOR_RECONSTRUCTION:
            out.poorly_reconstructed.append(f"{which}[{i}]")
        if s.context_size and len(pa.tokens) > s.context_size:
            out.too_long.append(f"{which}[{i}]")
    out.acts = torch.stack(rows)  # [n, d_sae]
    return out


def _chance_separation(n_a: int, n_b: int, any_separated: bool) -> str | None:
    """Two sets of exchangeable values are separated (either way) with probability 2 / C(n_a + n_b, n_a)."""
    p = 2 / math.comb(n_a + n_b, n_a)
    if not any_separated or p <= CHANCE_SEPARATION:
        return None
    return (f"with {n_a} vs {n_b} prompts one feature's sets are separated by chance with probability {p:.2g} (exact "
            "permutation test), and many features are compared: `separated` alone is weak evidence here; use 4 or "
            "more prompts per set (4 vs 4: 0.029)")


def _set_warnings(s: LoadedSAE, a: SetReadout, b: SetReadout, any_separated: bool) -> list[str] | None:
    poor, long = a.poorly_reconstructed + b.poorly_reconstructed, a.too_long + b.too_long
    return collect_warnings(
        _chance_separation(len(a.acts), len(b.acts), any_separated),
        f"SAE {s.key} reconstructs the compared position poorly in {', '.join(poor)} (over "
        f"{POOR_RECONSTRUCTION:.0%} of its squared norm left in the error term): a feature absent there is no "
        "evidence" if poor else None,
        f"{', '.join(long)} are longer than the {s.context_size}-token contexts SAE {s.key} was trained on: "
        "activations past that are out of its training distribution" if long else None,
    )


def _ranked(st: SetStatistics, sort_by: str, k: int) -> torch.Tensor:
    """Feature ids [k]: by |difference|, or separated features first (by |difference|) then the rest by |d|."""
    if sort_by == "difference":
        return st.difference.abs().topk(k).indices
    sep = st.separated.nonzero()[:, 0]
    rest = (~st.separated).nonzero()[:, 0]
    d_abs = st.cohens_d.nan_to_num(0.0).abs()
    by_difference = sep[st.difference[sep].abs().argsort(descending=True)]
    return torch.cat([by_difference, rest[d_abs[rest].argsort(descending=True)]])[:k]


def compare_prompt_sets(
    engine: Engine,
    prompts_a: list[str],
    prompts_b: list[str],
    sae: str | None = None,
    top_k: int = 10,
    position: int = -1,
    sort_by: str = "difference",
) -> PromptComparison:
    """Mean activation at `position` over each set, per feature, with Cohen's d (pooled sd), the rank-biserial
    correlation and separation."""
    s = engine.sae(sae)
    _check_sets(engine, prompts_a, prompts_b, sort_by)
    with engine.device_work():
        a = _read_set(engine, s, prompts_a, position, "prompts_a")
        b = _read_set(engine, s, prompts_b, position, "prompts_b")
        st = set_statistics(a.acts, b.acts)
        idx = _ranked(st, sort_by, min(top_k, s.d_sae))
        rows = torch.stack(
            [idx.float(), st.mean_a[idx], st.mean_b[idx], st.difference[idx], st.cohens_d[idx],
             st.separated[idx].float(), st.rank_biserial[idx]], dim=1
        ).cpu().tolist()  # [k, 7]
        n_differ = int(((st.difference != 0) | (st.rank_biserial != 0)).sum())
    return PromptComparison(
        sae=s.key,
        mode="sets",
        position=position,
        tokens_a=a.tokens,
        tokens_b=b.tokens,
        n_a=len(prompts_a),
        n_b=len(prompts_b),
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
        warnings=collect_warnings(few_differ_note(n_differ, min(top_k, s.d_sae)),
                                  *(_set_warnings(s, a, b, any_separated=any(row[5] for row in rows)) or [])),
    )
