"""Scoring explanations end to end: a blind set drawn from the corpus index and handed out as a challenge, then the
predictions made on it scored and stored with the explanation (score_explanation / submit_predictions).

    ExplanationScorer(services)
      .issue(BlindSetRequest(sae, feature, explanation, label_id, n, method, seed, ...), progress, cancel)
                                                  -> Issued: the BlindSet (stored) and its submit secret (not stored)
      .submit(challenge_id, submit_secret, predictions, scorer, session)
                                                  -> ExplanationScore (stored)
      .blind_set(challenge_id)                    -> the BlindSet of an open challenge

What is drawn, and the truth, is scoring/blind_set.py's; the rates are scoring/metrics.py's; running the model and
SAE over the windows searched (in batches, one device turn each) is scoring/draw.py's. Here: reading the feature's
row of the index (an on-demand scan of it when there is no index, as top_examples does), and the challenge's rules:
- it expires CHALLENGE_TTL_S after it was handed out, and is answered once;
- answering needs its id (public: the ledger, replay and the two-step CLI flow use it) and its submit secret, a
  random token handed out once with the blind set; the store keeps only its SHA-256, so the ledger, exports,
  pages and cards never hold it, and another conversation that reads the id cannot answer in its owner's stead;
- no token of a context whose answers were revealed (a submitted challenge of the feature) is shown blind again:
  new blind sets leave them out, and an open challenge that holds one is refused. So a seed gives the same
  contexts as long as no blind set of the feature is answered in between;
- a score says it is not blind (looked_up) when the conversation the set was handed to (or the one submitting) ran
  a tool that shows activations on a given text (its ledger rule says looks_up) on text holding a context, after
  the set was handed out: the ledger records every call with its conversation, and is read here (never written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import InvalidInput, NotFound
from sae_mcp.index.source import ExampleSource, Progress
from sae_mcp.index.store import StoredScan
from sae_mcp.ledger.recording import Ledger
from sae_mcp.ledger.rule import Recorded, tools_where
from sae_mcp.results import rounded
from sae_mcp.results.scoring import BlindContext, BlindSet, ExplanationScore
from sae_mcp.scoring import blind_set as sc
from sae_mcp.scoring.draw import Drawn, draw, feature_view
from sae_mcp.scoring.results import looked_up, not_blind_warning, score_result
from sae_mcp.scoring.store import Challenge, ScoreStore

# Long enough to read 100 contexts and answer; short enough that a forgotten challenge is not answered after its
# contexts have been looked up with other tools (get_feature_acts on a context gives its answer away).
CHALLENGE_TTL_S = 30 * 60
SECRET_BYTES = 16  # 128 random bits: a submit secret is not guessed
LOOKUP_RUNS = 1000  # newest runs of each such tool read per conversation (a challenge lasts 30 min)


@dataclass(frozen=True)
class BlindSetRequest:
    """One blind set asked for: the feature, the explanation it scores, how its contexts are drawn, for whom."""

    sae: str | None  # the SAE's key; None = the default SAE
    feature: int  # the feature the explanation is of
    explanation: str | None  # the text to score; None = the text of label_id
    label_id: int | None  # the label scored, by id (its text must be `explanation` when both are given)
    n: int  # contexts in the set
    method: str  # 'detection' (does it fire anywhere in the context) or 'fuzzing' (on the marked token)
    seed: int | None = None  # the draw's seed; None = a random one (the set records it)
    min_activation: float = sc.DEFAULT_MIN_ACTIVATION  # a context fires when its max >= this x the feature's max
    session: str | None = None  # the conversation the set is handed to (its lookups make a score not blind)
    auto: bool = False  # the client's model answers (MCP sampling), not the agent

    def check(self) -> None:
        """What needs no model or store: min_activation in its range."""
        low, high = sc.MIN_ACTIVATION_RANGE
        if not low <= self.min_activation <= high:
            raise InvalidInput(f"min_activation {self.min_activation} is out of range: a fraction of the feature's "
                               f"max activation from {low} to {high} (default {sc.DEFAULT_MIN_ACTIVATION})")


@dataclass(frozen=True)
class DrawnFrom:
    """What a blind set is drawn from and with: the feature's scan row, the seed, the set's identity."""

    row: StoredScan  # the row holding the feature (the index's, or its own on-demand scan's)
    source: str  # 'index' or 'scan'
    seed: int  # the request's seed, else the random one drawn
    set_key: str  # SHA-1 of all that fixes the draw (SAE, feature, method, n, seed, min_activation, index, extent)


@dataclass(frozen=True)
class Issued:
    blind: BlindSet
    submit_secret: str  # handed out once; only its SHA-256 is stored



def question(method: str, n_true: int, n: int) -> str:
    """What a prediction of true means, and how many of the contexts are true (as drawn)."""
    if method == "fuzzing":
        return (f"true = the marked <<token>> is one the explanation says the feature fires on; false = it is not "
                f"({n_true} of the {n} marks are on the token where it fires most in its context, the others on "
                "tokens where it is 0)")
    return (f"true = the explanation says the feature fires on some token of the context; false = nowhere "
            f"({n_true} of the {n} contexts fire)")


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ScorerServices(Protocol):
    """What the scorer reads of the server's Services (services/__init__.py, a layer above this one)."""

    @property
    def engine(self) -> Engine: ...

    @property
    def tools(self) -> Mapping[str, Recorded]: ...

    @property
    def examples(self) -> ExampleSource: ...

    @property
    def scores(self) -> ScoreStore: ...

    @property
    def ledger(self) -> Ledger: ...


