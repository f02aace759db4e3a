"""Corpus tools: top_examples (max-activating examples, from the index or an on-demand scan) and build_index.

No `from __future__ import annotations`: the SDK reads these annotations at registration.
"""

import base64
import logging
from typing import Annotated

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult, ImageContent, ToolAnnotations
from pydantic import Field

from sae_mcp.engine.corpus import resolve_corpus
from sae_mcp.engine.runtime import CancelToken, Engine
from sae_mcp.engine.scan import KEEP
from sae_mcp.errors import SaeMcpError
from sae_mcp.results.corpus import IndexReport, TopExamples
from sae_mcp.server.args import engine_args
from sae_mcp.server.progress import progress_reporter
from sae_mcp.server.render import histogram_png
from sae_mcp.server.wiring import ToolDecorator, as_tool_result
from sae_mcp.services import Services
from sae_mcp.services.example_source import DEFAULT_CONTEXT, DEFAULT_SCAN_TOKENS, MAX_CONTEXT, MAX_SCAN_TOKENS
from sae_mcp.services.example_view import DEFAULT_PER_INTERVAL, MAX_INTERVALS, MAX_PER_INTERVAL
from sae_mcp.settings import Settings

log = logging.getLogger(__name__)

# A tool call holds the device between batches only, but an agent should not start an hours-long scan by accident:
# ~2M tokens is minutes on a GPU and the size of the index that answers most questions about common features.
MAX_INDEX_TOKENS = 2_000_000


def corpus_is_remote(engine: Engine, settings: Settings) -> bool:
    """Whether a scan may stream a Hugging Face dataset: True unless every loaded SAE's corpus is a local file
    (an SAE with no usable corpus counts as remote: the hint errs on the side of saying 'may reach out')."""
    for s in engine.saes.values():
        try:
            if resolve_corpus(settings.corpus, s.dataset_path).kind == "hf":
                return True
        except SaeMcpError:
            return True
    return False


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    source = services.examples
    A = engine_args(engine)
    # It never modifies the model, but an on-demand scan writes its rows and windows to the SQLite index (a
    # cache: the same call gives the same answer, so idempotent), and may stream a Hugging Face dataset.
    annotations = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                  open_world_hint=corpus_is_remote(engine, services.settings))

    @tool(annotations=annotations, page_in_text=True)
    def top_examples(
        feature: A.Feature,
        sae: A.Sae = None,
        k: Annotated[int, Field(ge=1, le=KEEP)] = 10,
        context: Annotated[int, Field(ge=0, le=MAX_CONTEXT, description="Tokens each side")] = DEFAULT_CONTEXT,
        max_scan_tokens: Annotated[
            int, Field(ge=1, le=MAX_SCAN_TOKENS, description="Without an index: tokens to scan")
        ] = DEFAULT_SCAN_TOKENS,
        plot: Annotated[bool, Field(description="Add a histogram PNG")] = False,
        intervals: Annotated[
            int, Field(ge=0, le=MAX_INTERVALS, description="Activation bands to sample")
        ] = 0,
        per_interval: Annotated[int, Field(ge=1, le=MAX_PER_INTERVAL)] = DEFAULT_PER_INTERVAL,
        mcp_context: Context = None,
    ) -> Annotated[CallToolResult, TopExamples]:
        """A feature's max-activating corpus examples, density, histogram; intervals: samples by band."""
        cancel = CancelToken()
        progress = progress_reporter(mcp_context, cancel, "tokens scanned")
        res = source.top_examples(sae, feature, k=k, context=context, max_scan_tokens=max_scan_tokens,
                                  progress=progress, cancel=cancel, intervals=intervals, per_interval=per_interval)
        result = as_tool_result(res)
        if plot:
            png = histogram_png(res.histogram, f"{res.sae} feature {feature}: fired on {res.n_fired:,} of "
                                f"{res.tokens_scanned:,} tokens (density {res.density:.3g}, max activation "
                                f"{res.max_activation:g})")
            result.content.append(ImageContent(type="image", data=base64.b64encode(png).decode(),
                                               mime_type="image/png"))
        return result

    @tool(annotations=annotations)
    def build_index(
        sae: A.Sae = None,
        tokens: Annotated[int, Field(ge=1_000, le=MAX_INDEX_TOKENS, description="Corpus tokens to scan")] = 200_000,
        mcp_context: Context = None,
    ) -> IndexReport:
        """Index every feature of an SAE in one corpus pass, so the corpus views answer at once."""
        cancel = CancelToken()
        return source.build_index(sae, tokens, progress=progress_reporter(mcp_context, cancel, "tokens indexed"),
                                  cancel=cancel)
