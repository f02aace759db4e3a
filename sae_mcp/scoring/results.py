"""A challenge's predictions -> the ExplanationScore result (rates, per group, the contexts misjudged with their
activations), whether its contexts were looked up before it was answered, and stored scores -> the short form shown
beside explanations."""

from __future__ import annotations

import math
import re
from typing import Any

from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.scoring import ExplanationScore, GroupScore, Misjudged, ScoreBrief, ScoreMetrics
from sae_mcp.scoring.blind_set import DEFAULT_MIN_ACTIVATION
from sae_mcp.scoring.metrics import Metrics, by_group, metrics, width_warning
from sae_mcp.scoring.store import Challenge, StoredScore


def group_of(a: dict[str, Any]) -> str:
    """'band k' for a firing context (fuzzing: with its max token marked), 'decoy' (fuzzing: firing context, a
    silent token marked), 'near miss', 'silent'."""
    if a["kind"] == "firing":
        return "decoy" if a["mark"] is not None and not a["truth"] else f"band {a['band']}"
    return "near miss" if a["kind"] == "near_miss" else "silent"


def marked_text(a: dict[str, Any], threshold: float) -> str:
    """The context with its max token in «» when it fires, and (fuzzing) the marked token in << >> as shown."""
    out = []
    for i, t in enumerate(a["tokens"]):
        t = f"<<{t}>>" if i == a["mark"] else t
        out.append(f"«{t}»" if i == a["max_at"] and a["max"] >= threshold else t)
    return "".join(out).replace("\n", "⏎")


def _shown(x: float | None) -> float | None:
    """A band edge as shown: 4 significant digits (the stored edge is the exact activation)."""
    return None if x is None else float(f"{x:.4g}")


def metrics_model(m: Metrics) -> ScoreMetrics:
    return ScoreMetrics(
        balanced_accuracy=rounded(m.balanced_accuracy), interval_95=[rounded(m.interval[0]), rounded(m.interval[1])],
        accuracy=rounded(m.accuracy), precision=None if m.precision is None else rounded(m.precision),
        recall=rounded(m.recall), specificity=rounded(m.specificity), f1=rounded(m.f1),
        counts={"tp": m.tp, "fp": m.fp, "tn": m.tn, "fn": m.fn},
    )


def score_result(c: Challenge, predictions: dict[str, bool], scorer: str) -> ExplanationScore:
    """The score of `predictions` (every context id -> bool) on the challenge; score_id 0 until it is stored."""
    items = c.answers["items"]
    threshold = float(c.answers["threshold"])
    truth = [bool(a["truth"]) for a in items]
    said = [bool(predictions[a["id"]]) for a in items]
    m = metrics(truth, said)
    bands = {f"band {number}": (lo, hi) for number, lo, hi in c.answers["bands"]}
    groups = [GroupScore(group=g, lower=_shown(bands.get(g, (None, None))[0]),
                         upper=_shown(bands.get(g, (None, None))[1]), n=k, correct=right)
              for g, (k, right) in by_group([group_of(a) for a in items], truth, said).items()]
    wrong = [Misjudged(id=a["id"], predicted=p, truth=t, group=group_of(a), max_activation=a["max"],
                       marked_activation=a["mark_act"], text=marked_text(a, threshold))
             for a, t, p in zip(items, truth, said) if t != p]
    return ExplanationScore(
        score_id=0, challenge_id=c.id, sae=c.blind["sae"], feature=c.feature, explanation=c.explanation,
        method=c.method, n=len(items), seed=c.seed,
        min_activation=float(c.answers.get("min_activation", DEFAULT_MIN_ACTIVATION)), scorer=scorer,
        label_id=c.label_id, metrics=metrics_model(m),
        groups=groups, misjudged=wrong, warnings=collect_warnings(width_warning(m, len(items))),
    )


# A context counts as looked up when a call's text holds at least this share of the context's text in one piece
# (whitespace, the ⏎ of line breaks and the fuzzing marks aside): the activations on it were shown.
LOOKUP_SHARE = 0.5
SPACE = re.compile(r"\s+")


def plain(text: str) -> str:
    """Text as compared for look-ups: ⏎ as a line break, no <<marks>>, each run of whitespace one space."""
    return SPACE.sub(" ", text.replace("⏎", "\n").replace("<<", "").replace(">>", "")).strip()


def holds(text: str, piece: str) -> bool:
    """Whether `text` holds at least LOOKUP_SHARE of `piece` in one piece (both plain)."""
    k = max(1, math.ceil(LOOKUP_SHARE * len(piece)))
    return any(piece[i : i + k] in text for i in range(len(piece) - k + 1))


def looked_up(items: list[dict[str, Any]], calls: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(context id, the tools whose text held it)] for the contexts of a challenge (its answers' items) that the
    calls' texts [(tool, text)] held."""
    texts = [(tool, plain(t)) for tool, t in calls]
    out = []
    for a in items:
        piece = plain("".join(a["tokens"]))
        tools = sorted({tool for tool, t in texts if piece and holds(t, piece)})
        if tools:
            out.append((a["id"], tools))
    return out


def not_blind_warning(seen: list[tuple[str, list[str]]]) -> str:
    tools = sorted({t for _, ts in seen for t in ts})
    return (f"not blind: this conversation ran {', '.join(tools)} on the text of context(s) "
            f"{', '.join(i for i, _ in seen)} after the set was handed out, so the score measures the look-up, not the "
            "explanation; call score_explanation again and answer the new set from the explanation alone")


def brief(s: StoredScore) -> ScoreBrief:
    return ScoreBrief(method=s.method, balanced_accuracy=s.metrics["balanced_accuracy"], n=s.n, score_id=s.id)


def brief_text(scores: list[ScoreBrief] | None) -> str:
    """'detection 0.85 (n=20)' per method, newest first; '' when never scored."""
    return "; ".join(f"{b.method} {b.balanced_accuracy:.2f} (n={b.n})" for b in scores or [])
