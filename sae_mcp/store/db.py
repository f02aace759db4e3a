"""SQLite plumbing shared by the stores: WAL connections usable from the tool worker threads, and file names."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path


def slug(text: str, max_len: int = 48) -> str:
    """A filesystem-safe, still readable name for a model/SAE/corpus spec, with a short hash for uniqueness."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:max_len] or "x"
    return f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def add_columns(conn: sqlite3.Connection, table: str, columns: Iterable[tuple[str, str]]) -> None:
    """Give a table written by an older version the (name, type) columns it lacks. Another server opening the same
    file may add one first: its 'duplicate column' is taken as done."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns:
        if name in have:
            continue
        try:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating folders) a SQLite database in WAL mode; usable from the tool worker threads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn
