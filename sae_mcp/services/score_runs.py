"""Scoring explanations end to end: a blind set drawn from the corpus index and handed out as a challenge, then the
predictions made on it scored and stored with the explanation (score_explanation / submit_predictions).

    ExplanationScorer(services)
      .issue(sae, feature, explanation, label_id, n, method, seed, ...)  -> BlindSet (the challenge, stored)
      .submit(challenge_id, predictions, scorer)                          -> ExplanationScore (stored)
      .blind_set(challenge_id)                                            -> the BlindSet of an open challenge

What is drawn, and the truth, is scoring.py's; the rates are score_metrics.py's. Here: reading the feature's row
of the index (an on-demand scan of it when there is no index, as top_examples does), running the model and SAE
over the chosen windows (one device turn, in batches), and the challenge's rules: it expires CHALLENGE_TTL_S after
it was handed out, is answered once, and no token of a context whose answers were revealed (a submitted challenge
of the feature) is shown blind again: new blind sets leave them out, and an open challenge that holds one is
refused. So a seed gives the same contexts as long as no blind set of the feature is answered in between.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from sae_mcp.engine.runtime import CancelToken
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.engine.samples import FINE_PER_BIN
from sae_mcp.engine.scan import HIST_BINS, batch_windows_for, bos_id, hist_edges, windows_pad_id
from sae_mcp.errors import InvalidInput, NotFound
from sae_mcp.results import rounded
from sae_mcp.results.scoring import BlindContext, BlindSet, ExplanationScore
from sae_mcp.services import scoring as sc
from sae_mcp.services.example_source import DEFAULT_CONTEXT, Progress
from sae_mcp.services.example_view import MAX_PER_INTERVAL, Windows, band_samples, merge_identical, quantile_bands
from sae_mcp.services.score_results import score_result
from sae_mcp.store.index import IndexStore, StoredScan
from sae_mcp.store.scores import Challenge

# Long enough to read 100 contexts and answer; short enough that a forgotten challenge is not answered after its
# contexts have been looked up with other tools (get_feature_acts on a context gives its answer away).
CHALLENGE_TTL_S = 30 * 60
QUESTIONS = {
    "detection": "true = the explanation says the feature fires on some token of the context; false = nowhere",
    "fuzzing": "true = the marked <<token>> is one the explanation says the feature fires on; false = it is not",
}


class ExplanationScorer:
    def __init__(self, services: Any):
        self.services = services
        self.engine = services.engine
        # Checking that a challenge is still blind and storing its score are one step: two overlapping challenges
        # submitted at once must not both pass the check before either is stored.
        self._submitting = threading.Lock()

    # -- handing out a blind set ----------------------------------------------------------------------------------

    def issue(self, sae: str | None, feature: int, explanation: str | None, label_id: int | None, n: int,
              method: str, seed: int | None, auto: bool = False, progress: Progress | None = None,
              cancel: CancelToken | None = None) -> BlindSet:
        s = self.engine.sae(sae)
        self.engine.check_feature(s, feature)
        text, label_id = self._explanation(s, feature, explanation, label_id)
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        index, row, col, source = self.services.examples.feature_row(s.key, feature, progress=progress,
                                                                     cancel=cancel)
        view = self._view(s, index, row, col)
        if view.max_activation <= 0:
            raise InvalidInput(f"feature {feature} never fired in the {row.tokens:,} tokens scanned: there is nothing "
                               "to score; build_index with more tokens, or score a feature that fires")
        set_key = hashlib.sha1(json.dumps([s.store_key, feature, method, n, seed, str(index.path), row.tokens,
                                           row.windows]).encode()).hexdigest()
        view = dataclasses.replace(view, revealed=_spans(self.services.scores.revealed(s.store_key, feature)))
        items = self._draw(s, feature, index, view, n, method, np.random.default_rng(seed), cancel)
        return self._hand_out(s, feature, text, label_id, method, n, seed, set_key, view, items, source, row, auto)

    def _explanation(self, s: LoadedSAE, feature: int, text: str | None, label_id: int | None
                     ) -> tuple[str, int | None]:
        """The text to score and the label it is (by id, else the newest label of the feature with that text)."""
        store = self.services.scores
        if label_id is not None:
            found = store.label(label_id)
            if found is None or found[:2] != (s.store_key, feature):
                raise NotFound(f"label_id {label_id} is not a label of feature {feature} of SAE {s.key}; "
                               "label_feature returns the ids (or pass the explanation text)")
            if text is not None and text.strip() != found[2]:
                raise InvalidInput(f"label {label_id} reads {found[2]!r}, not the explanation given; pass one of them")
            return found[2], label_id
        text = (text or "").strip()
        if not text:
            raise InvalidInput("no explanation given: pass `explanation` (the text to score) or a `label_id`")
        return text, store.label_id_of(s.store_key, feature, text)

    def _view(self, s: LoadedSAE, index: IndexStore, row: StoredScan, col: int) -> sc.FeatureView:
        length = self.services.examples.window_length(s)
        top = [(float(v), int(p)) for v, p in zip(row.top_vals[:, col], row.top_pos[:, col]) if v > 0]
        seen = frozenset(p // length for _, p in top)
        wins = index.get_windows(list(seen))
        counts = Counter(wins[p // length][2][p % length] for _, p in top if p // length in wins)
        top_tokens = tuple(t for t, c in counts.most_common(sc.NEAR_MISS_TOKENS) if c >= 2)
        nbos = 1 if bos_id(self.engine, s) is not None else 0
        bands, shown = self._unshown(_bands(row, col, top), index, length, nbos)
        return sc.FeatureView(length=length, nbos=nbos, n_windows=int(row.windows),
                              max_activation=top[0][0] if top else 0.0, seen_windows=seen | shown,
                              top_tokens=top_tokens, bands=bands)

    def _unshown(self, bands: tuple[sc.Band, ...], index: IndexStore, length: int, nbos: int
                 ) -> tuple[tuple[sc.Band, ...], frozenset[int]]:
        """(the bands without the samples top_examples(intervals=4) shows, the windows of those): it shows the
        first MAX_PER_INTERVAL distinct contexts of each band (at the default context); every sample whose shown
        context is identical to one of those is left out too. The agent may have read them."""
        positions = [p for b in bands for _, p in b.samples]
        wins = Windows(self.engine, index, length, nbos, DEFAULT_CONTEXT, positions)
        out, windows = [], set()
        for b in bands:
            shown, _ = merge_identical(list(b.samples), wins.key, MAX_PER_INTERVAL)
            keys = {wins.key(p) for _, p, _ in shown}
            windows.update(p // length for _, p, _ in shown)
            out.append(dataclasses.replace(b, samples=tuple((v, p) for v, p in b.samples if wins.key(p) not in keys)))
        return tuple(out), frozenset(windows)

    def _draw(self, s: LoadedSAE, feature: int, index: IndexStore, view: sc.FeatureView, n: int, method: str,
              rng: np.random.Generator, cancel: CancelToken | None) -> list[sc.Item]:
        pool = sc.pool_windows(view, rng)
        anchors = {p // view.length for b in view.bands for _, p in b.samples}
        tokens = {w: ids for w, (_, _, ids) in index.get_windows(list(anchors - view.seen_windows) + pool).items()}
        view = dataclasses.replace(view, span=sc.context_length([tokens[w] for w in pool if w in tokens], view.nbos))
        plan = sc.plan(view, tokens, pool, n, rng)
        run = plan.windows()
        acts = dict(zip(run, window_activations(self.engine, s, feature, [tokens[w] for w in run], cancel)))
        items = sc.compose(view, plan, tokens, acts, n, method, rng)
        firing = sum(it.kind == "firing" for it in items)
        if min(firing, len(items) - firing) < sc.MIN_PER_CLASS:
            what = "where it fires" if firing < sc.MIN_PER_CLASS else f"of {view.span} tokens where it is 0"
            raise InvalidInput(f"too few held-out contexts {what} (outside its top examples' windows and the "
                               f"{sum(map(len, view.revealed.values()))} contexts of its answered blind sets) for a "
                               f"blind set: the index has {view.n_windows} windows; build_index with more tokens")
        return items

    def _hand_out(self, s: LoadedSAE, feature: int, text: str, label_id: int | None, method: str, n: int, seed: int,
                  set_key: str, view: sc.FeatureView, items: list[sc.Item], source: str, row: StoredScan,
                  auto: bool) -> BlindSet:
        now = time.time()
        cid = "ch_" + secrets.token_hex(6)
        answers = []
        contexts = []
        for i, it in enumerate(items):
            toks = self.engine.str_tokens(torch.tensor(it.ids))
            contexts.append(BlindContext(id=str(i + 1), text=sc.shown_text(toks, it.mark if method == "fuzzing"
                                                                               else None)))
            answers.append(_answer(str(i + 1), it, toks, method, view.threshold))
        warnings = [f"{len(items)} contexts, not {n}: the index holds too few usable ones; build_index with more "
                    "tokens for a full set" if len(items) < n else None,
                    f"from an on-demand scan of this feature over {row.tokens:,} tokens (no index); build_index "
                    "draws from more text" if source == "scan" else None]
        blind = BlindSet(challenge_id=cid, sae=s.key, feature=feature, explanation=text, method=method, seed=seed,
                         expires_in_s=CHALLENGE_TTL_S, question=QUESTIONS[method], contexts=contexts,
                         warnings=[w for w in warnings if w] or None)
        self.services.scores.add_challenge(Challenge(
            id=cid, sae=s.store_key, feature=feature, explanation=text, label_id=label_id, method=method, n=len(items),
            seed=seed, set_key=set_key, created=now, expires=now + CHALLENGE_TTL_S, auto=auto,
            blind=blind.model_dump(mode="json"),
            answers={"items": answers, "threshold": view.threshold,
                     "bands": [[b.number, max(b.lower, float(f"{view.threshold:.4g}")), b.upper] for b in view.bands]}))
        return blind

    def blind_set(self, challenge_id: str) -> BlindSet:
        c = self._open(challenge_id)
        return BlindSet(**{**c.blind, "expires_in_s": max(0, int(c.expires - time.time()))})

    # -- scoring the predictions ------------------------------------------------------------------------------------

    def submit(self, challenge_id: str, predictions: dict[str, bool], scorer: str = "agent") -> ExplanationScore:
        c = self._open(challenge_id)
        ids = [a["id"] for a in c.answers["items"]]
        unknown = [k for k in predictions if k not in set(ids)]
        missing = [i for i in ids if i not in predictions]
        if unknown or missing:
            parts = ([f"no context has the id(s) {_ids(unknown)}"] if unknown else []) + \
                    ([f"no prediction for the id(s) {_ids(missing)}"] if missing else [])
            raise InvalidInput(f"challenge {challenge_id}: {'; '.join(parts)}. Give true or false for every context "
                               f"id ({ids[0]}..{ids[-1]}) and nothing else; the challenge stays open")
        result = score_result(c, predictions, scorer)
        with self._submitting:
            self._open(challenge_id)  # again, now that no other submission can store meanwhile
            score_id = self.services.scores.record(c, result.metrics.model_dump(mode="json"), scorer)
        if score_id is None:
            raise InvalidInput(f"challenge {challenge_id} was answered meanwhile by another submission; a challenge "
                               "is scored once: call score_explanation again for a new blind set")
        result.score_id = score_id
        result.label_id = c.label_id or self.services.scores.label_id_of(c.sae, c.feature, c.explanation)
        return result

    def _open(self, challenge_id: str) -> Challenge:
        """The challenge if it can still be answered, else an error saying why and what to do."""
        c = self.services.scores.challenge(challenge_id)
        if c is None:
            raise NotFound(f"no challenge {challenge_id!r}: use the challenge_id score_explanation returned (ids "
                           "look like 'ch_3f9a1c2b7d04'), or call score_explanation for a new one")
        if c.submitted is not None:
            raise InvalidInput(f"challenge {challenge_id} was already answered (score {c.score_id}): a challenge is "
                               "answered once, since its answers are now known; call score_explanation again for a "
                               "new blind set (it leaves answered contexts out)")
        shared = _shared(c, self.services.scores.revealed(c.sae, c.feature))
        if shared:
            raise InvalidInput(f"challenge {challenge_id} shares tokens of {shared[1]} context(s) with challenge "
                               f"{shared[0]}, whose answers were revealed: it is no longer blind; call "
                               "score_explanation again (new blind sets leave answered contexts out)")
        late = time.time() - c.expires
        if late > 0:
            raise InvalidInput(f"challenge {challenge_id} expired {late / 60:.0f} min ago (challenges last "
                               f"{CHALLENGE_TTL_S // 60} min); call score_explanation again (seed {c.seed} gives the "
                               "same contexts)")
        return c


def _spans(revealed: list[tuple[str, int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    """window -> the [start, end) of its revealed contexts."""
    out: dict[int, list[tuple[int, int]]] = {}
    for _, w, a, b in revealed:
        out.setdefault(w, []).append((a, b))
    return out


def _shared(c: Challenge, revealed: list[tuple[str, int, int, int]]) -> tuple[str, int] | None:
    """(the first other challenge whose revealed contexts share tokens with c's, how many of c's they touch)."""
    by: dict[str, int] = {}
    for cid, w, a, b in revealed:
        if cid != c.id:
            by[cid] = by.get(cid, 0) + sum(x["window"] == w and x["start"] < b and a < x["start"] + len(x["tokens"])
                                           for x in c.answers["items"])
    return next(((cid, k) for cid, k in by.items() if k), None)


def _ids(ids: list[str], most: int = 10) -> str:
    return ", ".join(map(repr, ids[:most])) + (f" and {len(ids) - most} more" if len(ids) > most else "")


def _bands(row: StoredScan, col: int, top: list[tuple[float, int]]) -> tuple[sc.Band, ...]:
    """The feature's activation bands by quantile (as top_examples(intervals=4) shows them), highest first, with
    the index's interval samples in each, in top_examples' order (none for an index written before samples were
    kept)."""
    has = row.samp_pos is not None and row.samp_vals is not None
    fine_per = HIST_BINS // row.samp_pos.shape[1] if has else FINE_PER_BIN
    bands = quantile_bands(row.hist[col], sc.SCORE_BANDS, fine_per)
    if not bands:
        return ()
    edges = hist_edges()
    first_fine = int(np.flatnonzero(row.hist[col])[0])
    out = []
    for number, b in enumerate(reversed(bands), start=1):
        lower = edges[max(b.lo * fine_per, first_fine)]
        upper = top[0][0] if number == 1 and top else edges[b.hi * fine_per]
        samples = tuple(band_samples(row.samp_pos[col], row.samp_vals[col], b)) if has else ()
        out.append(sc.Band(number=number, lower=float(f"{lower:.4g}"), upper=float(f"{upper:.4g}"), samples=samples))
    return tuple(out)


def _answer(cid: str, it: sc.Item, toks: list[str], method: str, threshold: float) -> dict[str, Any]:
    """What the server keeps of a context until the predictions are in."""
    mark = it.mark if method == "fuzzing" else None
    return {"id": cid, "kind": it.kind, "band": it.band, "truth": it.truth(method, threshold),
            "max": rounded(max(it.acts)), "max_at": it.max_at, "mark": mark,
            "mark_act": None if mark is None else rounded(it.acts[mark]), "tokens": toks, "window": it.window,
            "start": it.start}


def window_activations(engine: Any, s: LoadedSAE, feature: int, windows: list[list[int]],
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
            acts = acts.float().cpu().numpy()
            out += [acts[j, : len(w)] for j, w in enumerate(chunk)]
    return out