class ExplanationScorer:
    def __init__(self, services: ScorerServices):
        self.services = services
        self.engine = services.engine
        # Tools that show a feature's activations on a text the caller gives (their string arguments are that text).
        self.lookup_tools = tools_where(services.tools, lambda rule: rule.looks_up)
        # Checking that a challenge is still blind and storing its score are one step: two overlapping challenges
        # submitted at once must not both pass the check before either is stored.
        self._submitting = threading.Lock()

    # -- handing out a blind set ----------------------------------------------------------------------------------

    def issue(self, request: BlindSetRequest, progress: Progress | None = None, cancel: CancelToken | None = None
              ) -> Issued:
        """Draw the blind set `request` asks for (reading the feature's row: an on-demand scan of it, which
        `progress` follows and `cancel` stops, when there is no index), store it as an open challenge, hand it out."""
        feature, n, method = request.feature, request.n, request.method
        s = self.engine.sae(request.sae)
        self.engine.check_feature(s, feature)
        request.check()
        text, label_id = self._explanation(s, feature, request.explanation, request.label_id)
        seed = secrets.randbelow(2**31) if request.seed is None else int(request.seed)
        index, row, col, source = self.services.examples.feature_row(s.key, feature, progress=progress,
                                                                     cancel=cancel)
        view = feature_view(self.engine, self.services.examples, s, feature, index, row, col, source,
                            request.min_activation)
        if view.max_activation <= 0:
            raise InvalidInput(f"feature {feature} never fired in the {row.tokens:,} tokens scanned: there is nothing "
                               "to score; build_index with more tokens, or score a feature that fires")
        set_key = hashlib.sha1(json.dumps([s.store_key, feature, method, n, seed, request.min_activation,
                                           str(index.path), row.tokens, row.windows]).encode()).hexdigest()
        view = dataclasses.replace(view, revealed=_spans(self.services.scores.revealed(s.store_key, feature)))
        drawn = draw(self.engine, s, feature, index, view, n, method, np.random.default_rng(seed), cancel)
        return self._hand_out(s, request, text, label_id, DrawnFrom(row, source, seed, set_key), view, drawn)

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

    def _hand_out(self, s: LoadedSAE, request: BlindSetRequest, text: str, label_id: int | None, origin: DrawnFrom,
                  view: sc.FeatureView, drawn: Drawn) -> Issued:
        """The drawn contexts as a BlindSet (with what a prediction of true means) and the open Challenge stored
        with their answers; the submit secret is handed out here once, only its hash stored."""
        feature, method, seed = request.feature, request.method, origin.seed
        now = time.time()
        cid = "ch_" + secrets.token_hex(6)
        secret = secrets.token_urlsafe(SECRET_BYTES)
        answers, contexts = [], []
        for i, it in enumerate(drawn.items):
            toks = self.engine.str_tokens(torch.tensor(it.ids))
            contexts.append(BlindContext(id=str(i + 1), text=sc.shown_text(toks, it.mark if method == "fuzzing"
                                                                               else None)))
            answers.append(_answer(str(i + 1), it, toks, method, view.threshold))
        n_true = sum(a["truth"] for a in answers)
        blind = BlindSet(challenge_id=cid, sae=s.key, feature=feature, explanation=text, method=method, seed=seed,
                         min_activation=view.min_activation, expires_in_s=CHALLENGE_TTL_S,
                         question=question(method, n_true, len(contexts)), n_true=n_true, contexts=contexts,
                         warnings=_draw_warnings(drawn, request.n, origin.source, origin.row) or None)
        self.services.scores.add_challenge(Challenge(
            id=cid, sae=s.store_key, feature=feature, explanation=text, label_id=label_id, method=method,
            n=len(drawn.items), seed=seed, set_key=origin.set_key, created=now, expires=now + CHALLENGE_TTL_S,
            auto=request.auto, blind=blind.model_dump(mode="json"), secret_hash=secret_hash(secret),
            session=request.session,
            answers={"items": answers, "threshold": view.threshold, "min_activation": view.min_activation,
                     "bands": [[b.number, b.lower, b.upper] for b in drawn.bands]}))
        return Issued(blind, secret)

    def blind_set(self, challenge_id: str) -> BlindSet:
        c = self._open(challenge_id)
        return BlindSet(**{"min_activation": c.answers.get("min_activation", sc.DEFAULT_MIN_ACTIVATION), **c.blind,
                           "expires_in_s": max(0, int(c.expires - time.time()))})

    # -- scoring the predictions ------------------------------------------------------------------------------------

    def submit(self, challenge_id: str, submit_secret: str | None, predictions: dict[str, bool],
               scorer: str = "agent", session: str | None = None) -> ExplanationScore:
        c = self._open(challenge_id)
        _check_secret(c, submit_secret)
        ids = [a["id"] for a in c.answers["items"]]
        unknown = [k for k in predictions if k not in set(ids)]
        missing = [i for i in ids if i not in predictions]
        if unknown or missing:
            parts = ([f"no context has the id(s) {_ids(unknown)}"] if unknown else []) + \
                    ([f"no prediction for the id(s) {_ids(missing)}"] if missing else [])
            raise InvalidInput(f"challenge {challenge_id}: {'; '.join(parts)}. Give true or false for every context "
                               f"id ({ids[0]}..{ids[-1]}) and nothing else; the challenge stays open")
        result = score_result(c, predictions, scorer)
        seen = self._looked_up(c, session)
        if seen:
            result.looked_up = [tool_ids[0] for tool_ids in seen]
            result.warnings = [not_blind_warning(seen)] + (result.warnings or [])
        with self._submitting:
            self._open(challenge_id)  # again, now that no other submission can store meanwhile
            score_id = self.services.scores.record(c, result.metrics.model_dump(mode="json"), scorer)
        if score_id is None:
            raise InvalidInput(f"challenge {challenge_id} was answered meanwhile by another submission; a challenge "
                               "is scored once: call score_explanation again for a new blind set")
        result.score_id = score_id
        result.label_id = c.label_id or self.services.scores.label_id_of(c.sae, c.feature, c.explanation)
        return result

    def _looked_up(self, c: Challenge, session: str | None) -> list[tuple[str, list[str]]]:
        """[(context id, the tools that showed activations on its text)] for the calls of the conversation the set
        was handed to, and of the one submitting, since it was handed out (lookup_tools, their string arguments);
        none when the server keeps no ledger (it cannot tell: a replay, --no-ledger)."""
        ledger = self.services.ledger
        if not ledger.recording:
            return []
        texts: list[tuple[str, str]] = []
        for sid in dict.fromkeys(x for x in (c.session, session) if x):
            for tool in self.lookup_tools:  # by tool in SQL: its other runs (and their results) stay unread
                for run in ledger.store.runs(session=sid, tool=tool, newest_first=True, limit=LOOKUP_RUNS):
                    if run.ok and run.time >= c.created:
                        texts += [(tool, t) for t in _strings(run.given)]
        return looked_up(c.answers["items"], texts)

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


