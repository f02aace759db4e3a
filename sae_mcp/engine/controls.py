"""What steering and ablation share: KL from logits, and matched random-feature controls with their statistics.

A control run repeats the intervention with random features in place of the targets, one control feature per
target. A control must be something that could have shown the effect and is not itself a known cause:
- ablation (activation_matched_controls): features that fire where the targets are ablated, each with a summed
  activation there within ACTIVATION_BAND of its target's, never a target and never one of the EXCLUDED_TOP features
  of largest |attribution| to the metric at those positions (strong causes of the same metric are not "random").
  Fewer controls than asked, with a note saying why, rather than poor matches;
- steering (matched_controls): the features nearest each target in decoder norm.
The targets' effect is then shown next to the controls' spread, on the metric and KL only (significance_stats).
"""

from __future__ import annotations

import torch

from sae_mcp.errors import InvalidInput
from sae_mcp.results import rounded
from sae_mcp.results.causal import ControlRun, ControlStat

MAX_CONTROLS = 16  # control runs per call (the tool signatures repeat it so clients see it in the schema)
FEW_CONTROLS = 5  # fewer control runs than this: exceeding all of them is weak evidence
ACTIVATION_BAND = (0.5, 2.0)  # an ablation control's summed activation, as a multiple of its target's
EXCLUDED_TOP = 20  # features of largest |attribution| to the metric, never ablation controls (attribute's top_k)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dim, from logits [..., d_vocab] -> [...] (float32)."""
    lp = p_logits.float().log_softmax(-1)
    lq = q_logits.float().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0)


def check_n_controls(controls: bool, n_controls: int) -> None:
    if controls and not 1 <= n_controls <= MAX_CONTROLS:
        raise InvalidInput(f"n_controls={n_controls}: use 1..{MAX_CONTROLS}")


def pool_size(n_controls: int) -> int:
    """How many nearest features each target's controls are drawn from."""
    return max(4 * n_controls, 20)


def matched_controls(
    score: torch.Tensor, targets: list[int], n: int, seed: int, eligible: torch.Tensor
) -> tuple[list[list[int]], str | None]:
    """n control sets, one random feature per target, each drawn from the features nearest that target in
    `score` [d_sae] (activation or decoder norm). `eligible` [d_sae] bool excludes the targets and others.
    Returns (the sets, a note when fewer than n could be drawn)."""
    score, eligible = score.float().cpu(), eligible.cpu().clone()
    eligible[targets] = False
    candidates = eligible.nonzero().flatten()  # [n_eligible]
    if candidates.numel() < n * len(targets):
        return [], f"only {candidates.numel()} eligible features; controls need {n * len(targets)}"
    g = torch.Generator().manual_seed(seed)
    pools = [_shuffled_pool(score, candidates, f, pool_size(n), g) for f in targets]
    sets = _draw_without_reuse(pools, n)
    note = None if len(sets) == n else f"only {len(sets)} control sets could be drawn without reusing a feature"
    return sets, note


def _shuffled_pool(
    score: torch.Tensor, candidates: torch.Tensor, target: int, size: int, g: torch.Generator
) -> list[int]:
    """The `size` candidates nearest `target` in score, in a random order drawn from g."""
    # nearest in score: relative distance, so a large max and a small one are matched alike
    dist = (score[candidates] - score[target]).abs() / max(abs(float(score[target])), 1e-6)  # [n_eligible]
    pool = candidates[dist.argsort()[:size]]  # [size]
    return pool[torch.randperm(pool.numel(), generator=g)].tolist()


def _draw_without_reuse(pools: list[list[int]], n: int) -> list[list[int]]:
    """Up to n sets, each taking the next unused feature from every target's pool; no feature is used twice."""
    sets: list[list[int]] = []
    used: set[int] = set()
    for _ in range(n):
        chosen = []
        for pool in pools:
            pick = next((c for c in pool if c not in used), None)
            if pick is None:
                break
            used.add(pick)
            chosen.append(pick)
        if len(chosen) < len(pools):
            break
        sets.append(chosen)
    return sets


