"""A blind set's contexts drawn from the corpus index (scoring/runs.py ExplanationScorer.issue calls it): the feature
as the draw sees it (the windows its index entries show, its top tokens), then the model and SAE run over unseen
windows of the index, in batches (one device turn each), until enough fire and enough stay quiet. What is drawn of
the windows run, and the truth of each context, is scoring/blind_set.py's.

    feature_view(engine, examples, s, feature, index, row, col, source, min_activation)   -> blind_set.FeatureView
    draw(engine, s, feature, index, view, n, method, rng, cancel)                          -> Drawn
    window_activations(engine, s, feature, windows, cancel)                  -> the feature's activations [T] each
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput
from sae_mcp.index.samples import MAX_POS
from sae_mcp.index.scan import batch_windows_for, bos_id, windows_pad_id
from sae_mcp.index.source import ExampleSource
from sae_mcp.index.store import IndexStore, StoredScan
from sae_mcp.scoring import blind_set as sc


@dataclass(frozen=True)
class Drawn:
    """A blind set's contexts and how they were found."""

    items: list[sc.Item]
    bands: tuple[sc.Band, ...]  # of the firing candidates' own max, highest first
    short: list[tuple[sc.Band, int, int]]  # (band, its share, what it held) of the bands that fell short
    windows_run: int
    firing_windows: int  # firing candidates among them


