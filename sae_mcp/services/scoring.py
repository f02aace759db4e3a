"""Blind sets for scoring an explanation (score_explanation): which held-out corpus contexts to show, and the truth
about each, kept server-side until the predictions are in. Pure: no engine, no database (score_runs.py feeds it).

A context is `span` consecutive document tokens of one corpus window (the index's windows), with the activations
the feature has there when the model reads the whole window up to them (as the index computed them, in the model's
own dtype). Every context of a blind set has the same number of tokens, so lengths say nothing about the answer:
CONTEXT_TOKENS, or fewer when most of the corpus' documents are shorter (context_length).

Composition of a blind set of n contexts (the issue's detection / fuzzing protocol, as in EleutherAI's delphi):
    n // 2   firing     the feature's max over the context >= FIRE_FRACTION * its max activation; anchored on the
                        index's interval samples (but those top_examples(intervals=4) shows), drawn round-robin over
                        its SCORE_BANDS activation bands (top band first), topped up from firing tokens of the other
                        windows run when the samples run short
    the rest silent     the feature is exactly 0 on every token of the context; up to half of them near misses:
                        contexts holding one of NEAR_MISS_TOKENS tokens it fires on most in its top examples (at a
                        place where it does not fire), the others from random windows
Contexts with 0 < max < the threshold are never shown: neither answer would be fair. Windows holding a top example
(the top 50 the index keeps, all that top_examples can show) or a band sample top_examples(intervals=4) shows are
never used: the agent may have read them; nor any token of a context of this feature whose answers were revealed (a
submitted blind set, whatever its seed, n or method: `revealed`). No two contexts share a window or their tokens.

Fuzzing: each context shows one token marked <<like this>>: in half of the firing contexts the token of its max
activation, in the other half a decoy (a token where the feature is 0); in a near miss the top token where it does
not fire; in a random silent context a random token. The truth is whether the marked token is where it fires.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CONTEXT_TOKENS = 32  # tokens shown per context (delphi's example length): ~20-25 English words
# A context fires when its max activation reaches 1% of the feature's max. Under it, the decoder writes <1% of what
# it writes at the top example: epsilon firing no explanation is expected to cover (ReLU SAEs trained with an L1
# penalty leave many such tails). Contexts between 0 and this are left out, so no shown context has a doubtful truth.
FIRE_FRACTION = 0.01
SCORE_BANDS = 4  # activation bands by quantile, as top_examples(intervals=4) shows them
NEAR_MISS_TOKENS = 3  # the most frequent tokens of the top examples, looked for in near misses
POOL_WINDOWS = 1024  # random windows whose tokens are read to find near misses and silent contexts
MIN_PER_CLASS = 2  # fewer firing or silent contexts than this: no blind set (the score would mean nothing)
MIN_CONTEXT_TOKENS = 8  # the shortest contexts, for a corpus of short documents (one sentence a line)


@dataclass(frozen=True)
class Band:
    number: int  # 1 = the highest activations
    lower: float
    upper: float
    samples: tuple[tuple[float, int], ...]  # (activation, global position) kept by the index, uniform-sample order


@dataclass(frozen=True)
class FeatureView:
    """What the corpus index knows of one feature, as the blind set needs it."""

    length: int  # window length in tokens (BOS included)
    nbos: int  # 1 when windows start with BOS
    n_windows: int  # windows scanned: ids 0 .. n_windows - 1
    max_activation: float
    seen_windows: frozenset[int]  # windows top_examples shows: its top 50, and its intervals=4 band samples
    top_tokens: tuple[int, ...]  # most frequent token ids at the top examples, most frequent first
    bands: tuple[Band, ...]  # highest first
    span: int = CONTEXT_TOKENS  # tokens per context (context_length)
    revealed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # window -> [start, end) answered

    def open_at(self, w: int, start: int) -> bool:
        """Whether the context of `span` tokens from `start` in window w shares no token with a revealed one."""
        return all(start >= b or start + self.span <= a for a, b in self.revealed.get(w, ()))

    def was_shown(self, w: int, position: int) -> bool:
        """Whether the token at `position` of window w was in a revealed context."""
        return any(a <= position < b for a, b in self.revealed.get(w, ()))

    @property
    def threshold(self) -> float:
        return FIRE_FRACTION * self.max_activation

    def band_of(self, activation: float) -> int:
        """The band whose range holds `activation` (above the top band: 1; under the lowest: the lowest)."""
        for b in self.bands:
            if activation >= b.lower:
                return b.number
        return self.bands[-1].number if self.bands else 1


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

    def truth(self, method: str, threshold: float) -> bool:
        if method == "fuzzing":
            return self.mark is not None and self.acts[self.mark] >= threshold
        return self.kind == "firing"


@dataclass
class Plan:
    """Which windows to run, and why."""

    anchors: list[tuple[int, int]] = field(default_factory=list)  # (window, position in it) of chosen samples
    near: list[int] = field(default_factory=list)  # windows holding a top token
    silent: list[int] = field(default_factory=list)  # random windows
    extra: list[int] = field(default_factory=list)  # more random windows, when the samples run short

    def windows(self) -> list[int]:
        return list(dict.fromkeys([w for w, _ in self.anchors] + self.near + self.silent + self.extra))


def quotas(n: int, has_top_tokens: bool) -> tuple[int, int, int]:
    """(firing, near misses, random silent) for a blind set of n."""
    firing = n // 2
    near = (n - firing) // 2 if has_top_tokens else 0
    return firing, near, n - firing - near


def pool_windows(view: FeatureView, rng: np.random.Generator) -> list[int]:
    """A random sample of unseen window ids (their tokens are read to find near misses and silent contexts)."""
    size = min(view.n_windows, POOL_WINDOWS + len(view.seen_windows))
    drawn = rng.choice(view.n_windows, size=size, replace=False) if size else []
    return [int(w) for w in drawn if int(w) not in view.seen_windows][:POOL_WINDOWS]


def sample_anchors(view: FeatureView, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """Per band (highest first): the band's usable samples as (window, position), in a seeded random order."""
    out = []
    for b in view.bands:
        cands = [divmod(p, view.length) for v, p in b.samples
                 if v >= view.threshold and p // view.length not in view.seen_windows
                 and not view.was_shown(*divmod(p, view.length))]
        out.append([cands[i] for i in rng.permutation(len(cands))])
    return out


