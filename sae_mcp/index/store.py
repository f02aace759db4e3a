"""The feature index on disk: one SQLite file (WAL) per (model, SAE weights, corpus).

    <data_dir>/index/<model>/<sae>/<corpus>.sqlite      <sae> = the SAE's store key: its source, plus the
                                                        weights' hash for a local folder (a retrained SAE in the
                                                        same folder gets a new file, never the old index)
      meta(key, value)             what the file describes: model, SAE, its weights id, corpus, its fingerprint,
                                   window length, BOS
      windows(id, document, start, tokens)   every scanned window's token ids (int32 blob), to show contexts
      scans(name, ...)             one row per scan: 'index' (all features) or 'feature:<f>' (on-demand scans):
                                   progress (tokens, windows, exhausted, target) and the state as blobs:
                                   top_vals [K, F] float32, top_pos [K, F] int64, n_fired [F] int64, hist [F, NB] int64,
                                   and compute_dtype, the precision its activations were computed in (per scan,
                                   not in meta: a file stays valid when the server moves between CPU and CUDA;
                                   NULL in rows written before it was recorded);
                                   the interval samples samp_pos [F, SB, S] int64, samp_vals [F, SB, S] float32
                                   and samp_bins = SB (index/samples.py): NULL in rows written by format 1

Format (meta 'format'): 2 = scan rows may hold interval samples. A format-1 file opens as it is (its meta is
updated to 2, its rows keep NULL samples and answer without intervals; ExampleSource rescans such a row when a
scan of it is asked for, since samples cannot be added to a finished scan).

The state is written as a whole at checkpoints (a 24576-feature SAE: ~27 MB, plus ~38 MB of samples), in one
transaction, so a crash or a cancel leaves the last checkpoint, from which a re-run resumes. Windows are immutable
given the corpus fingerprint and are written as they are scanned (INSERT OR IGNORE), before the checkpoint that
refers to them.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_mcp.store.db import add_columns, open_db, slug

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY, document INTEGER NOT NULL, start INTEGER NOT NULL,
                                    tokens BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS scans (
    name TEXT PRIMARY KEY, n_features INTEGER NOT NULL, k INTEGER NOT NULL,
    tokens INTEGER NOT NULL, windows INTEGER NOT NULL, exhausted INTEGER NOT NULL, target INTEGER NOT NULL,
    updated REAL NOT NULL, top_vals BLOB, top_pos BLOB, n_fired BLOB, hist BLOB, compute_dtype TEXT,
    samp_pos BLOB, samp_vals BLOB, samp_bins INTEGER
);
"""
SCAN_COLUMNS = ("name, n_features, k, tokens, windows, exhausted, target, updated, top_vals, top_pos, n_fired, hist, "
                "compute_dtype, samp_pos, samp_vals, samp_bins")
ADDED_COLUMNS = (("compute_dtype", "TEXT"), ("samp_pos", "BLOB"), ("samp_vals", "BLOB"), ("samp_bins", "INTEGER"))
FORMAT = "2"  # 2: rows may hold interval samples
READABLE_FORMATS = ("1", "2")  # 1: before interval samples (opened as is, answered without intervals)


def index_path(data_dir: Path, model_key: str, sae_key: str, corpus_key: str) -> Path:
    """`sae_key` is LoadedSAE.store_key (source + weights id), so the path changes with a local SAE's weights."""
    return Path(data_dir) / "index" / slug(model_key) / slug(sae_key) / f"{slug(corpus_key)}.sqlite"


def same_meta(old: dict[str, str], new: dict[str, str]) -> bool:
    """Whether a file's meta describes the index `new` asks for. A file written before weights were recorded
    (no 'weights' key) still matches an SAE whose weights are fixed by its name (weights id = source: the
    pretrained directory), so those indexes are kept; a local folder's file never lacks it (its path has it)."""
    if old.get("format") in READABLE_FORMATS:  # an older format this code reads: the same index
        old = {**old, "format": new.get("format", FORMAT)}
    if old == new:
        return True
    legacy = {k: v for k, v in new.items() if k != "weights"}
    return "weights" not in old and new.get("weights") == new.get("sae") and old == legacy


@dataclass
class StoredScan:
    """A scan row read back as host arrays."""

    name: str
    tokens: int
    windows: int
    exhausted: bool
    target: int
    updated: float
    top_vals: np.ndarray  # [K, F] float32
    top_pos: np.ndarray  # [K, F] int64
    n_fired: np.ndarray  # [F] int64
    hist: np.ndarray  # [F, NB] int64
    compute_dtype: str | None = None  # e.g. 'float32', 'bfloat16' (CUDA autocast); None: not recorded
    samp_pos: np.ndarray | None = None  # [F, SB, S] int64; None: a row written before interval samples
    samp_vals: np.ndarray | None = None  # [F, SB, S] float32


