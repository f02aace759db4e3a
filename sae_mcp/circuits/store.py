"""Whole circuit graphs, kept by the ledger run that traced them, for the circuit page (/circuits/<run_id>).

The ledger keeps a bounded copy of every result, which cuts a large graph's node and edge lists; this store keeps
each graph whole. One SQLite file, <data_dir>/circuits/circuits.sqlite, one row per run:

    graphs (seq, run_id, created, bytes, summary: the result without its graph, graph: the graph's JSON)

What is kept is decided by a result's content, not by the tool that made it: a structured result whose `graph`
holds a circuit (its schema_name starts with 'sae-mcp circuit', results/circuits.py). trace_circuit makes them.

Policy: the newest MAX_GRAPHS (200) graphs, and at most MAX_BYTES (64 MiB) of JSON in all; after each write the
oldest beyond either bound are deleted (the newest is always kept) and the freed pages go back to the file system
(incremental auto-vacuum). A graph whose run a label cites as evidence is never deleted (the person checking the
label opens its page), as the ledger never prunes a cited run; cited graphs count toward the bounds, so the store
outgrows them only by graphs that labels cite. A graph is small unless asked large: the demo's 40-node trace is
51 kB, max_nodes=256 on two SAEs (16,132 edges) 1.8 MB, so 64 MiB holds at least 35 of the largest; writing one of
those takes ~20 ms (measured on 2 shared cores, bounds applied), so the server writes on a worker thread.

The file is opened on first use, and a read creates nothing: a dashboard with no traced circuit has no file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_mcp.store.db import open_db

CIRCUIT_SCHEMA_PREFIX = "sae-mcp circuit"
MAX_GRAPHS = 200
MAX_BYTES = 64 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS graphs (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    bytes INTEGER NOT NULL,
    summary TEXT NOT NULL,
    graph TEXT NOT NULL
);
"""


def circuits_path(data_dir: Path) -> Path:
    return Path(data_dir) / "circuits" / "circuits.sqlite"


def circuit_of(structured: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the result without its graph, run_id and page; the graph) when a structured result holds a circuit graph,
    else None."""
    graph = (structured or {}).get("graph")
    if structured is None or not isinstance(graph, dict) or \
            not str(graph.get("schema_name", "")).startswith(CIRCUIT_SCHEMA_PREFIX):
        return None
    summary = {k: v for k, v in structured.items() if k not in ("graph", "run_id", "page")}
    return summary, graph


@dataclass(frozen=True)
class StoredCircuit:
    run_id: str
    created: float
    summary: dict[str, Any]
    graph: dict[str, Any]


class CircuitStore:
    def __init__(self, path: Path, max_graphs: int = MAX_GRAPHS, max_bytes: int = MAX_BYTES,
                 cited: Callable[[], set[str]] = set):
        self.path = Path(path)
        self.max_graphs, self.max_bytes = max_graphs, max_bytes
        self.cited = cited  # the run ids labels cite as evidence (read only when something would be deleted)
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _db(self, create: bool) -> sqlite3.Connection | None:
        """The connection, opened (and the file created) on the first write; None for a read before any file."""
        if self._conn is None:
            if not create and not self.path.exists():
                return None
            conn = open_db(self.path)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file: before its first table
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    def put(self, run_id: str, summary: dict[str, Any], graph: dict[str, Any], created: float | None = None) -> None:
        """Keep one run's circuit (replacing a row of the same run id), then apply the bounds."""
        summary_json, graph_json = json.dumps(summary), json.dumps(graph)
        size = len(summary_json.encode()) + len(graph_json.encode())
        with self._lock:
            conn = self._db(create=True)
            assert conn is not None
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("DELETE FROM graphs WHERE run_id = ?", (run_id,))
                conn.execute("INSERT INTO graphs (run_id, created, bytes, summary, graph) VALUES (?, ?, ?, ?, ?)",
                             (run_id, time.time() if created is None else created, size, summary_json, graph_json))
                deleted = self._bound(conn)
            if deleted:
                conn.execute("PRAGMA incremental_vacuum")

    def _bound(self, conn: sqlite3.Connection) -> int:
        """Delete the oldest rows beyond MAX_GRAPHS or beyond MAX_BYTES counted from the newest (which stays), except
        those of cited runs."""
        stale = conn.execute(
            "SELECT seq, run_id FROM (SELECT seq, run_id, ROW_NUMBER() OVER w AS n, SUM(bytes) OVER w AS total "
            "FROM graphs WINDOW w AS (ORDER BY seq DESC ROWS UNBOUNDED PRECEDING)) "
            "WHERE n > 1 AND (n > ? OR total > ?)",
            (self.max_graphs, self.max_bytes),
        ).fetchall()
        if stale:
            cited = self.cited()
            stale = [(seq, run_id) for seq, run_id in stale if run_id not in cited]
        conn.executemany("DELETE FROM graphs WHERE seq = ?", [(seq,) for seq, _ in stale])
        return len(stale)

    def get(self, run_id: str) -> StoredCircuit | None:
        with self._lock:
            conn = self._db(create=False)
            row = None if conn is None else conn.execute(
                "SELECT run_id, created, summary, graph FROM graphs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        return StoredCircuit(run_id=row[0], created=row[1], summary=json.loads(row[2]), graph=json.loads(row[3]))

    def run_ids(self) -> list[str]:
        """Every kept run id, newest first."""
        with self._lock:
            conn = self._db(create=False)
            rows = [] if conn is None else conn.execute("SELECT run_id FROM graphs ORDER BY seq DESC").fetchall()
        return [r[0] for r in rows]

    def total_bytes(self) -> int:
        with self._lock:
            conn = self._db(create=False)
            return 0 if conn is None else conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM graphs").fetchone()[0]
