"""Scores of explanations and the challenges they were measured on, in the explanation store's SQLite file (its own
connection: WAL lets both work on one file; every write is one BEGIN IMMEDIATE transaction).

Tables (created when missing: additive to a store written before them; columns added to an older table)
    challenges (id, sae, feature, explanation, label_id, method, n, seed, set_key, created, expires, blind JSON,
                answers JSON, auto, submitted, score_id, secret_hash, session)
        a blind set handed out by score_explanation; `answers` (each context's truth, activations, window and
        place in it) never leaves the server before its one submission; after it, those contexts' tokens are never
        shown blind again (`revealed`); `set_key` names the draw (SAE, feature, method, n, seed, min_activation,
        index); `secret_hash` is the SHA-256 of its submit secret (the secret itself is never stored; NULL: handed
        out before secrets, cannot be answered); `session` the ledger's id of the conversation it was handed to
    scores     (id, sae, feature, explanation, label_id, method, n, seed, metrics JSON, scorer, challenge, created)
        one submitted score; shown with every explanation of the same text for the same feature (labels and
        imported ones), the newest per method
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_mcp.store.db import add_columns, open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS challenges (
    id TEXT PRIMARY KEY, sae TEXT NOT NULL, feature INTEGER NOT NULL, explanation TEXT NOT NULL, label_id INTEGER,
    method TEXT NOT NULL, n INTEGER NOT NULL, seed INTEGER NOT NULL, set_key TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, blind TEXT NOT NULL, answers TEXT NOT NULL, auto INTEGER NOT NULL DEFAULT 0,
    submitted REAL, score_id INTEGER
);
CREATE INDEX IF NOT EXISTS challenges_set ON challenges (set_key);
CREATE INDEX IF NOT EXISTS challenges_feature ON challenges (sae, feature);
CREATE TABLE IF NOT EXISTS scores (
    id INTEGER PRIMARY KEY, sae TEXT NOT NULL, feature INTEGER NOT NULL, explanation TEXT NOT NULL, label_id INTEGER,
    method TEXT NOT NULL, n INTEGER NOT NULL, seed INTEGER NOT NULL, metrics TEXT NOT NULL, scorer TEXT NOT NULL,
    challenge TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scores_feature ON scores (sae, feature);
"""
ADDED_COLUMNS = {"secret_hash": "TEXT", "session": "TEXT"}  # challenges' columns newer than the table
KEEP_UNANSWERED_S = 24 * 3600  # expired challenges never answered are deleted this long after they expired


@dataclass
class Challenge:
    id: str
    sae: str  # the SAE's store key
    feature: int
    explanation: str
    label_id: int | None
    method: str
    n: int
    seed: int
    set_key: str
    created: float
    expires: float
    blind: dict[str, Any]  # the BlindSet as handed out
    answers: dict[str, Any]  # what the scorer must not see: items with truth and activations, bands, threshold
    auto: bool = False
    submitted: float | None = None
    score_id: int | None = None
    secret_hash: str | None = None  # SHA-256 hex of the submit secret
    session: str | None = None  # the ledger's id of the conversation it was handed to


@dataclass
class StoredScore:
    id: int
    sae: str
    feature: int
    explanation: str
    label_id: int | None
    method: str
    n: int
    seed: int
    metrics: dict[str, Any]  # ScoreMetrics as JSON
    scorer: str
    challenge: str
    created: float


CHALLENGE_COLUMNS = ("id, sae, feature, explanation, label_id, method, n, seed, set_key, created, expires, blind, "
                     "answers, auto, submitted, score_id, secret_hash, session")
SCORE_COLUMNS = "id, sae, feature, explanation, label_id, method, n, seed, metrics, scorer, challenge, created"


class ScoreStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = open_db(self.path)
        self.conn.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._add_columns()

    def _add_columns(self) -> None:
        """Add the challenges' columns a store written before them lacks (one transaction: two servers may open it)."""
        self._write(lambda conn: add_columns(conn, "challenges", ADDED_COLUMNS.items()))

    def close(self) -> None:
        self.conn.close()

    def _write(self, fn):
        """fn(conn) inside one BEGIN IMMEDIATE transaction (the write lock first: two servers on one data dir)."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.conn)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            return out

    # -- challenges ---------------------------------------------------------------------------------------------

    def add_challenge(self, c: Challenge) -> None:
        def go(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM challenges WHERE submitted IS NULL AND expires < ?",
                         (time.time() - KEEP_UNANSWERED_S,))
            conn.execute(f"INSERT INTO challenges ({CHALLENGE_COLUMNS}) VALUES ({', '.join('?' * 18)})",
                         (c.id, c.sae, c.feature, c.explanation, c.label_id, c.method, c.n, c.seed, c.set_key,
                          c.created, c.expires, json.dumps(c.blind), json.dumps(c.answers), int(c.auto), None, None,
                          c.secret_hash, c.session))

        self._write(go)

    def challenge(self, challenge_id: str) -> Challenge | None:
        with self._lock:
            row = self.conn.execute(f"SELECT {CHALLENGE_COLUMNS} FROM challenges WHERE id = ?",
                                    (challenge_id,)).fetchone()
        if row is None:
            return None
        (id_, sae, feature, explanation, label_id, method, n, seed, set_key, created, expires, blind, answers, auto,
         submitted, score_id, secret_hash, session) = row
        return Challenge(id_, sae, feature, explanation, label_id, method, n, seed, set_key, created, expires,
                         blind=json.loads(blind), answers=json.loads(answers), auto=bool(auto), submitted=submitted,
                         score_id=score_id, secret_hash=secret_hash, session=session)

    def revealed(self, sae: str, feature: int) -> list[tuple[str, int, int, int]]:
        """(challenge id, window, start, end) of every context of this feature whose answers a submission revealed
        (its tokens [start, end) of the index window), oldest submission first."""
        with self._lock:
            rows = self.conn.execute("SELECT id, answers FROM challenges WHERE sae = ? AND feature = ? AND submitted "
                                     "IS NOT NULL ORDER BY submitted", (sae, feature)).fetchall()
        return [(cid, int(a["window"]), int(a["start"]), int(a["start"]) + len(a["tokens"]))
                for cid, answers in rows for a in json.loads(answers)["items"]]

    def record(self, c: Challenge, metrics: dict[str, Any], scorer: str) -> int | None:
        """Store the score and close the challenge, atomically; None when it was closed meanwhile (answered by a
        concurrent submission), and nothing is stored."""
        def go(conn: sqlite3.Connection) -> int | None:
            open_ = conn.execute("SELECT 1 FROM challenges WHERE id = ? AND submitted IS NULL", (c.id,)).fetchone()
            if open_ is None:
                return None
            now = time.time()
            cur = conn.execute(f"INSERT INTO scores ({SCORE_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (c.sae, c.feature, c.explanation, c.label_id, c.method, c.n, c.seed,
                                json.dumps(metrics), scorer, c.id, now))
            score_id = cur.lastrowid
            assert score_id is not None  # an INSERT sets it
            conn.execute("UPDATE challenges SET submitted = ?, score_id = ? WHERE id = ?", (now, score_id, c.id))
            return score_id

        return self._write(go)

    # -- labels of the same file ----------------------------------------------------------------------------------

    def label(self, label_id: int) -> tuple[str, int, str] | None:
        """(sae, feature, text) of a label recorded by label_feature."""
        with self._lock:
            row = self.conn.execute("SELECT sae, feature, label FROM labels WHERE id = ?", (label_id,)).fetchone()
        return None if row is None else (row[0], int(row[1]), row[2])

    def label_id_of(self, sae: str, feature: int, text: str) -> int | None:
        """The newest label of this feature with exactly this text."""
        with self._lock:
            row = self.conn.execute("SELECT id FROM labels WHERE sae = ? AND feature = ? AND label = ? "
                                    "ORDER BY created DESC, id DESC LIMIT 1", (sae, feature, text)).fetchone()
        return None if row is None else int(row[0])

    # -- scores -------------------------------------------------------------------------------------------------

    def for_feature(self, sae: str, feature: int) -> list[StoredScore]:
        """Every score of this feature's explanations, newest first."""
        with self._lock:
            rows = self.conn.execute(f"SELECT {SCORE_COLUMNS} FROM scores WHERE sae = ? AND feature = ? "
                                     "ORDER BY created DESC, id DESC", (sae, feature)).fetchall()
        return [_score(r) for r in rows]

    def latest(self, keys: Iterable[tuple[str, int, str]]) -> dict[tuple[str, int, str], list[StoredScore]]:
        """(sae, feature, explanation text) -> its newest score per method, newest first (absent: never scored)."""
        wanted = set(keys)
        out: dict[tuple[str, int, str], list[StoredScore]] = {}
        for sae, feature in dict.fromkeys((s, f) for s, f, _ in wanted):
            for sc in self.for_feature(sae, feature):
                kept = out.setdefault((sae, feature, sc.explanation), [])
                if all(k.method != sc.method for k in kept):
                    kept.append(sc)
        return {k: v for k, v in out.items() if k in wanted}


def _score(row: tuple) -> StoredScore:
    sid, sae, feature, text, label_id, method, n, seed, metrics, scorer, challenge, created = row
    return StoredScore(int(sid), sae, int(feature), text, label_id, method, int(n), int(seed), json.loads(metrics),
                       scorer, challenge, created)
