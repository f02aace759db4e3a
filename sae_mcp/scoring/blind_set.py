"""Blind sets for scoring an explanation (score_explanation): which held-out corpus contexts to show, and the truth
about each, kept server-side until the predictions are in. Pure: no engine, no database (runs.py feeds it).

A context is `span` consecutive document tokens of one corpus window (the index's windows), with the activations
the feature has there when the model reads the whole window up to them (as the index computed them, in the model's
own dtype). Every context of a blind set has the same number of tokens, so lengths say nothing about the answer:
CONTEXT_TOKENS, or fewer when most of the corpus' documents are shorter (context_length).

Held out: what no view shows. top_examples (any k, context, intervals 1-8, per_interval), the feature page (its
top list and 5 bands) and feature_card show only entries the index keeps of the feature: its top 50 and its
interval samples (4 per quarter-decade activation bin, index/samples.py; every band of every `intervals` is drawn
from these, and only these). A blind set never uses a window holding any of them, whatever its band (the view's
`seen_windows`), nor a context whose tokens occur, identical, in such a window (a repeated passage:
`shown_grams`), nor a token of a context of this feature whose answers were revealed (a submitted blind set,
whatever its seed, n or method: `revealed`). No two contexts share a window or their tokens.

Search: POOL_WINDOWS random unseen windows (seeded) are read; the model runs on them in that order, SCAN_BATCH at
a time, until FIRING_POOL times the firing contexts wanted were found and enough windows hold a silent stretch
(scanned_enough), or the pool is spent. At most POOL_WINDOWS windows are run.

Composition of a blind set of n contexts:
    n // 2   firing     one candidate per window run: the context around its largest activation (that a context
                        can show), when that reaches the threshold, min_activation x the feature's max activation.
                        Bands: SCORE_BANDS bands by quantile of these candidates' OWN max (bands_of); each band gets
                        an equal share (within 1) drawn at random among its candidates; a band that holds fewer than
                        its share gives what it holds, and the set is that much smaller (a warning says so)
    the rest silent     the feature is exactly 0 on every token of the context; up to half of them near misses:
                        contexts holding one of NEAR_MISS_TOKENS tokens it fires on most in its top examples (at a
                        place where it does not fire), the others from the windows run, in their random order
Contexts with 0 < max < the threshold are never shown: neither answer would be fair.

Placement: a firing context's max token has at least LEFT_SHARE of the context before it (11 of 32 tokens), at a
random place from there to the context's end; when the window has fewer tokens before it, the context starts at
the window's first document token (the most left context the window allows).

Fuzzing: each context shows one token marked <<like this>>. Of the firing contexts, half (rounded down) get a
decoy marked, a token where the feature is exactly 0, chosen at random among those that hold one; the others
their max token. A near miss shows its top token marked (where it does not fire); a random silent context a random
token. The truth is whether the marked token is where it fires: so len(firing) - len(firing) // 2 of the n marks
are true, a quarter of a full set (more only when too few firing contexts hold a 0 to carry a decoy). The blind set
and the scorer's prompt state the count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CONTEXT_TOKENS = 32  # tokens shown per context (delphi's example length): ~20-25 English words
# A context fires when its max activation reaches min_activation x the feature's max; 1% by default. Under 1%, the
# decoder writes <1% of what it writes at the top example: epsilon firing no explanation is expected to cover (ReLU
# SAEs trained with an L1 penalty leave many such tails). A larger fraction scores "where it fires clearly".
DEFAULT_MIN_ACTIVATION = 0.01
MIN_ACTIVATION_RANGE = (0.001, 0.9)  # above 0.9 hardly a context besides the top ones (which are held out) fires
SCORE_BANDS = 4  # bands of the firing contexts' own max, by quantile
LEFT_SHARE = 1 / 3  # of a firing context before its max token: "«l». He loved to eat nuts" hid "squirrel"
NEAR_MISS_TOKENS = 3  # the most frequent tokens of the top examples, looked for in near misses
POOL_WINDOWS = 1024  # random unseen windows read; the most the model runs on for one blind set
SCAN_BATCH = 64  # windows run per step (one device turn each)
FIRING_POOL = 2  # firing candidates sought per firing context wanted: the bands are quantiles of these
MIN_PER_CLASS = 2  # fewer firing or silent contexts than this: no blind set (the score would mean nothing)
MIN_CONTEXT_TOKENS = 8  # the shortest contexts, for a corpus of short documents (one sentence a line)


@dataclass(frozen=True)
class Band:
    number: int  # 1 = the highest maxima
    lower: float  # the lowest context max it holds: a context is in the first band whose lower it reaches
    upper: float  # the highest


@dataclass(frozen=True)
class FeatureView:
    """What the corpus index knows of one feature, as the blind set needs it."""

    length: int  # window length in tokens (BOS included)
    nbos: int  # 1 when windows start with BOS
    n_windows: int  # windows scanned: ids 0 .. n_windows - 1
    max_activation: float
    seen_windows: frozenset[int]  # every window holding a kept top example or a kept interval sample (any bin)
    top_tokens: tuple[int, ...]  # most frequent token ids at the top examples, most frequent first
    min_activation: float = DEFAULT_MIN_ACTIVATION  # fraction of max_activation a firing context reaches
    span: int = CONTEXT_TOKENS  # tokens per context (context_length)
    revealed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # window -> [start, end) answered
    shown_grams: frozenset[tuple[int, ...]] = frozenset()  # every run of `span` tokens of the seen windows

    def open_at(self, w: int, start: int) -> bool:
        """Whether the context of `span` tokens from `start` in window w shares no token with a revealed one."""
        return all(start >= b or start + self.span <= a for a, b in self.revealed.get(w, ()))

    def usable(self, w: int, ids: list[int], start: int) -> bool:
        """Whether the context from `start` in window w may be shown: no revealed token, not a seen passage."""
        return self.open_at(w, start) and tuple(ids[start : start + self.span]) not in self.shown_grams

    @property
    def threshold(self) -> float:
        return self.min_activation * self.max_activation


@dataclass
class Item:
    """One context of a blind set, with its truth."""

    kind: str  # 'firing' | 'near_miss' | 'silent'
    window: int
    start: int  # index in the window of the context's first token
    ids: list[int]  # the context's token ids
    acts: list[float]  # the feature's activation at each of them
    band: int | None = None  # firing contexts: the band of their max
    mark: int | None = None  # fuzzing: index in the context of the marked token

    @property
    def max_at(self) -> int:
        return int(np.argmax(self.acts))

    @property
    def top(self) -> float:
        return max(self.acts)

    def truth(self, method: str, threshold: float) -> bool:
        if method == "fuzzing":
            return self.mark is not None and self.acts[self.mark] >= threshold
        return self.kind == "firing"


def quotas(n: int, has_top_tokens: bool) -> tuple[int, int, int]:
    """(firing, near misses, random silent) for a blind set of n."""
    firing = n // 2
    near = (n - firing) // 2 if has_top_tokens else 0
    return firing, near, n - firing - near


def pool_windows(view: FeatureView, rng: np.random.Generator) -> list[int]:
    """A random sample of unseen window ids, in a random order: the windows a blind set is drawn from."""
    size = min(view.n_windows, POOL_WINDOWS + len(view.seen_windows))
    drawn = rng.choice(view.n_windows, size=size, replace=False) if size else np.empty(0, dtype=np.int64)
    return [int(w) for w in drawn if int(w) not in view.seen_windows][:POOL_WINDOWS]


def long_enough(ids: list[int], view: FeatureView) -> bool:
    return len(ids) - view.nbos >= view.span


def context_length(pool: list[list[int]], nbos: int) -> int:
    """CONTEXT_TOKENS when at least half the pool's windows hold that many document tokens; else their median
    length (at least MIN_CONTEXT_TOKENS): a corpus of short documents still gives contexts, all of one length."""
    lengths = sorted(len(ids) - nbos for ids in pool)
    if not lengths or lengths[len(lengths) // 2] >= CONTEXT_TOKENS:
        return CONTEXT_TOKENS
    return max(MIN_CONTEXT_TOKENS, lengths[len(lengths) // 2])


def grams(windows: list[list[int]], span: int) -> frozenset[tuple[int, ...]]:
    """Every run of `span` consecutive tokens of the windows."""
    return frozenset(tuple(ids[i : i + span]) for ids in windows for i in range(len(ids) - span + 1))


def context(kind: str, w: int, start: int, span: int, ids: list[int], acts: np.ndarray) -> Item:
    end = start + span
    return Item(kind=kind, window=w, start=start, ids=list(ids[start:end]), acts=[float(a) for a in acts[start:end]])


def firing_candidate(view: FeatureView, w: int, ids: list[int], acts: np.ndarray,
                     rng: np.random.Generator) -> Item | None:
    """Window w's firing context: around its largest activation among the tokens a usable context can show (so the
    context's own max is that), its max token with at least LEFT_SHARE of the context before it where the window
    allows; None when that activation is under the threshold, or no context of the window is usable."""
    starts = [s for s in range(view.nbos, len(ids) - view.span + 1) if view.usable(w, ids, s)]
    if not starts:
        return None
    shown = np.zeros(len(ids), dtype=bool)  # [T] tokens some usable context holds
    for s in starts:
        shown[s : s + view.span] = True
    at = int(np.argmax(np.where(shown, acts, -np.inf)))
    if acts[at] < view.threshold:
        return None
    holding = [s for s in starts if s <= at < s + view.span]
    left = [s for s in holding if at - s >= math.ceil(LEFT_SHARE * view.span)]
    start = left[int(rng.integers(len(left)))] if left else min(holding)  # min: the most left context there is
    return context("firing", w, start, view.span, ids, acts)


def silent_starts(acts: np.ndarray, nbos: int, span: int) -> np.ndarray:
    """Starts s (>= nbos) of the contexts acts[s : s + span] where the feature is 0 throughout."""
    fired = np.concatenate([[0], np.cumsum(acts > 0)])
    s = np.arange(nbos, len(acts) - span + 1)
    return s[fired[s + span] - fired[s] == 0]


def quiet_starts(view: FeatureView, w: int, ids: list[int], acts: np.ndarray) -> list[int]:
    """Usable starts of silent contexts in window w."""
    return [s for s in silent_starts(acts, view.nbos, view.span).tolist() if view.usable(w, ids, s)]


def near_miss_item(view: FeatureView, w: int, ids: list[int], acts: np.ndarray,
                   rng: np.random.Generator) -> Item | None:
    """A silent context holding a top token (which is marked in fuzzing), or None."""
    free = set(quiet_starts(view, w, ids, acts))
    top = set(view.top_tokens)
    choices = [(p, s) for p in range(view.nbos, len(ids)) if ids[p] in top
               for s in range(p - view.span + 1, p + 1) if s in free]
    if not choices:
        return None
    p, s = choices[int(rng.integers(len(choices)))]
    item = context("near_miss", w, s, view.span, ids, acts)
    item.mark = p - s
    return item


def silent_item(view: FeatureView, w: int, ids: list[int], acts: np.ndarray, rng: np.random.Generator) -> Item | None:
    starts = quiet_starts(view, w, ids, acts)
    if not starts:
        return None
    item = context("silent", w, starts[int(rng.integers(len(starts)))], view.span, ids, acts)
    item.mark = int(rng.integers(view.span))
    return item


def scanned_enough(firing: int, quiet: int, n: int) -> bool:
    """Whether the windows run so far suffice: FIRING_POOL x the firing contexts wanted fire, and twice the silent
    ones wanted hold a silent stretch besides the windows the firing contexts will take."""
    n_fire = n // 2
    return firing >= FIRING_POOL * n_fire and quiet - n_fire >= 2 * (n - n_fire)


# ------------------------------------------------------------------------------------------------- the bands


def bands_of(maxima: list[float], n_bands: int = SCORE_BANDS) -> tuple[Band, ...]:
    """Up to n_bands bands of (nearly) equal counts by quantile of `maxima` (the firing candidates' own max),
    highest first. Cut by rank, then read by value: band k holds the values from its lower edge (a value of
    maxima) up to the next higher band's lower edge; tied values go to the higher band, so a band all of whose
    values tie with a higher one's is merged into it."""
    m = sorted(maxima, reverse=True)
    k = min(n_bands, len(m))
    lowers = sorted({m[round((i + 1) * len(m) / k) - 1] for i in range(k)}, reverse=True)
    bands, above = [], math.inf
    for number, lower in enumerate(lowers, start=1):
        bands.append(Band(number, lower, max(v for v in m if lower <= v < above)))
        above = lower
    return tuple(bands)


def band_of(bands: tuple[Band, ...], value: float) -> int | None:
    """The number of the band holding a context of this max (None: under every band)."""
    return next((b.number for b in bands if value >= b.lower), None)


def shares(n_fire: int, n_bands: int, rng: np.random.Generator) -> list[int]:
    """n_fire split over the bands as evenly as it goes: n_fire // n_bands each, one more for n_fire % n_bands of
    them chosen at random (so no band is favoured by its place)."""
    out = [n_fire // n_bands] * n_bands
    for i in rng.choice(n_bands, size=n_fire % n_bands, replace=False).tolist():
        out[i] += 1
    return out


def draw_firing(candidates: list[Item], n_fire: int, rng: np.random.Generator
                ) -> tuple[list[Item], tuple[Band, ...], list[tuple[Band, int, int]]]:
    """(the firing contexts, the bands, [(band, its share, what it held)] of the bands that fell short): the
    candidates banded by their own max, each band's share drawn at random among its own."""
    distinct = list({tuple(c.ids): c for c in candidates}.values())  # a repeated passage counts once
    bands = bands_of([c.top for c in distinct])
    if not bands:
        return [], bands, []
    out, short = [], []
    for band, want in zip(bands, shares(n_fire, len(bands), rng)):
        mine = [c for c in distinct if band_of(bands, c.top) == band.number]
        for i in rng.permutation(len(mine))[:want].tolist():
            mine[i].band = band.number
            out.append(mine[i])
        if len(mine) < want:
            short.append((band, want, len(mine)))
    return out, bands, short


# ------------------------------------------------------------------------------------------------- the set


def compose(view: FeatureView, firing: list[Item], ran: dict[int, np.ndarray], tokens: dict[int, list[int]],
            n: int, method: str, rng: np.random.Generator) -> list[Item]:
    """The blind set: the firing contexts drawn, near misses from the windows run that hold a top token, silent
    contexts from the others (in the pool's random order, `ran`'s), in a seeded random order (the truth in no way
    sets it)."""
    n_fire, n_near, _ = quotas(n, bool(view.top_tokens))
    used = {it.window for it in firing}
    seen_ids = {tuple(it.ids) for it in firing}

    def take(item: Item | None, into: list[Item], most: int) -> None:
        if item is None or len(into) >= most or item.window in used or tuple(item.ids) in seen_ids:
            return
        into.append(item)
        used.add(item.window)
        seen_ids.add(tuple(item.ids))

    top = set(view.top_tokens)
    near: list[Item] = []
    for w in [w for w in ran if top.intersection(tokens[w][view.nbos :])]:
        take(near_miss_item(view, w, tokens[w], ran[w], rng), near, n_near)
    silent: list[Item] = []
    for w in ran:
        take(silent_item(view, w, tokens[w], ran[w], rng), silent, n - n_fire - len(near))
    if method == "fuzzing":
        mark_firing(firing, rng)
    items = firing + near + silent
    return [items[i] for i in rng.permutation(len(items))]


def mark_firing(firing: list[Item], rng: np.random.Generator) -> None:
    """Fuzzing: half of the firing contexts (rounded down), chosen at random among those holding a token where the
    feature is exactly 0, get such a token marked (a decoy); the others their max token."""
    holders = [i for i, it in enumerate(firing) if 0.0 in it.acts]
    decoys = set(rng.choice(holders, size=min(len(firing) // 2, len(holders)), replace=False).tolist()
                 if holders else [])
    for i, item in enumerate(firing):
        zeros = [j for j, a in enumerate(item.acts) if a == 0]
        item.mark = zeros[int(rng.integers(len(zeros)))] if i in decoys else item.max_at


def shown_text(tokens: list[str], mark: int | None = None) -> str:
    """A context as the scorer reads it: its tokens joined, newlines as ⏎, the marked token (fuzzing) <<in>>."""
    return "".join(f"<<{t}>>" if i == mark else t for i, t in enumerate(tokens)).replace("\n", "⏎")
