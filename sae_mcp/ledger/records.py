"""The ledger's rows as objects: a recorded run, a session, what a prune did (ledger/store.py reads and writes them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Run:
    """One recorded tool call (results and arguments as JSON data)."""

    id: str
    session: str
    env: str | None
    time: float
    tool: str
    given: dict
    """The arguments as given (a listing, runs(light=True), holds the brief copy: long values cut)."""
    resolved: dict | None
    wall_s: float
    ok: bool
    error: str | None = None
    digest: str | None = None
    result: dict | None = None
    """A copy of the result (None in a listing: `summary` has its key numbers)."""
    result_chars: int | None = None
    truncated: bool = False
    """The result copy was cut (fit)."""
    args_cut: bool = False
    """The arguments were cut (a rejected call's, beyond MAX_REJECTED_CHARS or BOUNDED_STR)."""
    summary: str | None = None
    """Its key numbers in one line (ledger/summary.py summarize), written with the run; None for a run recorded before
    summaries were (listed with its result instead)."""
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


@dataclass(frozen=True)
class Pruned:
    """What a prune deleted and kept."""

    runs: int
    """Runs deleted."""
    kept: int
    """Runs it would have deleted but kept: a label cites them."""
    sessions: list[str]
    """Sessions it left without runs, deleted with them."""
    used_bytes: int
    """Bytes of the file's pages in use after it."""
