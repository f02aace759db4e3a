"""What the exports and replay know of one tool: how a run of it is redone in a script, shown in the report, and
sent again by `sae-mcp ledger replay`.

Each tool states these in its own module (sae_mcp/server/tools/<tool>.py, ToolSpec.export and ToolSpec.replay; None
there: the tool is not recorded, so it has no runs). The exporters are handed the registered tools by name
(load_session(store, ref, tools)) and read them through `Exported`, so nothing here imports the tools.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sae_mcp.ledger.records import Run
from sae_mcp.ledger.rule import JSON, LedgerRule


@dataclass(frozen=True)
class Label:
    """A label the agent recorded, as the exports show it."""

    run_id: str
    sae: str | None
    feature: int
    label: str
    evidence: str | None
    evidence_runs: list[str]
    label_id: int | None = None  # its id in the explanation store (scores name it)
    scored: list[dict] = field(default_factory=list)  # scores of its text known when it was recorded (ScoreBrief)


@dataclass(frozen=True)
class Redone:
    """A run as its export cell redoes it: recorded whole, its result and resolved arguments both there."""

    id: str
    """The run's id."""
    resolved: JSON
    """Its arguments as resolved (the defaults, and what the tool looked up, filled in)."""
    result: JSON
    """Its result (the ledger's copy: cut when truncated)."""
    truncated: bool
    """The result copy was cut (fit): the cell checks what was kept."""


Cell = Callable[[Redone], str]
"""A recorded run -> Python source that redoes it with plain transformer-lens + sae-lens and asserts its numbers."""
Note = Callable[[Run], str | None]
"""A recorded run -> a sentence shown above its cell, or None."""
Details = Callable[[JSON], list[str]]
"""A recorded result -> markdown lines (escaped) with a few more numbers than its one-line summary (the report)."""
LabelOf = Callable[[Run], Label]
"""A successful run -> the label it recorded."""
ScoreOf = Callable[[JSON], JSON | None]
"""A recorded result -> the blind score it filed (an ExplanationScore as JSON), or None when it filed none."""


@dataclass(frozen=True)
class ExportRule:
    """How the exports show one tool's runs."""

    cell: Cell | None
    """Code that redoes a run; None: its runs are listed as markdown only."""
    helpers: tuple[str, ...]
    """The helper code blocks its cells call (preamble.py writes a block two tools share once)."""
    note: Note | None
    """A sentence above a run's cell (how it is checked), besides the cut-copy note every tool gets; None: none."""
    details: Details | None
    """The report's extra lines about a run; None: the summary alone."""
    label: LabelOf | None
    """Its runs record a label (the report's findings): how to read it; None: they record none."""
    score: ScoreOf | None
    """Its runs can file a blind score (the report's findings): where it is in the result; None: they never do."""


LISTED = ExportRule(cell=None, helpers=(), note=None, details=None, label=None, score=None)
"""A tool whose runs the exports list as markdown, with their key numbers, and nothing else."""


class Handed:
    """The blind sets handed out again during one replay: the recorded challenge id -> the replayed one, and its
    submit secret (the recorded one never was)."""

    def __init__(self) -> None:
        self._found: dict[str, tuple[str, str | None]] = {}

    def add(self, recorded: str | None, replayed: str | None, secret: str | None) -> None:
        if recorded and replayed:
            self._found[recorded] = (replayed, secret)

    def get(self, recorded: object) -> tuple[str, str | None] | None:
        """(the replayed challenge id, its secret or None) for a recorded challenge id, or None."""
        return self._found.get(recorded) if isinstance(recorded, str) else None


ReplayArguments = Callable[[JSON, JSON, Handed], JSON]
"""(the arguments as given, as resolved, the blind sets handed out so far) -> the arguments it is sent again with."""
ChallengeOf = Callable[[JSON], str | None]
"""A result -> the id of the blind set it handed out, or None."""


@dataclass(frozen=True)
class ReplayRule:
    """How `sae-mcp ledger replay` sends one tool's runs again."""

    skip_in_place: str | None
    """Why it is not replayed against the real data dir (--in-place), e.g. it writes; None: it is."""
    arguments: ReplayArguments | None
    """The arguments it is sent again with (a seed it drew, a challenge handed out again); None: as given."""
    hands_out: ChallengeOf | None
    """Where its result holds a blind set's id, for the runs answering it to be sent the replayed one; None: none."""


AS_GIVEN = ReplayRule(skip_in_place=None, arguments=None, hands_out=None)
"""A tool replayed with the arguments it was given, wherever replay runs."""


class Exported(Protocol):
    """A registered tool as the exporters read it (sae_mcp/server/tools/spec.py ToolSpec)."""

    @property
    def ledger(self) -> LedgerRule | None: ...

    @property
    def export(self) -> ExportRule | None: ...

    @property
    def replay(self) -> ReplayRule | None: ...


def export_rule(tools: Mapping[str, Exported], tool: str) -> ExportRule:
    found = tools.get(tool)
    return (found.export if found is not None else None) or LISTED


def replay_rule(tools: Mapping[str, Exported], tool: str) -> ReplayRule:
    found = tools.get(tool)
    return (found.replay if found is not None else None) or AS_GIVEN
