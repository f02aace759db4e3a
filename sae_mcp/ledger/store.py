"""The ledger: every tool call an agent made, in one SQLite file (WAL) under <data_dir>/ledger/ledger.sqlite.

Tables
    envs          (id, body JSON, created)        what runs ran against: the model and its weights' identity, each
                                                  SAE (source, weights hash, dtype, device), the model processing,
                                                  the corpus, package versions; id = SHA-256 prefix of the body
    sessions      (id, started, env, client)       one per conversation (an MCP connection, a `sae-mcp call`)
    runs          (seq, id, session, env, time, tool, wall_s, ok, error, digest, result_chars, truncated, args_cut,
                   sae, features, summary, brief JSON, given JSON, resolved JSON, result JSON)
                                                  one per tool call: how long it took, its error message when it
                                                  failed, the digest of its whole result, its SAE's key, the features
                                                  it was about (named in its arguments or listed in its result) as
                                                  ' 3 17 102 ' for ledger(feature=), its key numbers in one line
                                                  (summary) and a short copy of its arguments (brief) for listings;
                                                  then the arguments as given and as resolved (defaults, the SAE key,
                                                  steering's coefficients, the seeds) and a bounded copy of the result
    file_hashes   (path, size, mtime_ns, sha256)   weights hashes already computed (a large local model is hashed
                                                  once, not at every start)

A run is one row, written by one INSERT committed before the tool's answer is sent (synchronous=NORMAL in WAL mode
survives a killed process; only a power loss can drop the last commits), so a client never holds a run id the
ledger lost. One statement per call keeps recording cheap (~0.1 ms): a session's row is written once, at its first
run, and its run count and last time are read from the runs.

What is stored (record())
    the arguments and the result, bounded (a rejected call's arguments and every error message cut), secrets
    replaced: ledger/bounds.py says how

The size cap (prune())
    The runs hold at most max_bytes of the file's pages (default DEFAULT_MAX_MB, SAE_MCP_LEDGER_MAX_MB to change;
    ledger/recording.py). Past it, each recorded run also deletes up to PRUNE_BATCH of the oldest runs, until the
    pages in use are under PRUNE_TO of the cap, except runs a label cites as evidence and the successful runs of the
    tools whose runs are kept (the caller names them: those that recorded a label): those are kept whatever their
    age. Freed pages are reused, so the file stops growing;
    `sae-mcp ledger prune` deletes the same way on demand (or by age) and gives the space back to the disk.

Reading fast whatever is stored
    The large columns (given, resolved, result) come last in a row: SQLite reads a row's columns in order, and a
    large value spills into a chain of overflow pages that reading a later column has to walk. A listing
    (runs(light=True)) reads only the columns before them: summary and brief instead of the result and the
    arguments. Ledgers written before these columns existed get them appended (their large columns stay in the
    middle); their old runs are listed with their result, to compute the summary from (ledger/summary.py summary_of).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Sequence
from pathlib import Path

from sae_mcp.errors import NotFound
from sae_mcp.ledger.bounds import (
    BRIEF_CHARS,
    MAX_ERROR_CHARS,
    MAX_NAME_CHARS,
    MAX_REJECTED_CHARS,
    brief_of,
    cut,
    fit,
    scrub,
    secrets_in,
    to_json,
    without_secrets,
)
from sae_mcp.ledger.records import Pruned, Run, Session
from sae_mcp.store.db import add_columns, open_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS envs (id TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, started REAL NOT NULL, env TEXT, client TEXT);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    session TEXT NOT NULL,
    env TEXT,
    time REAL NOT NULL,
    tool TEXT NOT NULL,
    wall_s REAL NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    digest TEXT,
    result_chars INTEGER,
    truncated INTEGER NOT NULL DEFAULT 0,
    args_cut INTEGER NOT NULL DEFAULT 0,
    sae TEXT,
    features TEXT,
    summary TEXT,
    brief TEXT,
    given TEXT NOT NULL,
    resolved TEXT,
    result TEXT
);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (path, size, mtime_ns)
);
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS runs_session ON runs (session, seq);
CREATE INDEX IF NOT EXISTS runs_tool ON runs (tool, seq);
"""
ADDED_COLUMNS = (("args_cut", "INTEGER NOT NULL DEFAULT 0"), ("summary", "TEXT"), ("brief", "TEXT"))
"""Columns a ledger written before them lacks (appended when it is opened)."""

