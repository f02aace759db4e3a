"""build_index: one pass over the corpus indexing every feature of an SAE (top examples, interval samples,
density, histogram), so the corpus views answer at once; resumes and reuses, at most MAX_INDEX_TOKENS a call.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated

from mcp.server.mcpserver import Context
from pydantic import Field

from sae_mcp.engine.runtime import CancelToken
from sae_mcp.ledger.export.rules import AS_GIVEN, LISTED
from sae_mcp.ledger.rule import JSON, LedgerRule
from sae_mcp.results.corpus import IndexReport
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.text import fmt
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec
from sae_mcp.server.tools.top_examples import corpus_annotations

# A tool call holds the device between batches only, but an agent should not start an hours-long scan by accident:
# ~2M tokens is minutes on a GPU and the size of the index that answers most questions about common features.
MAX_INDEX_TOKENS = 2_000_000


def make(deps: ToolDeps) -> Callable[..., IndexReport]:
    source, A = deps.services.examples, deps.args

    def build_index(
        sae: Annotated[str | None, A.sae] = None,
        tokens: Annotated[int, Field(ge=1_000, le=MAX_INDEX_TOKENS, description="Corpus tokens to scan")] = 200_000,
        mcp_context: Context | None = None,
    ) -> IndexReport:
        """Index every feature of an SAE in one corpus pass, so the corpus views answer at once."""
        cancel = CancelToken()
        return source.build_index(sae, tokens, progress=progress_reporter(mcp_context, cancel, "tokens indexed"),
                                  cancel=cancel)

    return build_index


def render(r: IndexReport) -> str:
    """build_index without its file's path and the corpus (model_info says which corpus; both stay structured)."""
    how = "reused a finished index" if r.reused else f"{fmt(r.seconds)} s, {fmt(r.tokens_per_second)} tokens/s"
    end = "; the corpus ended before the token budget" if r.exhausted else ""
    return f"indexed sae {r.sae}: {r.tokens_scanned:,} tokens in {r.windows:,} windows ({how}){end}"


def summary(r: JSON) -> str:
    return f"{r.get('tokens_scanned')} tokens in {r.get('windows')} windows"


SPEC = ToolSpec(
    name="build_index",
    make=make,
    result=IndexReport,
    render=render,
    annotations=corpus_annotations,
    page_in_text=False,
    resources=None,
    ledger=LedgerRule(summary=summary, volatile=("seconds", "tokens_per_second", "reused", "path"), bos=None,
                      resolve=None, features=None, keeps_runs=False, looks_up=False, on_feature_page=False),
    export=LISTED,
    replay=AS_GIVEN,
)
