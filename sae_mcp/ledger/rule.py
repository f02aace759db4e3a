"""What the ledger knows of one tool: how to record its calls, and what its recorded runs are to those who read
them (listings, the feature page, the blind-scoring check, the size cap).

Each tool states its LedgerRule in its own module (sae_mcp/server/tools/<tool>.py, ToolSpec.ledger; None there: the tool
is not recorded). The ledger and its readers are handed the registered tools by name (Services(tools=...)) and read
them through `Recorded`, the one attribute they need, so nothing here imports the tools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.errors import SaeMcpError

JSON = dict[str, Any]


@dataclass(frozen=True)
class ResolveContext:
    """What resolving a call's arguments may read besides its result (never device work: it runs before the answer
    is sent)."""

    engine: Engine
    max_activation: Callable[[str, int], tuple[float, str] | None] | None = None
    """(sae key, feature) -> (value, where): the example source's cached max activation (exact coefficients)."""
    corpus_of: Callable[[str], dict | None] | None = None
    """sae key -> the corpus dict of the recorded environment, or None."""

    def sae(self, key: str | None) -> LoadedSAE | None:
        """The loaded SAE `key` names (the only one when None), or None when none does."""
        try:
            return self.engine.sae(key)
        except SaeMcpError:
            return None


Summary = Callable[[JSON], str]
"""A recorded result (maybe a cut copy: missing keys raise KeyError, and the summary falls back) -> its key numbers."""
Resolve = Callable[[JSON, JSON, ResolveContext], JSON]
"""(the arguments resolved so far, the result, the context) -> the arguments it adds or replaces."""
ResultFeatures = Callable[[JSON], Iterable[int]]
"""A result -> the features it lists."""


@dataclass(frozen=True)
class LedgerRule:
    """How the ledger records one tool's calls, and what their runs are to the ledger's readers."""

    summary: Summary | None
    """Its key numbers in one line, from a recorded result; None: the result's JSON, cut to 160 characters."""
    volatile: tuple[str, ...]
    """Result fields (a.b: b inside a) left out of the digest: they differ between identical calls (timings,
    whether it was cached, the ids a store hands out)."""
    bos: Literal["sae", "model"] | None
    """Where its prompts' BOS comes from: "sae", the SAE it addresses (its `sae` resolved to that SAE's key);
    "model", the model's default; None: it reads no prompt."""
    resolve: Resolve | None
    """What else an export needs to redo a run, read from its result; None: nothing."""
    features: ResultFeatures | None
    """The features its result lists besides those its arguments name (ledger(feature=) finds the run by both)."""
    keeps_runs: bool
    """Its successful runs are never pruned (the runs that recorded a label)."""
    looks_up: bool
    """Its string arguments are text it shows activations on: run on a context of an open blind set, it makes
    that set's score not blind."""
    on_feature_page: bool
    """The feature page lists its runs of that feature."""


UNKNOWN = LedgerRule(summary=None, volatile=(), bos=None, resolve=None, features=None, keeps_runs=False,
                     looks_up=False, on_feature_page=False)
"""The rule of a tool the server does not register (a name a client made up, a run of an older version)."""


class Recorded(Protocol):
    """A registered tool as the ledger reads it (sae_mcp/server/tools/spec.py ToolSpec)."""

    @property
    def ledger(self) -> LedgerRule | None: ...


def rule_of(tools: Mapping[str, Recorded], tool: str) -> LedgerRule:
    """The ledger rule of `tool`: its own, or UNKNOWN for a tool not registered or not recorded."""
    found = tools.get(tool)
    return (found.ledger if found is not None else None) or UNKNOWN


def tools_where(tools: Mapping[str, Recorded], fact: Callable[[LedgerRule], bool]) -> list[str]:
    """The names of the recorded tools whose rule has `fact`, in registration order."""
    return [name for name, t in tools.items() if t.ledger is not None and fact(t.ledger)]
