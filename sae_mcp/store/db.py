"""SQLite connections: WAL, one file per (model, SAE) under the data dir, safe across threads."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path


def slug(text: str, max_len: int = 48) -> str:
    """A filesystem-safe, still readable name for a model/SAE/corpus spec, with a short hash for uniqueness."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:max_len] or "x"
    return f"{clean}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating folders) a SQLite database in WAL mode; usable from the tool worker threads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def sae_db_path(data_dir: Path, model_name: str, model_source: str, sae_source: str, kind: str) -> Path:
    """<data_dir>/<kind>/<model>/<sae>.sqlite, e.g. index/gpt2-small-…/gpt2-small-res-jb_blocks.7….sqlite."""
    model_key = model_name if model_source == "official" else model_source
    return Path(data_dir) / kind / slug(model_key) / f"{slug(sae_source)}.sqlite"


def sae_store_key(source: str, weights_id: str = "") -> str:
    """The key the stores file an SAE under: its source, plus its weights' id when that is not the source itself.

    Pretrained SAEs (`RELEASE/SAE_ID`) are fixed by name, so their key is the source as before; a local folder's
    key carries the hash of its cfg.json + weights (LoadedSAE.weights_id), so an SAE re-trained into the same
    folder starts with an empty index and no labels, and the same weights find theirs again after a restart.
    """
    return source if not weights_id or weights_id == source else f"{source}#{weights_id}"


def store_key_of(sae) -> str:
    """sae_store_key of a LoadedSAE (or anything with .source and .weights_id)."""
    return sae_store_key(sae.source, getattr(sae, "weights_id", "") or "")