def _check_secret(c: Challenge, given: str | None) -> None:
    """Refuse a submission without the challenge's submit secret (compared as SHA-256 digests, in constant time)."""
    again = ("score_explanation hands it out once, with the blind set; without it, call score_explanation again "
             "for a new blind set. The challenge stays open")
    if c.secret_hash is None:
        raise InvalidInput(f"challenge {c.id} was handed out before submit secrets existed and cannot be answered; "
                           "call score_explanation again for a new blind set")
    if not given:
        raise InvalidInput(f"challenge {c.id}: no submit_secret given: pass the submit_secret that came with its "
                           f"challenge_id; {again}")
    if not hmac.compare_digest(secret_hash(given), c.secret_hash):
        raise InvalidInput(f"challenge {c.id}: the submit_secret does not match: pass the one that came with its "
                           f"challenge_id; {again}")


def _strings(value: Any) -> list[str]:
    """Every string in a call's arguments (a prompt, each prompt of a set): any JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _strings(v)]
    if isinstance(value, list):
        return [t for v in value for t in _strings(v)]
    return []



def _draw_warnings(drawn: Drawn, n: int, source: str, row: StoredScan) -> list[str]:
    out = [f"band {b.number} (context max {b.lower:.4g}-{b.upper:.4g}) holds {held} firing context(s), not its "
           f"share of {want}: {drawn.firing_windows} of the {drawn.windows_run} unseen windows run fire, too few "
           "to fill every band; build_index with more tokens for a full set" for b, want, held in drawn.short]
    if len(drawn.items) < n:
        out.append(f"{len(drawn.items)} contexts, not {n}: the index holds too few usable ones; build_index with "
                   "more tokens for a full set")
    if source == "scan":
        out.append(f"from an on-demand scan of this feature over {row.tokens:,} tokens (no index); build_index "
                   "draws from more text")
    return out


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


def _answer(cid: str, it: sc.Item, toks: list[str], method: str, threshold: float) -> dict[str, Any]:
    """What the server keeps of a context until the predictions are in."""
    mark = it.mark if method == "fuzzing" else None
    return {"id": cid, "kind": it.kind, "band": it.band, "truth": it.truth(method, threshold),
            "max": rounded(max(it.acts)), "max_at": it.max_at, "mark": mark,
            "mark_act": None if mark is None else rounded(it.acts[mark]), "tokens": toks, "window": it.window,
            "start": it.start}
