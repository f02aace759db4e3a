"""How good a scorer's predictions are against the truth: accuracy, balanced accuracy with a 95% interval, precision,
recall, F1, and the share right per group of contexts (each activation band, near misses, random silent ones).

Balanced accuracy, (recall + specificity) / 2, is the headline: it is 0.5 for any constant scorer, whatever the
share of firing contexts (fuzzing blind sets are ~1/4 true), and 1.0 for a perfect one. Its interval: each rate
with one success and one failure added (Agresti-Caffo), whose normal-approximation variances add; so a perfect
score from 10 contexts still reads as uncertain, which it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959964  # two-sided 95% normal quantile
WIDE_HALF_WIDTH = 0.1  # an interval wider than +-this gets a warning: the score cannot rank close explanations


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    balanced_accuracy: float
    interval: tuple[float, float]  # 95% interval of balanced_accuracy
    precision: float | None  # None when nothing was predicted to fire
    recall: float
    specificity: float
    f1: float
    tp: int
    fp: int
    tn: int
    fn: int


def _rate(hits: int, total: int) -> float:
    return hits / total if total else 0.0


def metrics(truth: Sequence[bool], predicted: Sequence[bool]) -> Metrics:
    """Confusion counts and the rates derived from them; both classes must be present."""
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    tn = len(truth) - tp - fp - fn
    recall, specificity = _rate(tp, tp + fn), _rate(tn, tn + fp)
    precision = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    balanced = (recall + specificity) / 2
    return Metrics(accuracy=_rate(tp + tn, len(truth)), balanced_accuracy=balanced,
                   interval=balanced_interval(tp, tp + fn, tn, tn + fp, balanced), precision=precision,
                   recall=recall, specificity=specificity, f1=f1, tp=tp, fp=fp, tn=tn, fn=fn)


def balanced_interval(tp: int, pos: int, tn: int, neg: int, balanced: float) -> tuple[float, float]:
    """95% interval of (tp/pos + tn/neg) / 2 (Agresti-Caffo adjusted rates, normal approximation), in [0, 1]."""
    var = 0.0
    for hits, total in ((tp, pos), (tn, neg)):
        p = (hits + 1) / (total + 2)
        var += p * (1 - p) / (total + 2)
    half = Z95 * math.sqrt(var) / 2
    return max(0.0, balanced - half), min(1.0, balanced + half)


def width_warning(m: Metrics, n: int) -> str | None:
    lo, hi = m.interval
    if (hi - lo) / 2 <= WIDE_HALF_WIDTH:
        return None
    return (f"{n} contexts: the 95% interval of balanced accuracy is {lo:.2f}-{hi:.2f}, so scores closer than "
            f"~{(hi - lo) / 2:.2f} do not rank explanations; score with a larger n (60 or more) before comparing")


def by_group(groups: Sequence[str], truth: Sequence[bool], predicted: Sequence[bool]) -> dict[str, tuple[int, int]]:
    """group -> (contexts, judged right), by group name (band 1, band 2, ..., decoy, near miss, silent)."""
    out: dict[str, list[int]] = {}
    for g, t, p in zip(groups, truth, predicted):
        cell = out.setdefault(g, [0, 0])
        cell[0] += 1
        cell[1] += int(t == p)
    return {g: (c[0], c[1]) for g, c in sorted(out.items())}
