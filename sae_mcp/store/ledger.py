"""The ledger: every tool call an agent made, in one SQLite file (WAL) under <data_dir>/ledger/ledger.sqlite.

Tables
    envs          (id, body JSON, created)        what runs ran against: the model and its weights' identity, each
                                                  SAE (source, weights hash, dtype, device), the model processing,
                                                  the corpus, package versions; id = SHA-256 prefix of the body
    sessions      (id, started, env, client)       one per conversation (an MCP connection, a `sae-mcp call`)
    runs          (seq, id, session, env, time, tool, given JSON, resolved JSON, wall_s, ok, error, digest,
                   result JSON, result_chars, truncated, sae, features)
                                                  one per tool call: the arguments as given and as resolved
                                                  (defaults, the SAE key, steering's coefficients, the seeds), how
                                                  long it took, its error message when it failed, the digest of its
                                                  whole result and a bounded copy of it, its SAE's key, and the
                                                  features it was about (named in its arguments or listed in its
                                                  result) as ' 3 17 102 ', for ledger(feature=)
    file_hashes   (path, size, mtime_ns, sha256)   weights hashes already computed (a large local model is hashed
                                                  once, not at every start)

A run is one row, written by one INSERT committed before the tool's answer is sent (synchronous=NORMAL in WAL mode
survives a killed process; only a power loss can drop the last commits), so a client never holds a run id the
ledger lost. One statement per call keeps recording cheap (~0.1 ms): a session's row is written once, at its first
run, and its run count and last time are read from the runs.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydantic_core

from sae_mcp.errors import NotFound
from sae_mcp.store.db import open_db

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
    given TEXT NOT NULL,
    resolved TEXT,
    wall_s REAL NOT NULL,
    ok INTEGER NOT NULL,
    error TEXT,
    digest TEXT,
    result TEXT,
    result_chars INTEGER,
    truncated INTEGER NOT NULL DEFAULT 0,
    sae TEXT,
    features TEXT
);
CREATE INDEX IF NOT EXISTS runs_session ON runs (session, seq);
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (path, size, mtime_ns)
);
"""

BUSY_TIMEOUT_MS = 2000
RUN_COLUMNS = ("id, session, env, time, tool, given, resolved, wall_s, ok, error, digest, result, result_chars, "
               "truncated")
SESSION_QUERY = ("SELECT s.id, s.started, coalesce(max(r.time), s.started), s.env, s.client, count(r.seq) "
                 "FROM sessions s LEFT JOIN runs r ON r.session = s.id")


def ledger_path(data_dir: Path) -> Path:
    return Path(data_dir) / "ledger" / "ledger.sqlite"


@dataclass
class Run:
    """One recorded tool call (results and arguments as JSON data)."""

    id: str
    session: str
    env: str | None
    time: float
    tool: str
    given: dict
    resolved: dict | None
    wall_s: float
    ok: bool
    error: str | None = None
    digest: str | None = None
    result: dict | None = None
    result_chars: int | None = None
    truncated: bool = False
    sae: str | None = None
    """The key of the SAE the run addressed (None: none, or several)."""
    features: list[int] = field(default_factory=list)
    """The features it was about; written with the run (a filter of runs()), not read back."""
    result_json: str | None = None
    """The stored result as JSON text, when the writer already has it (saves a second dump)."""


@dataclass(frozen=True)
class Session:
    id: str
    started: float
    last: float
    env: str | None
    client: str | None
    n_runs: int


class LedgerStore:
    """The ledger file; one connection shared by the server's worker threads, one writer at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = open_db(self.path)
        # Runs are written on the server's event loop: never wait long for another writer of this file (a second
        # server on the same data dir holds the lock for one insert); past this the run is logged as not recorded.
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.conn.executescript(SCHEMA)
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
                              (session, started, env, client))

    def record(self, run: Run) -> None:
        """The run as one row (one statement: committed when this returns)."""
        result = run.result_json if run.result_json is not None else _json(run.result)
        row = (run.id, run.session, run.env, run.time, run.tool, _json(run.given), _json(run.resolved), run.wall_s,
               int(run.ok), run.error, run.digest, result, run.result_chars, int(run.truncated), run.sae,
               f" {' '.join(map(str, run.features))} " if run.features else None)
        with self._lock:
            self.conn.execute(f"INSERT INTO runs ({RUN_COLUMNS}, sae, features) VALUES ({','.join('?' * 16)})", row)

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
             sae: str | None = None, limit: int = 1000, newest_first: bool = False) -> list[Run]:
        """Runs matching every filter given, in order of recording (or newest first)."""
        where, args = [], []
        for column, value in (("session", session), ("tool", tool)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if feature is not None:  # features: ' 3 17 102 '
            where.append("features LIKE ?" + (" AND (sae = ? OR sae IS NULL)" if sae else ""))
            args += [f"% {int(feature)} %"] + ([sae] if sae else [])
        sql = (f"SELECT {RUN_COLUMNS} FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
               + f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?")
        with self._lock:
            rows = self.conn.execute(sql, [*args, limit]).fetchall()
        return [_run_of(r) for r in rows]

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

    def count(self, session: str | None = None) -> int:
        with self._lock:
            if session is None:
                return int(self.conn.execute("SELECT count(*) FROM runs").fetchone()[0])
            return int(self.conn.execute("SELECT count(*) FROM runs WHERE session = ?", (session,)).fetchone()[0])


def _json(value: object) -> str | None:
    """JSON text (pydantic-core writes it ~4x faster than json.dumps: this runs before every answer)."""
    return None if value is None else pydantic_core.to_json(value, fallback=str).decode()


def _run_of(row: Iterable) -> Run:
    (rid, session, env, t, tool, given, resolved, wall_s, ok, error, digest, result, chars, truncated) = row
    return Run(id=rid, session=session, env=env, time=t, tool=tool, given=json.loads(given),
               resolved=None if resolved is None else json.loads(resolved), wall_s=wall_s, ok=bool(ok), error=error,
               digest=digest, result=None if result is None else json.loads(result), result_chars=chars,
               truncated=bool(truncated))


def open_existing(data_dir: Path) -> LedgerStore | None:
    """The data dir's ledger, or None when it has none (reading never creates one)."""
    path = ledger_path(data_dir)
    if not path.exists():
        return None
    try:
        return LedgerStore(path)
    except sqlite3.DatabaseError:
        return None