def activation_matched_controls(
    act_sum: torch.Tensor, attribution: torch.Tensor, targets: list[int], n: int, seed: int,
    what: str = "summed activation",
) -> tuple[list[list[int]], str | None]:
    """Up to n control sets for an ablation, one feature per target: act_sum [d_sae] (summed activation at the
    ablated positions) within ACTIVATION_BAND of the target's, not a target, not among the EXCLUDED_TOP features by
    |attribution| [d_sae] there; each target's matches in a seeded random order, no feature used twice. `what`
    names act_sum in the note (patching matches on the size of the patch instead).
    -> (the sets, why fewer than n when so). Targets that do not fire there get no controls (the note says so)."""
    act_sum, attribution = act_sum.float().cpu(), attribution.float().cpu()
    eligible = act_sum > 0
    eligible[targets] = False
    eligible[attribution.abs().topk(min(EXCLUDED_TOP, attribution.numel())).indices] = False
    lo, hi = ACTIVATION_BAND
    silent = [t for t in targets if act_sum[t] <= 0]
    if silent:
        return [], (f"target(s) {silent} do not fire at the ablated positions, so no activation-matched control "
                    "exists: pick targets that fire there (get_feature_acts), or other positions")
    g = torch.Generator().manual_seed(seed)
    pools = []
    for t in targets:
        a = float(act_sum[t])
        pool = (eligible & (act_sum >= lo * a) & (act_sum <= hi * a)).nonzero().flatten()  # [n_matched]
        pools.append(pool[torch.randperm(pool.numel(), generator=g)].tolist())
    sets = _draw_without_reuse(pools, n)
    if len(sets) == n:
        return sets, None
    short = [(t, len(p)) for t, p in zip(targets, pools) if len(p) < n]
    return sets, (f"{len(sets)} of {n} control sets: "
                  + ", ".join(f"{k} feature(s) match target {t}" for t, k in short)
                  + f" ({what} within {lo:g}-{hi:g}x, not a target, not among the {EXCLUDED_TOP} of largest "
                  "|attribution|); use more positions for more, and read fewer controls as weaker evidence")


def rounded_effects(effects: dict[str, float]) -> dict[str, float]:
    return {k: rounded(v, 6) for k, v in effects.items()}


def control_stats(target: dict[str, float], runs: list[ControlRun]) -> list[ControlStat]:
    """Per quantity in `target`: the targets' (unrounded) effect next to the mean, spread and range of the controls',
    with a z and "exceeds every control". Pass only what significance may be claimed on: the metric and KL (and
    steering's concept readout), never a raw logit change, which moves with the whole distribution."""
    stats = []
    for metric, t in target.items():
        vals = torch.tensor([run.effects[metric] for run in runs], dtype=torch.float64)  # [n_runs]
        if vals.numel() == 0:
            continue
        mean = float(vals.mean())
        std = float(vals.std(unbiased=True)) if vals.numel() > 1 else 0.0
        stats.append(
            ControlStat(
                metric=metric,
                target=rounded(t, 6),
                control_mean=rounded(mean, 6),
                control_std=rounded(std, 6),
                control_min=rounded(float(vals.min()), 6),
                control_max=rounded(float(vals.max()), 6),
                z_score=rounded((t - mean) / std, 3) if _spread(std, t, mean) else None,
                exceeds_all_controls=bool(abs(t) > float(vals.abs().max())),
            )
        )
    return stats


def _spread(std: float, target: float, mean: float) -> bool:
    """Whether the controls vary enough for a z-score to mean anything: with controls that all read ~0 (a concept
    readout no random feature moves) std is float noise and z runs into the hundreds, which would read as
    certainty; exceeds_all_controls says what there is to say then."""
    return std > 1e-3 * max(abs(target), abs(mean), 1e-6)


def few_controls_caution(n_runs: int) -> str | None:
    if n_runs >= FEW_CONTROLS or n_runs == 0:  # none at all: the note says why, there is nothing to exceed
        return None
    return (
        f"only {n_runs} control run(s): exceeding all of so few controls is weak evidence; use n_controls >= "
        f"{FEW_CONTROLS} (at most {MAX_CONTROLS})"
    )
