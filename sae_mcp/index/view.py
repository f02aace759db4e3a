"""What top_examples shows from a scan row (the index's or an on-demand scan's): the top list with identical
shown contexts merged, and interval samples per activation band.

    View(k, context, intervals, per_interval, merge)     what was asked
    show(engine, index, row, col, length, nbos, view)    -> the result's examples/intervals/warnings fields
    quantile_bands(fine_hist, n, fine_per_bin)           -> up to n bands of whole sample bins, by quantile
    merge_identical(cands, key_of, limit)                -> the first `limit` distinct contexts with their counts

Identical contexts: candidates whose shown tokens (and max-token position in them) are identical are listed once,
the first one (largest activation; for samples, smallest hash key) standing for all, with `count` = how many of
the candidates showed them. Candidates: the kept top 50 for the top list; the band's kept samples for a band.

Bands: the feature's firing tokens split by quantile into at most N bands of whole sample bins (quarter decades;
index/samples.py), since only a band of whole bins gets an exact uniform sample from the bins' kept entries: the
first S = 4 by key are a uniform sample of the band's tokens without replacement (later ones, used only when
duplicates were merged, lean towards sparser bins). A bin goes to band floor(N * mid-quantile) (its tokens' mean
rank; an empty bin joins the band below it), so a bin holding over 1/N of the tokens makes fewer, wider bands.
Token counts are the histogram's, exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.index.samples import MAX_POS, SAMPLES_PER_BIN, pos_hash
from sae_mcp.index.state import HIST_BINS, hist_edges
from sae_mcp.index.store import IndexStore, StoredScan
from sae_mcp.results import collect_warnings, rounded
from sae_mcp.results.corpus import Example, Interval

MAX_INTERVALS = 8
DEFAULT_PER_INTERVAL = 3
MAX_PER_INTERVAL = SAMPLES_PER_BIN  # an exact uniform sample of a band holds up to S tokens


@dataclass(frozen=True)
class View:
    k: int  # top examples
    context: int  # tokens shown each side of the max token
    intervals: int = 0  # bands (0: none)
    per_interval: int = DEFAULT_PER_INTERVAL  # examples per band
    merge: bool = True  # identical shown contexts once (False: the raw top-k, for tests of the scan itself)


@dataclass(frozen=True)
class Context:
    """What an example was cut from, to recompute its activations (the feature pages shade every token): the
    window's token ids up to its last shown token (BOS first when the window has one), and where the shown tokens
    begin in them. A token's activation depends on all of its window before it, so that whole prefix is needed."""

    ids: list[int]
    lo: int
    bos_shown: bool  # the first shown token is the window's BOS


@dataclass(frozen=True)
class Band:
    lo: int  # first sample bin
    hi: int  # one past the last
    tokens: int
    q_lo: float
    q_hi: float


def quantile_bands(fine: np.ndarray, n: int, fine_per_bin: int) -> list[Band]:
    """[NB] histogram counts -> at most n bands of whole sample bins over the used range, lowest first."""
    coarse = fine.reshape(-1, fine_per_bin).sum(1).astype(np.float64)  # [SB]
    total = coarse.sum()
    if total == 0 or n < 1:
        return []
    used = np.nonzero(coarse)[0]
    after = np.cumsum(coarse)
    before = after - coarse
    band_of = np.minimum(n - 1, np.floor(n * (before + coarse / 2) / total)).astype(int)  # nondecreasing
    band_of = np.maximum.accumulate(np.where(coarse > 0, band_of, 0))  # an empty bin joins the band below it
    bands, start = [], int(used[0])
    for i in range(start + 1, int(used[-1]) + 2):
        if i > used[-1] or band_of[i] != band_of[start]:
            bands.append(Band(start, i, int(coarse[start:i].sum()), float(before[start] / total),
                              float(after[i - 1] / total)))
            start = i
    return bands


def merge_identical(cands: list[tuple[float, int]], key_of: Callable[[int], tuple], limit: int
                    ) -> tuple[list[tuple[float, int, int]], int]:
    """Candidates (activation, position) in order -> ([(activation, position, count)] of the first `limit`
    distinct shown contexts, the number of candidates folded into them)."""
    groups: dict[tuple, list] = {}
    for v, p in cands:
        g = groups.setdefault(key_of(p), [v, p, 0])
        g[2] += 1
    shown = [(v, p, c) for v, p, c in list(groups.values())[:limit]]
    return shown, sum(c - 1 for _, _, c in shown)