BUSY_TIMEOUT_MS = 2000
LIGHT_COLUMNS = "id, session, env, time, tool, wall_s, ok, error, digest, result_chars, truncated, args_cut, summary"
RUN_COLUMNS = f"{LIGHT_COLUMNS}, given, resolved, result"
SESSION_QUERY = ("SELECT s.id, s.started, coalesce(max(r.time), s.started), s.env, s.client, count(r.seq) "
                 "FROM sessions s LEFT JOIN runs r ON r.session = s.id")

MAX_FEATURES_INDEXED = 256  # features of one run written for ledger(feature=) (the tools take at most 64)

DEFAULT_MAX_MB = 1024
PRUNE_TO = 0.9  # past the cap, runs are deleted until the pages in use are under this share of it
PRUNE_BATCH = 64  # runs deleted at most per recorded run (recording stays cheap: the deletes are spread out)
PRUNE_STEP = 8  # runs deleted between two looks at the size (not many more than needed are deleted)


def ledger_path(data_dir: Path) -> Path:
    return Path(data_dir) / "ledger" / "ledger.sqlite"


# ---------------------------------------------------------------------------------------------------------------
# The store


class LedgerStore:
    """The ledger file; one connection shared by the server's worker threads, one writer at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = open_db(self.path)
        # Runs are written on the server's event loop: never wait long for another writer of this file (a second
        # server on the same data dir holds the lock for one insert); past this the run is logged as not recorded.
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.conn.executescript(SCHEMA)
        add_columns(self.conn, "runs", ADDED_COLUMNS)  # a ledger written before them
        self.conn.executescript(INDEXES)
        self._lock = threading.Lock()

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> LedgerStore:
        return cls(ledger_path(data_dir))

    def close(self) -> None:
        self.conn.close()

    # -- writing ------------------------------------------------------------------------------------------------

    def put_env(self, env_id: str, body: dict, now: float) -> None:
        with self._lock:
            self.conn.execute("INSERT OR IGNORE INTO envs (id, body, created) VALUES (?, ?, ?)",
                              (env_id, json.dumps(body, sort_keys=True), now))

    def put_session(self, session: str, started: float, env: str | None, client: str | None) -> None:
        with self._lock:
            self.conn.execute("INSERT OR IGNORE INTO sessions (id, started, env, client) VALUES (?, ?, ?, ?)",
                              (session, started, env, None if client is None else cut(client, MAX_NAME_CHARS)))

    def record(self, run: Run) -> int:
        """The run as one row (one statement: committed when this returns), stored as the module's docstring says:
        secrets replaced, a rejected call's arguments and every error message cut. The result is the caller's
        (ledger/recording.py takes its digest and cuts it); `run` itself is left as it was. Returns the characters
        of text the row holds."""
        secrets = secrets_in(run.given)
        given, resolved = scrub(run.given), scrub(run.resolved)
        args_cut = run.args_cut
        if not run.ok:
            given, cut_given = fit(given, MAX_REJECTED_CHARS)
            resolved, cut_resolved = fit(resolved, MAX_REJECTED_CHARS)
            args_cut = args_cut or cut_given or cut_resolved
        error = run.error if run.error is None else cut(without_secrets(run.error, secrets), MAX_ERROR_CHARS)
        result = run.result_json if run.result_json is not None else to_json(run.result)
        features = " ".join(map(str, run.features[:MAX_FEATURES_INDEXED]))
        given_json = to_json(given) or "{}"
        brief = given_json if len(given_json) <= BRIEF_CHARS else to_json(brief_of(given))
        row = (run.id, run.session, run.env, run.time, cut(run.tool, MAX_NAME_CHARS), run.wall_s, int(run.ok), error,
               run.digest, run.result_chars, int(run.truncated), int(args_cut), run.summary, brief, given_json,
               to_json(resolved), result, run.sae, f" {features} " if features else None)
        with self._lock:
            self.conn.execute(f"INSERT INTO runs ({LIGHT_COLUMNS}, brief, given, resolved, result, sae, features) "
                              f"VALUES ({','.join('?' * len(row))})", row)
        return sum(len(x) for x in row if isinstance(x, str))

    def put_file_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        with self._lock:
            self.conn.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (path, size, mtime_ns, sha256))

    # -- reading ------------------------------------------------------------------------------------------------

    def file_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        with self._lock:
            row = self.conn.execute("SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
                                    (path, size, mtime_ns)).fetchone()
        return None if row is None else row[0]

    def env(self, env_id: str | None) -> dict | None:
        if env_id is None:
            return None
        with self._lock:
            row = self.conn.execute("SELECT body FROM envs WHERE id = ?", (env_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def sessions(self, limit: int = 50) -> list[Session]:
        """The most recent sessions first."""
        with self._lock:
            rows = self.conn.execute(f"{SESSION_QUERY} GROUP BY s.id ORDER BY 3 DESC, s.id DESC LIMIT ?",
                                     (limit,)).fetchall()
        return [Session(*r) for r in rows]

    def resolve_session(self, ref: str | None) -> str:
        """A session id, a unique prefix of one, or None / 'latest' for the most recent; NotFound otherwise."""
        if ref in (None, "", "latest"):
            found = self.sessions(1)
            if not found:
                raise NotFound(f"the ledger {self.path} has no session yet")
            return found[0].id
        with self._lock:
            ids = [r[0] for r in self.conn.execute("SELECT id FROM sessions WHERE id = ? OR substr(id, 1, ?) = ? "
                                                   "LIMIT 3", (ref, len(ref), ref))]  # a prefix, no LIKE wildcards
        if ref in ids:
            return ref
        if len(ids) != 1:
            what = "no session matches" if not ids else f"several sessions ({', '.join(ids)}) match"
            raise NotFound(f"{what} {ref!r} in the ledger; the resource ledger://sessions (or `sae-mcp ledger "
                           "sessions`) lists them")
        return ids[0]

    def runs(self, session: str | None = None, tool: str | None = None, feature: int | None = None,
             sae: str | None = None, limit: int = 1000, newest_first: bool = False, light: bool = False) -> list[Run]:
        """Runs matching every filter given, in order of recording (or newest first). light: for a listing, the
        columns before the large ones (given holds the brief copy, resolved and result None, summary set; a run
        written before summaries were comes with its result instead, summary None)."""
        where, args = _filters(session, tool, feature, sae)
        columns = f"{LIGHT_COLUMNS}, brief" if light else RUN_COLUMNS
        sql = f"SELECT {columns} FROM runs{where} ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        with self._lock:
            rows = self.conn.execute(sql, [*args, limit]).fetchall()
        if not light:
            return [_run_of(r) for r in rows]
        runs = [_light_run_of(r) for r in rows]
        older = [r for r in runs if r.summary is None]  # written before summaries were: read their results
        if older:
            whole = {r.id: r for r in self._whole([r.id for r in older])}
            runs = [whole.get(r.id, r) if r.summary is None else r for r in runs]
        return runs

    def _whole(self, ids: Sequence[str]) -> list[Run]:
        """Runs written before summaries and briefs were stored, as a listing holds them: the brief copy of their
        arguments, and their result (their summary is computed from it by the tool's rule, which the store does
        not know: ledger/summary.py summary_of)."""
        with self._lock:
            rows = self.conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id IN ({','.join('?' * len(ids))})",
                                     list(ids)).fetchall()
        out = [_run_of(r) for r in rows]
        for r in out:
            r.given, r.resolved = brief_of(r.given), None
        return out

    def run(self, run_id: str) -> Run:
        with self._lock:
            row = self.conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"no run {run_id!r} in the ledger; ledger() lists the runs")
        return _run_of(row)

    def missing(self, run_ids: Sequence[str]) -> list[str]:
        """The ids among `run_ids` that the ledger does not hold."""
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return []
        with self._lock:
            found = {r[0] for r in self.conn.execute(
                f"SELECT id FROM runs WHERE id IN ({','.join('?' * len(ids))})", ids)}
        return [i for i in ids if i not in found]

    def count(self, session: str | None = None, tool: str | None = None, feature: int | None = None,
              sae: str | None = None) -> int:
        """How many runs match every filter given (runs()'s filters)."""
        where, args = _filters(session, tool, feature, sae)
        with self._lock:
            return int(self.conn.execute(f"SELECT count(*) FROM runs{where}", args).fetchone()[0])

    # -- the size cap -------------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes of the file's pages in use (its size less the free pages that new rows reuse): two header reads."""
        with self._lock:
            pages, free, size = (self.conn.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def prune(self, keep: Collection[str], kept_tools: Collection[str], max_bytes: int | None = None,
              before: float | None = None, most: int | None = None) -> Pruned:
        """Delete the oldest runs, except those in `keep` and the successful runs of `kept_tools` (the runs that
        recorded a label): every one recorded before `before` (a time), then more until the pages in use are at
        most max_bytes; at most `most` runs in all. Each batch is its own transaction (another writer waits one
        batch, not the prune)."""
        spared = f" AND NOT (tool IN ({','.join('?' * len(kept_tools))}) AND ok = 1)" if kept_tools else ""
        kept: set[str] = set()  # run ids spared because `keep` names them
        sessions: set[str] = set()  # sessions that lost runs
        deleted, after = 0, -1
        while most is None or deleted < most:
            if before is None and (max_bytes is None or self.used_bytes() <= max_bytes):
                break
            batch = PRUNE_BATCH if before is not None else PRUNE_STEP  # by size: checked every few runs
            batch = batch if most is None else min(batch, most - deleted)
            with self._lock:
                rows = self.conn.execute(
                    "SELECT seq, id, session FROM runs WHERE seq > ?" + spared
                    + (" AND time < ?" if before is not None else "") + " ORDER BY seq LIMIT ?",
                    [after, *kept_tools, *([before] if before is not None else []), batch]).fetchall()
            if not rows and before is None:
                break
            if not rows:  # every old run is gone: on to the size, from the oldest again
                before, after = None, -1
                continue
            after = rows[-1][0]
            gone = [(seq, sid) for seq, rid, sid in rows if rid not in keep]
            kept.update(rid for _, rid, _ in rows if rid in keep)
            if gone:
                with self._lock:
                    self.conn.execute(f"DELETE FROM runs WHERE seq IN ({','.join('?' * len(gone))})",
                                      [seq for seq, _ in gone])
            deleted += len(gone)
            sessions.update(sid for _, sid in gone)
        emptied = self._drop_empty_sessions(sessions)
        return Pruned(runs=deleted, kept=len(kept), sessions=emptied, used_bytes=self.used_bytes())

    def _drop_empty_sessions(self, candidates: Collection[str]) -> list[str]:
        if not candidates:
            return []
        with self._lock:
            empty = [sid for sid in candidates
                     if self.conn.execute("SELECT 1 FROM runs WHERE session = ? LIMIT 1", (sid,)).fetchone() is None]
            self.conn.executemany("DELETE FROM sessions WHERE id = ?", [(s,) for s in empty])
        return sorted(empty)

    def vacuum(self) -> None:
        """Rewrite the file without its free pages (the space deleted runs held goes back to the disk)."""
        with self._lock:
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _filters(session: str | None, tool: str | None, feature: int | None, sae: str | None) -> tuple[str, list]:
    """(' WHERE ...' or '', its parameters) for runs() and count(): every filter given must match; sae narrows
    feature (a run about the feature of no SAE in particular matches too)."""
    where, args = [], []
    for column, value in (("session", session), ("tool", tool)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if feature is not None:  # features: ' 3 17 102 '
        where.append("features LIKE ?" + (" AND (sae = ? OR sae IS NULL)" if sae else ""))
        args += [f"% {int(feature)} %"] + ([sae] if sae else [])
    return (" WHERE " + " AND ".join(where) if where else ""), args



def _run_of(row: Sequence) -> Run:
    (rid, session, env, t, tool, wall_s, ok, error, digest, chars, truncated, args_cut, summary,
     given, resolved, result) = row
    return Run(id=rid, session=session, env=env, time=t, tool=tool, given=json.loads(given),
               resolved=None if resolved is None else json.loads(resolved), wall_s=wall_s, ok=bool(ok), error=error,
               digest=digest, result=None if result is None else json.loads(result), result_chars=chars,
               truncated=bool(truncated), args_cut=bool(args_cut), summary=summary)


def _light_run_of(row: Sequence) -> Run:
    (rid, session, env, t, tool, wall_s, ok, error, digest, chars, truncated, args_cut, summary, brief) = row
    return Run(id=rid, session=session, env=env, time=t, tool=tool, given=json.loads(brief) if brief else {},
               resolved=None, wall_s=wall_s, ok=bool(ok), error=error, digest=digest, result_chars=chars,
               truncated=bool(truncated), args_cut=bool(args_cut), summary=summary)


def open_existing(data_dir: Path) -> LedgerStore | None:
    """The data dir's ledger, or None when it has none (reading never creates one)."""
    path = ledger_path(data_dir)
    if not path.exists():
        return None
    try:
        return LedgerStore(path)
    except sqlite3.DatabaseError:
        return None
