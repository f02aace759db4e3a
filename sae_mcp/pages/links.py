"""A link from a tool result to the page that shows its feature, so a person can open what the agent saw.

When pages are served (`serve --transport http`, or a dashboard elsewhere named by `--dashboard-url`), a result
that names one feature gets `page`: that feature's page URL, in its structured content, and as the last line of
its text for the tools declared with page_in_text (feature_card, top_examples, trace_circuit: the views a person
opens; elsewhere the line was noise the agent skipped). One feature: the result's own `feature` (feature_card,
top_examples, project_to_vocab, label_feature), else the arguments' only feature (`feature`, or `features` holding
one, e.g. feature_stats(features=[f]), steer_generate with one feature). A result holding a circuit graph
(trace_circuit's) gets the URL of its circuit page, /circuits/<run_id>, which exists only when the ledger recorded
the call (the run id names the graph kept in circuits/store.py). SaeMcpServer.call_tool adds either, for every
tool, after the ledger has recorded the result (where pages are served is not part of what a call computed). A
URL never carries the token: the base is checked here.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from mcp.types import CallToolResult, TextContent

from sae_mcp.circuits.store import CIRCUIT_SCHEMA_PREFIX
from sae_mcp.errors import InvalidInput

Answer = TypeVar("Answer")
"""A tool call's answer: a CallToolResult gets the link; anything else (a request for client input) passes as is."""

PAGE_SCHEMA = {"type": "string", "description": "This feature's page on the dashboard (open it to see the results)"}
CIRCUIT_PAGE_SCHEMA = {"type": "string", "description": "This circuit's page on the dashboard: the graph drawn, each "
                       "feature node linked to its feature page"}


def check_base(url: str) -> str:
    """'http://host:8765/' -> 'http://host:8765'; InvalidInput for anything but a plain http(s) base URL (a query,
    a fragment or user info could carry a credential into every result)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"--dashboard-url {url!r} is not an http(s) URL: give e.g. http://127.0.0.1:8765")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise InvalidInput(f"--dashboard-url {url!r}: give the base URL only, without a query, fragment or user "
                           "(a token never belongs in a link; pages take it once as ?token= when opened)")
    return url.strip().rstrip("/")


def _one_feature(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and len(value) == 1:
        item = value[0]
        return _one_feature(item.get("feature") if isinstance(item, dict) else item)
    return None


class PageLinks:
    def __init__(self, base: str, sae_keys: list[str]):
        self.base = check_base(base)
        self.only_sae = sae_keys[0] if len(sae_keys) == 1 else None

    def url(self, sae: str, feature: int) -> str:
        return f"{self.base}/features/{quote(sae, safe='')}/{feature}"

    def page_of(self, arguments: dict[str, Any], structured: dict[str, Any]) -> str | None:
        feature = structured.get("feature")
        if not isinstance(feature, int) or isinstance(feature, bool):
            feature = _one_feature(arguments.get("feature", arguments.get("features")))
        sae = structured.get("sae") if isinstance(structured.get("sae"), str) else arguments.get("sae")
        sae = sae if isinstance(sae, str) and sae else self.only_sae
        return None if feature is None or sae is None else self.url(sae, feature)

    def circuit_url(self, run_id: str) -> str:
        return f"{self.base}/circuits/{quote(run_id, safe='')}"

    def add(self, result: Answer, arguments: dict[str, Any], in_text: bool = False) -> Answer:
        """The result with `page` added when it names one feature (in place, as the ledger adds run_id)."""
        if not isinstance(result, CallToolResult) or result.is_error or result.structured_content is None:
            return result
        page = self.page_of(arguments or {}, result.structured_content)
        if page is not None:
            with_page(result, page, in_text)
        return result

    def add_circuit(self, result: Answer, run_id: str, in_text: bool = True) -> Answer:
        """The result with `page`: its circuit's page (in place)."""
        if isinstance(result, CallToolResult) and not result.is_error and result.structured_content is not None:
            with_page(result, self.circuit_url(run_id), in_text)
        return result


def with_page(result: CallToolResult, page: str, in_text: bool) -> CallToolResult:
    """`page` in the structured content and, in_text, as the last line of the first text (in place)."""
    assert result.structured_content is not None
    result.structured_content["page"] = page
    for i, c in enumerate(result.content if in_text else []):
        if isinstance(c, TextContent):
            result.content[i] = TextContent.model_construct(type="text", text=f"{c.text}\npage: {page}",
                                                            annotations=c.annotations, meta=c.meta)
            break
    return result


def names_features(input_schema: dict[str, Any]) -> bool:
    """Whether a tool's results can name one feature (it takes `feature` or `features`)."""
    props = input_schema.get("properties", {})
    return "feature" in props or "features" in props


def draws_circuit(output_schema: dict[str, Any] | None) -> bool:
    """Whether a tool's results hold a circuit graph: its output schema's `graph` is a model whose schema_name
    defaults to 'sae-mcp circuit ...' (results/circuits.py CircuitGraph), whatever the tool is called."""
    props = (output_schema or {}).get("properties", {})
    graph = props.get("graph") if isinstance(props, dict) else None
    ref = graph.get("$ref", "") if isinstance(graph, dict) else ""
    if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
        return False
    model = (output_schema or {}).get("$defs", {}).get(ref.removeprefix("#/$defs/"), {})
    default = model.get("properties", {}).get("schema_name", {}).get("default")
    return isinstance(default, str) and default.startswith(CIRCUIT_SCHEMA_PREFIX)
