"""The feature index against plain computations: the brute-force loop the tutorial's way (every window through
run_with_cache_with_saes, every token's activations kept, then sorted), the sample hash in Python integers, and an
index file turned back into the format before interval samples."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import torch

from sae_mcp.engine.runtime import Engine

from helpers.models import stories_texts
from helpers.plain import tutorial_sae_acts

TOKENS = 12_000  # the scan budget the index tests check against brute force: ~100 windows, brute force ~2 s
FEATURES = list(range(0, 256, 9))  # the sample of 29 features they check


def brute_force(engine: Engine, max_tokens: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Every scanned token's activations [N, d_sae] and its (document, offset), windows one at a time."""
    tok, ctx, bos = engine.model.tokenizer, 128, 1
    rows, locs, n = [], [], 0
    for d, text in enumerate(stories_texts()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), ctx - 1):
            if n >= max_tokens:
                break
            window = torch.tensor([[bos] + ids[start : start + ctx - 1]])
            acts = tutorial_sae_acts(engine, window)[0, 1:]  # BOS is context, not scanned
            rows.append(acts)
            locs += [(d, start + p) for p in range(acts.shape[0])]
            n += acts.shape[0]
        if n >= max_tokens:
            break
    return torch.cat(rows), locs


def plain_top(acts: torch.Tensor, locs: list[tuple[int, int]], feature: int, k: int) -> list[tuple[float, tuple]]:
    """The feature's k largest firing activations with their (document, offset), ties by scan order."""
    order = sorted(range(len(locs)), key=lambda i: (-float(acts[i, feature]), i))
    return [(float(acts[i, feature]), locs[i]) for i in order[:k] if acts[i, feature] > 0]


def plain_hash(p: int) -> int:
    """pos_hash in Python integers (arbitrary precision: no int64 wrap can hide here)."""
    x = p ^ (p >> 16)
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x046CA68B) % 2**32
    return x ^ (x >> 16)


def make_format_1(path: Path) -> None:
    """Turn an index file into what the code before interval samples wrote: no sample columns, format 1."""
    con = sqlite3.connect(path)
    for col in ("samp_pos", "samp_vals", "samp_bins"):
        con.execute(f"ALTER TABLE scans DROP COLUMN {col}")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    con.commit()
    con.close()