class IndexStore:
    def __init__(self, path: Path, meta: dict[str, str]):
        """Open (creating) the file; when its meta differs from `meta` (e.g. the corpus file changed), it is
        emptied: an index is only valid for exactly the corpus and windowing it was built on."""
        self.path = Path(path)
        self.conn = open_db(self.path)
        self.conn.executescript(SCHEMA)
        add_columns(self.conn, "scans", ADDED_COLUMNS)  # a file from before the column existed
        self._lock = threading.Lock()
        old = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if old and not same_meta(old, meta):
            self.conn.executescript("DELETE FROM windows; DELETE FROM scans; DELETE FROM meta;")
        if old != meta:
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
        self.meta = meta

    # -- windows ------------------------------------------------------------------------------------------------

    def put_windows(self, rows: list[tuple[int, int, int, list[int]]]) -> None:
        """(id, document, start, token ids) for each window; already stored ones are kept."""
        data = [(i, d, s, np.asarray(ids, dtype=np.int32).tobytes()) for i, d, s, ids in rows]
        with self._lock:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR IGNORE INTO windows VALUES (?, ?, ?, ?)", data)
            self.conn.execute("COMMIT")

    def get_windows(self, ids: list[int]) -> dict[int, tuple[int, int, list[int]]]:
        """window id -> (document, start, token ids)."""
        out = {}
        uniq = sorted(set(int(i) for i in ids))
        for c in range(0, len(uniq), 500):
            chunk = uniq[c : c + 500]
            q = f"SELECT id, document, start, tokens FROM windows WHERE id IN ({','.join('?' * len(chunk))})"
            for i, d, s, blob in self.conn.execute(q, chunk):
                out[i] = (d, s, np.frombuffer(blob, dtype=np.int32).tolist())
        return out

    # -- scans --------------------------------------------------------------------------------------------------

    def save_scan(self, scan: StoredScan) -> None:
        """Write `scan` as the row scan.name (replacing it), stamped with the time of this write: scan.updated is
        not read, load_scan gives the stamp back as `updated`. Without interval samples (samp_pos or samp_vals
        None) the row has none."""
        samples = None if scan.samp_pos is None or scan.samp_vals is None else (scan.samp_pos, scan.samp_vals)
        row = (
            scan.name, int(scan.top_vals.shape[1]), int(scan.top_vals.shape[0]), int(scan.tokens), int(scan.windows),
            int(scan.exhausted), int(scan.target), time.time(),
            np.ascontiguousarray(scan.top_vals, dtype=np.float32).tobytes(),
            np.ascontiguousarray(scan.top_pos, dtype=np.int64).tobytes(),
            np.ascontiguousarray(scan.n_fired, dtype=np.int64).tobytes(),
            np.ascontiguousarray(scan.hist, dtype=np.int64).tobytes(),
            scan.compute_dtype,
            np.ascontiguousarray(samples[0], dtype=np.int64).tobytes() if samples else None,  # [F, SB, S]
            np.ascontiguousarray(samples[1], dtype=np.float32).tobytes() if samples else None,  # [F, SB, S]
            int(samples[0].shape[1]) if samples else None,
        )
        with self._lock:
            marks = ", ".join("?" * len(row))
            self.conn.execute(f"INSERT OR REPLACE INTO scans ({SCAN_COLUMNS}) VALUES ({marks})", row)

    def scan_updated(self, name: str) -> float | None:
        row = self.conn.execute("SELECT updated FROM scans WHERE name = ?", (name,)).fetchone()
        return None if row is None else float(row[0])

    def load_scan(self, name: str) -> StoredScan | None:
        row = self.conn.execute(
            "SELECT n_features, k, tokens, windows, exhausted, target, updated, top_vals, top_pos, n_fired, hist, "
            "compute_dtype, samp_pos, samp_vals, samp_bins FROM scans WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        f, k, tokens, windows, exhausted, target, updated, tv, tp, nf, h, dt, sp, sv, sb = row
        has = sp is not None and sv is not None and sb
        return StoredScan(
            name=name, tokens=tokens, windows=windows, exhausted=bool(exhausted), target=target, updated=updated,
            top_vals=np.frombuffer(tv, dtype=np.float32).reshape(k, f),
            top_pos=np.frombuffer(tp, dtype=np.int64).reshape(k, f),
            n_fired=np.frombuffer(nf, dtype=np.int64).reshape(f),
            hist=np.frombuffer(h, dtype=np.int64).reshape(f, -1),
            compute_dtype=dt,
            samp_pos=np.frombuffer(sp, dtype=np.int64).reshape(f, sb, -1) if has else None,
            samp_vals=np.frombuffer(sv, dtype=np.float32).reshape(f, sb, -1) if has else None,
        )

    def close(self) -> None:
        self.conn.close()


def meta_for(model_key: str, sae_source: str, corpus_key: str, fingerprint: str, context_size: int,
             bos: int | None, d_sae: int, weights_id: str = "") -> dict[str, str]:
    """`weights_id` is LoadedSAE.weights_id (RELEASE/SAE_ID, or the hash of a local folder's weights)."""
    return {
        "model": model_key, "sae": sae_source, "weights": weights_id or sae_source, "corpus": corpus_key,
        "fingerprint": fingerprint,
        "context_size": str(context_size), "bos": json.dumps(bos), "d_sae": str(d_sae), "format": FORMAT,
    }
