"""The shards of a Ray-built index (index/ray_driver.py) as stored: plans, rows and the final merge.

A shard is a range of windows [start, end) of one corpus stream holding `target` document tokens; its state is
checkpointed as its own scan row 'index/shard-<i>:<start>-<end>' in the index file (the range is in the name, so
a rerun can tell whether stored rows still fit what it must scan). The 'index' row is their merge.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass

from sae_mcp.index.merge import merge_all
from sae_mcp.index.ray_worker import Walk
from sae_mcp.index.source import INDEX, resume_state
from sae_mcp.index.state import ScanState
from sae_mcp.index.store import IndexStore, StoredScan

SHARD_PREFIX = "index/shard-"
_SHARD_NAME = re.compile(r"^index/shard-(\d+):(\d+)-(\d+)$")


@dataclass
class Shard:
    """A range of windows [start, end) holding `target` document tokens, and its last checkpoint."""

    number: int
    start: int
    end: int
    target: int
    row: StoredScan | None = None
    failures: int = 0
    live: int = 0  # tokens the running chunk has reached (polled)

    @property
    def name(self) -> str:
        return f"{SHARD_PREFIX}{self.number}:{self.start}-{self.end}"

    @property
    def resume(self) -> int:
        return self.row.windows if self.row is not None else self.start

    @property
    def tokens(self) -> int:
        return max(self.row.tokens if self.row is not None else 0, self.live)

    @property
    def done(self) -> bool:
        return self.row is not None and self.row.windows >= self.end


def plan_shards(walk: Walk, n: int) -> list[Shard]:
    """Contiguous runs of the walk's buffers (one per start cursor), cut at the cursors nearest to k/n of its
    tokens (fewer shards when there are fewer buffers). Cursors count tokens from the walk's start."""
    cur = walk.cursors
    toks = [c.tokens for c in cur]
    cuts = {0, len(cur) - 1}
    for k in range(1, n):
        goal = walk.tokens * k / n
        i = bisect.bisect_left(toks, goal)  # the first cursor at or past the goal
        if 0 < i < len(toks) and goal - toks[i - 1] < toks[i] - goal:
            i -= 1
        cuts.add(min(max(i, 1), len(cur) - 1))
    at = sorted(cuts)
    return [Shard(i, cur[a].window, cur[b].window, toks[b] - toks[a]) for i, (a, b) in enumerate(zip(at, at[1:]))]


def batch_for(walk: Walk, n_shards: int, ceiling: int, slack: float = 1.1) -> int:
    """Windows a batch when none is asked for: the largest <= ceiling (what memory allows) that cuts the walk into
    runs of whole buffers the n_shards can share evenly (the fullest shard within `slack` of the mean). `walk` has
    a cursor every buffer of one-window batches, and a buffer of b-window batches is b of those. E.g. ~1M tokens
    (312 such buffers) on 2 CPU workers: 57, not 64 (5 buffers would split 3:2); 100M tokens on 8 GPUs: 859."""
    buffers = len(walk.cursors) - 1  # the last one may be partial
    n = max(1, n_shards)
    for b in range(min(ceiling, max(1, buffers // n)), 0, -1):
        count = -(-buffers // b)  # buffers of b-window batches, the last one maybe partial
        if -(-count // n) * b <= slack * buffers / n:  # the fullest shard's share against the mean
            return b
    return 1


def reuse_shards(rows: list[StoredScan], walk: Walk) -> list[Shard] | None:
    """Stored shard rows as the plan: each row's range must start and end on the walk's cursors and hold the
    tokens the walk counts there, and no two may overlap. Ranges no row covers (shards not checkpointed yet when
    the last run stopped) become shards of their own. None when a row does not fit (another budget, another
    start): the caller drops them and plans anew."""
    tokens_at = {c.window: c.tokens for c in walk.cursors}
    shards = []
    for row in rows:
        m = _SHARD_NAME.match(row.name)
        if m is None:
            return None
        number, start, end = map(int, m.groups())
        if start not in tokens_at or end not in tokens_at or tokens_at[end] - tokens_at[start] != row.target:
            return None
        shards.append(Shard(number, start, end, row.target, row=row))
    shards.sort(key=lambda s: s.start)
    if not shards or any(a.end > b.start for a, b in zip(shards, shards[1:])):
        return None
    bounds = [walk.start] + [w for s in shards for w in (s.start, s.end)] + [walk.end]
    gaps = [(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if a < b]
    number = max(s.number for s in shards) + 1
    shards += [Shard(number + i, a, b, tokens_at[b] - tokens_at[a]) for i, (a, b) in enumerate(gaps)]
    return sorted(shards, key=lambda s: s.start)


def join_dtypes(*names: str | None) -> str:
    """The compute dtypes a merged scan was computed in, e.g. 'float32' or 'bfloat16+float32'."""
    return "+".join(sorted({n for n in names if n})) or "unknown"


def shard_rows(index: IndexStore) -> list[StoredScan]:
    names = [r[0] for r in index.conn.execute("SELECT name FROM scans WHERE name LIKE ?", (SHARD_PREFIX + "%",))]
    return [row for n in names if (row := index.load_scan(n)) is not None]  # (a row deleted meanwhile: gone)


def save_row(index: IndexStore, name: str, row: StoredScan) -> None:
    index.save_scan(dataclasses.replace(row, name=name))


def _state(row: StoredScan) -> ScanState:
    """A row to merge -> its running state on the CPU (every shard row and resumed base has its samples)."""
    st = resume_state(row, "cpu")
    if st is None:
        raise ValueError(f"scan row {row.name!r} has no interval samples in this version's layout: it cannot be merged")
    return st


def merge_into_index(index: IndexStore, base: StoredScan | None, shards: list[Shard], walk: Walk, target: int
                     ) -> None:
    """The 'index' row := merge(base, shards), with the walk's end and exhaustion; the shard rows are deleted in
    the same transaction (a crash leaves either the shards or the merged row, never both counted)."""
    unfinished = [s.number for s in shards if s.row is None]
    if unfinished:
        raise ValueError(f"shards {unfinished} have no row yet: only finished shards are merged")
    parts = ([base] if base is not None else []) + [s.row for s in shards if s.row is not None]
    st = merge_all(_state(p) for p in parts)
    merged = StoredScan(
        name=INDEX, tokens=st.tokens, windows=walk.end, exhausted=walk.exhausted, target=target, updated=0.0,
        top_vals=st.top_vals.numpy(), top_pos=st.top_pos.numpy(), n_fired=st.n_fired.numpy(), hist=st.hist.numpy(),
        compute_dtype=join_dtypes(*(p.compute_dtype for p in parts if p.tokens)),
        samp_pos=st.samp_pos.numpy(), samp_vals=st.samp_vals.numpy(),
    )
    index.conn.execute("BEGIN")
    try:
        save_row(index, INDEX, merged)
        index.conn.execute("DELETE FROM scans WHERE name LIKE ?", (SHARD_PREFIX + "%",))
    except BaseException:
        index.conn.execute("ROLLBACK")
        raise
    index.conn.execute("COMMIT")