def long_enough(ids: list[int], view: FeatureView) -> bool:
    return len(ids) - view.nbos >= view.span


def context_length(pool: list[list[int]], nbos: int) -> int:
    """CONTEXT_TOKENS when at least half the pool's windows hold that many document tokens; else their median
    length (at least MIN_CONTEXT_TOKENS): a corpus of short documents still gives contexts, all of one length."""
    lengths = sorted(len(ids) - nbos for ids in pool)
    if not lengths or lengths[len(lengths) // 2] >= CONTEXT_TOKENS:
        return CONTEXT_TOKENS
    return max(MIN_CONTEXT_TOKENS, lengths[len(lengths) // 2])


def plan(view: FeatureView, tokens: dict[int, list[int]], pool: list[int], n: int,
         rng: np.random.Generator) -> Plan:
    """The windows to run: sample anchors round-robin over the bands (a few spare), windows of the pool holding a
    top token, random pool windows (twice what is needed: some have no silent stretch), and when the anchors run
    short (few samples, or most in revealed contexts) twice the shortfall in more pool windows, for firing tokens."""
    n_fire, n_near, n_silent = quotas(n, bool(view.top_tokens))
    p = Plan()
    per_band = [[a for a in band if long_enough(tokens.get(a[0], []), view)] for band in sample_anchors(view, rng)]
    used: set[int] = set()
    while len(p.anchors) < n_fire + 2 and any(per_band):
        for band in per_band:
            while band and band[0][0] in used:
                band.pop(0)
            if band and len(p.anchors) < n_fire + 2:
                w, at = band.pop(0)
                p.anchors.append((w, at))
                used.add(w)
    top = set(view.top_tokens)
    usable = [w for w in pool if w not in used and long_enough(tokens.get(w, []), view)]
    p.near = [w for w in usable if top.intersection(tokens[w][view.nbos:])][: 2 * n_near + 2]
    near = set(p.near)
    rest = [w for w in usable if w not in near]
    p.silent = rest[: 2 * (n_silent + n_near) + 2]
    short = n_fire + 2 - len(p.anchors)  # windows to read for firing tokens in their stead, twice as many
    p.extra = rest[len(p.silent) : len(p.silent) + 2 * short] if short > 0 else []
    return p


def _starts(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi + 1)) if hi >= lo else []


def silent_starts(acts: np.ndarray, nbos: int, span: int) -> np.ndarray:
    """Starts s (>= nbos) of the contexts acts[s : s + span] where the feature is 0 throughout."""
    fired = np.concatenate([[0], np.cumsum(acts > 0)])
    s = np.arange(nbos, len(acts) - span + 1)
    return s[fired[s + span] - fired[s] == 0]


def context(kind: str, w: int, start: int, span: int, ids: list[int], acts: np.ndarray) -> Item:
    end = start + span
    return Item(kind=kind, window=w, start=start, ids=list(ids[start:end]), acts=[float(a) for a in acts[start:end]])


def firing_item(view: FeatureView, w: int, at: int, ids: list[int], acts: np.ndarray,
                rng: np.random.Generator) -> Item | None:
    """The context around position `at` (placed at a random offset in it), when it fires."""
    starts = [s for s in _starts(max(view.nbos, at - view.span + 1), min(at, len(ids) - view.span))
              if view.open_at(w, s)]
    if not starts:
        return None
    item = context("firing", w, starts[int(rng.integers(len(starts)))], view.span, ids, acts)
    if max(item.acts) < view.threshold:
        return None
    item.band = view.band_of(max(item.acts))
    return item


def near_miss_item(view: FeatureView, w: int, ids: list[int], acts: np.ndarray,
                   rng: np.random.Generator) -> Item | None:
    """A silent context holding a top token (which is marked in fuzzing), or None."""
    free = {s for s in silent_starts(acts, view.nbos, view.span).tolist() if view.open_at(w, s)}
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
    starts = [s for s in silent_starts(acts, view.nbos, view.span).tolist() if view.open_at(w, s)]
    if not starts:
        return None
    item = context("silent", w, starts[int(rng.integers(len(starts)))], view.span, ids, acts)
    item.mark = int(rng.integers(view.span))
    return item


def compose(view: FeatureView, p: Plan, tokens: dict[int, list[int]], acts: dict[int, np.ndarray], n: int,
            method: str, rng: np.random.Generator) -> list[Item]:
    """The blind set's items from the windows run, in a seeded random order (the truth in no way sets it)."""
    n_fire, n_near, n_silent = quotas(n, bool(view.top_tokens))
    seen_ids: set[tuple[int, ...]] = set()
    used: set[int] = set()

    def take(item: Item | None, into: list[Item], most: int) -> None:
        if item is None or len(into) >= most or item.window in used or tuple(item.ids) in seen_ids:
            return
        into.append(item)
        used.add(item.window)
        seen_ids.add(tuple(item.ids))

    firing: list[Item] = []
    for w, at in p.anchors:
        take(firing_item(view, w, at, tokens[w], acts[w], rng), firing, n_fire)
    near: list[Item] = []
    for w in p.near:
        take(near_miss_item(view, w, tokens[w], acts[w], rng), near, n_near)
    silent: list[Item] = []
    for w in p.silent:
        take(silent_item(view, w, tokens[w], acts[w], rng), silent, n - n_fire - len(near))
    for w in [w for w in p.near + p.silent + p.extra if w not in used]:  # the samples ran short: other firing tokens
        hot = np.flatnonzero(acts[w][view.nbos:] >= view.threshold) + view.nbos
        if len(hot) and len(firing) < n_fire:
            take(firing_item(view, w, int(hot[rng.integers(len(hot))]), tokens[w], acts[w], rng), firing, n_fire)
    if method == "fuzzing":
        mark_firing(firing, rng)
    items = firing + near + silent
    return [items[i] for i in rng.permutation(len(items))]


def mark_firing(firing: list[Item], rng: np.random.Generator) -> None:
    """Fuzzing: half of the firing contexts (chosen at random) get their max token marked, the others a decoy
    (a token where the feature is 0; at the max when there is none)."""
    order = rng.permutation(len(firing))
    for rank, i in enumerate(order):
        item = firing[i]
        zeros = [j for j, a in enumerate(item.acts) if a == 0]
        decoy = rank >= (len(firing) + 1) // 2 and zeros
        item.mark = zeros[int(rng.integers(len(zeros)))] if decoy else item.max_at


def shown_text(tokens: list[str], mark: int | None = None) -> str:
    """A context as the scorer reads it: its tokens joined, newlines as ⏎, the marked token (fuzzing) <<in>>."""
    return "".join(f"<<{t}>>" if i == mark else t for i, t in enumerate(tokens)).replace("\n", "⏎")