def feature_view(engine: Engine, examples: ExampleSource, s: LoadedSAE, feature: int, index: IndexStore,
                 row: StoredScan, col: int, source: str, min_activation: float) -> sc.FeatureView:
    """The feature as the blind set needs it. Seen: every window holding an entry the index keeps of it (its
    top 50 and its interval samples, every bin), and those of its own on-demand scan when one was cached
    before the index was built (top_examples showed from it then; windows are numbered alike)."""
    length = examples.window_length(s)
    top = [(float(v), int(p)) for v, p in zip(row.top_vals[:, col], row.top_pos[:, col]) if v > 0]
    seen = set(_kept_windows(row, col, length))
    own = index.load_scan(f"feature:{feature}") if source == "index" else None
    if own is not None:
        seen.update(_kept_windows(own, 0, length))
    wins = index.get_windows(list({p // length for _, p in top}))
    counts = Counter(wins[p // length][2][p % length] for _, p in top if p // length in wins)
    top_tokens = tuple(t for t, c in counts.most_common(sc.NEAR_MISS_TOKENS) if c >= 2)
    nbos = 1 if bos_id(engine, s) is not None else 0
    return sc.FeatureView(length=length, nbos=nbos, n_windows=int(row.windows),
                          max_activation=top[0][0] if top else 0.0, seen_windows=frozenset(seen),
                          top_tokens=top_tokens, min_activation=min_activation)


def draw(engine: Engine, s: LoadedSAE, feature: int, index: IndexStore, view: sc.FeatureView, n: int, method: str,
         rng: np.random.Generator, cancel: CancelToken | None) -> Drawn:
    """n contexts of the feature drawn for `method` from unseen windows of the index (the pool `rng` orders), or
    InvalidInput when too few fire or too few stay quiet."""
    pool = sc.pool_windows(view, rng)
    tokens = {w: ids for w, (_, _, ids) in index.get_windows(pool).items()}
    span = sc.context_length([tokens[w] for w in pool if w in tokens], view.nbos)
    seen = [ids for _, _, ids in index.get_windows(list(view.seen_windows)).values()]
    view = dataclasses.replace(view, span=span, shown_grams=sc.grams(seen, span))
    usable = [w for w in pool if w in tokens and sc.long_enough(tokens[w], view)]
    ran, candidates = _scan(engine, s, feature, view, usable, tokens, n, rng, cancel)
    firing, bands, short = sc.draw_firing(candidates, n // 2, rng)
    _add_near_windows(engine, s, feature, view, usable, tokens, ran, n, cancel)
    items = sc.compose(view, firing, ran, tokens, n, method, rng)
    n_firing = sum(it.kind == "firing" for it in items)
    if min(n_firing, len(items) - n_firing) < sc.MIN_PER_CLASS:
        what = ("where it fires" if n_firing < sc.MIN_PER_CLASS else f"of {view.span} tokens where it is 0")
        raise InvalidInput(f"too few held-out contexts {what} for a blind set: of the {len(ran)} windows run "
                           f"(outside the {len(view.seen_windows)} windows its top examples and interval samples "
                           f"show, and the {sum(map(len, view.revealed.values()))} contexts of its answered blind "
                           f"sets) {len(candidates)} fire at min_activation {view.min_activation:g}; build_index "
                           "with more tokens" + (", or lower min_activation" if view.min_activation >
                                                 sc.DEFAULT_MIN_ACTIVATION else ""))
    return Drawn(items, bands, short, len(ran), len(candidates))


def _scan(engine: Engine, s: LoadedSAE, feature: int, view: sc.FeatureView, usable: list[int],
          tokens: dict[int, list[int]], n: int, rng: np.random.Generator, cancel: CancelToken | None
          ) -> tuple[dict[int, np.ndarray], list[sc.Item]]:
    """Run the usable pool windows, SCAN_BATCH at a time in their random order, until scanned_enough ->
    (window -> its activations [T], for every window run, in that order; the firing candidates among them)."""
    ran: dict[int, np.ndarray] = {}
    candidates: list[sc.Item] = []
    quiet = 0
    for i in range(0, len(usable), sc.SCAN_BATCH):
        batch = usable[i : i + sc.SCAN_BATCH]
        for w, acts in zip(batch, window_activations(engine, s, feature, [tokens[w] for w in batch], cancel)):
            ran[w] = acts
            found = sc.firing_candidate(view, w, tokens[w], acts, rng)
            candidates += [found] if found is not None else []
            quiet += bool(sc.quiet_starts(view, w, tokens[w], acts))
        if sc.scanned_enough(len(candidates), quiet, n):
            break
    return ran, candidates


def _add_near_windows(engine: Engine, s: LoadedSAE, feature: int, view: sc.FeatureView, usable: list[int],
                      tokens: dict[int, list[int]], ran: dict[int, np.ndarray], n: int,
                      cancel: CancelToken | None) -> None:
    """Run more pool windows holding a top token when those run hold too few for the near misses (twice the
    near misses wanted, and 2 spare), appended to `ran`."""
    top = set(view.top_tokens)
    holds = [w for w in usable if top.intersection(tokens[w][view.nbos :])]
    want = 2 * sc.quotas(n, bool(top))[1] + 2 - sum(w in ran for w in holds)
    more = [w for w in holds if w not in ran][: max(0, want)]
    ran.update(zip(more, window_activations(engine, s, feature, [tokens[w] for w in more], cancel)))


def _kept_windows(row: StoredScan, col: int, length: int) -> list[int]:
    """The windows of every entry a scan row keeps of a feature: its top list and its interval samples (all bins)."""
    pos = [int(p) for v, p in zip(row.top_vals[:, col], row.top_pos[:, col]) if v > 0]
    if row.samp_pos is not None:
        pos += [int(p) for p in row.samp_pos[col].ravel() if p != MAX_POS]
    return [p // length for p in pos]


def window_activations(engine: Engine, s: LoadedSAE, feature: int, windows: list[list[int]],
                       cancel: CancelToken | None = None) -> list[np.ndarray]:
    """The feature's activation at every position of each window (token ids, BOS first when the SAE has one), as
    the model computes it when it reads the window: one turn of the device, batches as a scan makes them."""
    if not windows:
        return []
    pad = windows_pad_id(engine)
    batch = batch_windows_for(engine, s, max(map(len, windows)), s.d_sae)
    out: list[np.ndarray] = []
    with engine.device_work(), torch.inference_mode():
        for i in range(0, len(windows), batch):
            if cancel is not None:
                cancel.check()
            chunk = windows[i : i + batch]
            ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)  # [B, T] right-padded
            for j, w in enumerate(chunk):
                ids[j, : len(w)] = torch.tensor(w)
            acts = engine.encode(s, engine.forward_to_hook(ids.to(engine.device), s))[..., feature]  # [B, T]
            rows = acts.float().cpu().numpy()
            out += [rows[j, : len(w)] for j, w in enumerate(chunk)]
    return out