class Windows:
    """The windows of a set of positions, read once, and what each position shows."""

    def __init__(self, engine: Engine, index: IndexStore, length: int, nbos: int, context: int, positions):
        self.engine, self.length, self.nbos, self.context = engine, length, nbos, context
        self.wins = index.get_windows([p // length for p in positions])
        self.contexts: dict[tuple[int, int], Context] = {}  # (document, offset) of each example made -> its context

    def _span(self, p: int) -> tuple[list[int], int, int, int, int]:
        w, at = divmod(p, self.length)
        document, start, ids = self.wins[w]
        return ids, at, max(0, at - self.context), min(len(ids), at + self.context + 1), document

    def key(self, p: int) -> tuple:
        ids, at, lo, hi, _ = self._span(p)
        return tuple(ids[lo:hi]), at - lo

    def example(self, v: float, p: int, count: int = 1) -> Example:
        ids, at, lo, hi, document = self._span(p)
        start = self.wins[p // self.length][1]
        tokens = self.engine.str_tokens(torch.tensor(ids[lo:hi]))
        self.contexts[(document, start + at - self.nbos)] = Context(ids[:hi], lo, self.nbos > 0 and lo == 0)
        return Example(activation=shown_activation(v), token=tokens[at - lo], tokens=tokens, position=at - lo,
                       document=document, offset=start + at - self.nbos, count=count if count > 1 else None)


def shown_activation(v: float) -> float:
    """4 decimals, and at least 4 significant digits (a low band's 0.0003162 would read 0.0003)."""
    return rounded(v, max(4, 3 - math.floor(math.log10(v)))) if v > 0 else 0.0


def band_samples(samp_pos: np.ndarray, samp_vals: np.ndarray, band: Band) -> list[tuple[float, int]]:
    """One feature's kept samples [SB, S] in the band's bins -> (activation, position) in key order."""
    p = samp_pos[band.lo : band.hi].reshape(-1)
    v = samp_vals[band.lo : band.hi].reshape(-1)
    real = p != MAX_POS
    p, v = p[real], v[real]
    order = np.argsort(pos_hash(torch.from_numpy(p.astype(np.int64))).numpy(), kind="stable")
    return [(float(v[i]), int(p[i])) for i in order]


def show(engine: Engine, index: IndexStore, row: StoredScan, col: int, length: int, nbos: int, view: View,
         source: str, contexts: dict | None = None) -> dict:
    """The row's column `col` as TopExamples' fields: examples, merged_duplicates, intervals, warnings. A dict
    given as `contexts` receives each shown example's Context, keyed by its (document, offset)."""
    cands = [(float(v), int(p)) for v, p in zip(row.top_vals[:, col], row.top_pos[:, col]) if v > 0]  # sorted
    has_samples, fine_per = False, 0
    bands: list[Band] = []
    samples: list[list[tuple[float, int]]] = []  # per band: (activation, position) sampled in it
    if row.samp_pos is not None and row.samp_vals is not None:  # [d_sae, samples per feature] each
        has_samples, fine_per = True, HIST_BINS // row.samp_pos.shape[1]
        bands = quantile_bands(row.hist[col], view.intervals, fine_per) if view.intervals else []
        samples = [band_samples(row.samp_pos[col], row.samp_vals[col], b) for b in bands]
    shown_at = [p for _, p in cands] + [p for s in samples for _, p in s]
    wins = Windows(engine, index, length, nbos, view.context, shown_at)
    top, merged = _pick(cands, wins, view.k, view.merge)
    intervals = None
    if view.intervals and has_samples:
        max_act = cands[0][0] if cands else 0.0
        first_fine = int(np.nonzero(row.hist[col])[0][0]) if bands else 0
        intervals = [_interval(b, s, wins, view, fine_per, first_fine, max_act, top=i == len(bands) - 1)
                     for i, (b, s) in reversed(list(enumerate(zip(bands, samples))))]
    warnings = collect_warnings(
        _never_fired(row, col, source),
        _no_samples(source) if view.intervals and not has_samples else None,
        _few_distinct(len(top), len(cands), view) if view.merge else None,
        _few_bands(len(bands), view.intervals) if intervals is not None else None,
    )
    examples = [wins.example(*t) for t in top]
    if contexts is not None:
        contexts.update(wins.contexts)
    return dict(examples=examples, merged_duplicates=merged or None, intervals=intervals, warnings=warnings)


def _pick(cands: list[tuple[float, int]], wins: Windows, limit: int, merge: bool
          ) -> tuple[list[tuple[float, int, int]], int]:
    if merge:
        return merge_identical(cands, wins.key, limit)
    return [(v, p, 1) for v, p in cands[:limit]], 0


def _interval(band: Band, cands: list[tuple[float, int]], wins: Windows, view: View, fine_per: int,
              first_fine: int, max_act: float, top: bool) -> Interval:
    shown, merged = _pick(cands, wins, view.per_interval, view.merge)
    shown.sort(key=lambda t: (-t[0], t[1]))  # largest first, as the top list
    edges = hist_edges()
    lo_fine = max(band.lo * fine_per, first_fine)
    return Interval(
        lower=0.0 if lo_fine == 0 else float(f"{edges[lo_fine]:.4g}"),
        upper=shown_activation(max_act) if top else float(f"{edges[band.hi * fine_per]:.4g}"),
        quantiles=[rounded(band.q_lo, 3), rounded(band.q_hi, 3)], tokens=band.tokens,
        examples=[wins.example(*t) for t in shown], merged_duplicates=merged or None,
    )


def _never_fired(row: StoredScan, col: int, source: str) -> str | None:
    if int(row.n_fired[col]) > 0:
        return None
    more = "build_index with more tokens" if source == "index" else "a larger max_scan_tokens"
    return f"the feature never fired in the {row.tokens:,} scanned tokens: no examples; {more} may find some"


def _no_samples(source: str) -> str:
    if source == "index":
        return ("no intervals: this index was built before interval samples were recorded; call build_index again "
                "(or run `sae-mcp index`): it rebuilds such an index from the start, with samples")
    return ("no intervals: this cached scan was stored before interval samples were recorded; a new scan records "
            "them (top_examples rescans such a feature when no index exists; or call build_index)")


def _few_distinct(shown: int, n_cands: int, view: View) -> str | None:
    if shown >= view.k or n_cands <= shown:
        return None
    return (f"only {shown} distinct contexts among the {n_cands} top activations kept (identical shown tokens, "
            f"{view.context} each side, are listed once, with their count): the feature fires on repeated text, or "
            f"{view.context} tokens each side are too few to tell its contexts apart; a larger `context` shows "
            "which, and intervals show the rest of its range")


def _few_bands(n_bands: int, asked: int) -> str | None:
    if n_bands == 0 or n_bands >= asked:
        return None
    return (f"{n_bands} bands, not {asked}: bands are made of whole quarter-decade activation bins (so that their "
            "samples are uniform), and this feature's activations fill few of them or crowd into one")
