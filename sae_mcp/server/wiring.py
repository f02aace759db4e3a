"""The MCP server class, and register_tool(server, spec, deps): a tool's ToolSpec (sae_mcp/server/tools/spec.py) made
into an MCP tool.

SaeMcpServer is the SDK's MCPServer with three protocol-level rules an agent needs:
- an argument name the tool does not have is an error naming the valid ones (the SDK would ignore it silently:
  `next_token {"k": 3}` answered 10 tokens), and a validation error reads as one line per bad argument, without
  pydantic's documentation links;
- a prompt asked for without a required argument is an error naming it (the SDK answers "Internal server error");
- any other exception inside a tool is an isError result "internal error in <tool>: <Type>: <message>" (the SDK
  says only "Error executing tool <tool>", which leaves the agent nothing to act on), its traceback logged once to
  stderr, never sent;
- results are shown to the agent compactly: a tool's function returns a pydantic model, which becomes the
  structured content (whole) and the text its spec renders (else compact JSON: server/text.py);
- every call of a tool whose spec has a ledger rule (and of a tool name the server does not know: a failed call
  worth a record) is recorded in the ledger (ledger/recording.py) when `server.ledger` is set: begun and finished here,
  on the event loop (one SQLite insert, ~0.1 ms: measured cheaper than on the tool's worker thread, and no thread
  hop), committed before the answer leaves, which then carries its `run_id` (added here: the ledger takes the
  conversation's session id, server/conversations.py, and the result's structured content); a call that failed is
  recorded with the message the client sees. Recording never fails a call;
- every call's waits for the device end when its client cancels or goes away (progress.watching_request), with or
  without a progress reporter;
- when pages are served (`server.pages`, pages/links.py), a result that names one feature carries `page`,
  the URL of that feature's page, added here after the ledger recorded the result (in its text too where the
  spec says page_in_text);
- a result holding a circuit graph (trace_circuit's, known by its content) is kept whole under its run id
  (`server.circuits`, circuits/store.py: the ledger keeps a bounded copy), on a worker thread (a 256-node graph
  is 1.8 MB of JSON, ~20 ms to write), once the ledger gave it a run id; with pages served it then carries
  `page`, its circuit page's URL. Without the ledger there is no run id, so no graph is kept and no link given.

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

import functools
import logging
from collections.abc import Callable
from typing import Any

import anyio
from mcp import MCPError
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedResourceError, UnexpectedToolError
from mcp.types import CallToolResult, GetPromptResult, TextContent
from mcp_types import INVALID_PARAMS, InputRequiredResult
from mcp_types import Tool as MCPTool
from pydantic import BaseModel, ValidationError

from sae_mcp.circuits.store import CircuitStore, circuit_of
from sae_mcp.errors import SaeMcpError
from sae_mcp.ledger.recording import Ledger, Pending
from sae_mcp.pages.links import CIRCUIT_PAGE_SCHEMA, PAGE_SCHEMA, PageLinks, draws_circuit, names_features
from sae_mcp.server.conversations import Conversations
from sae_mcp.server.progress import watching_request
from sae_mcp.server.text import as_tool_result
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec

SHOWN_INPUT = 60  # characters of a rejected argument value quoted back
SHOWN_REASON = 500  # characters of an unexpected exception's message passed on

log = logging.getLogger(__name__)

RUN_ID_SCHEMA = {"type": "string", "description": "This call's ledger id (cite it in evidence_runs)"}


class SaeMcpServer(MCPServer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._argument_names: dict[str, set[str]] | None = None  # tool -> its input schema's properties
        self._defaults: dict[str, dict[str, Any]] | None = None  # tool -> its arguments' defaults (for the ledger)
        self.ledger: Ledger | None = None  # set when calls are recorded
        self.pages: PageLinks | None = None  # set when the feature pages are served somewhere
        self.circuits: CircuitStore | None = None  # keeps circuit graphs whole (with the ledger)
        self.tools: dict[str, ToolSpec[Any]] = {}  # name -> spec of every tool registered (any result model)
        self.conversations = Conversations()  # the session id of each conversation (the ledger files runs under it)

    def page_in_text(self, name: str) -> bool:
        spec = self.tools.get(name)
        return spec is not None and spec.page_in_text

    def recorded(self, name: str) -> bool:
        """Whether the ledger records calls of `name`: a registered tool's spec says; an unknown name's failed
        call is recorded too."""
        spec = self.tools.get(name)
        return spec is None or spec.ledger is not None

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None
                        ) -> CallToolResult | InputRequiredResult:
        pending = await self._begin(name, arguments, context)
        try:
            result = await self._call_tool(name, arguments, context)
        except Exception as exc:
            if pending is not None:
                pending.fail(" ".join(str(exc).split()) or type(exc).__name__)
            raise
        except BaseException:  # cancelled by the client
            if pending is not None:
                pending.fail("cancelled before it answered")
            raise
        if pending is not None and isinstance(result, CallToolResult):  # (a request for client input is a round,
            run_id = pending.finish(result.structured_content)  # not the run: the final round is)
            if run_id is not None:
                result = with_run_id(result, run_id)
                result = await self._keep_circuit(result, run_id, self.page_in_text(name))
        if self.pages is not None and {"feature", "features"} & await self.argument_names(name):
            result = self.pages.add(result, arguments, self.page_in_text(name))  # as list_tools lists `page`
        return result

    async def _begin(self, name: str, arguments: dict[str, Any], context: Context | None) -> Pending | None:
        """The ledger's record of this call, begun; None when not recording (or when beginning failed: logged)."""
        if self.ledger is None or not self.recorded(name):
            return None
        try:
            await self.argument_names(name)
            session, client = self.conversations.session_of(context)
            return self.ledger.begin(name, arguments, session, client, (self._defaults or {}).get(name, {}))
        except Exception:
            log.warning("could not begin recording the %s call; answering without the ledger", name, exc_info=True)
            return None

    async def _keep_circuit(self, result: CallToolResult, run_id: str, in_text: bool) -> CallToolResult:
        """A result holding a circuit graph: the graph kept under run_id and, with pages served, the link to its
        page added. Keeping it never fails a call (logged: the answer goes out without the link)."""
        found = circuit_of(result.structured_content)
        if found is None or self.circuits is None or result.is_error:
            return result
        try:
            await anyio.to_thread.run_sync(self.circuits.put, run_id, *found)
        except Exception:
            log.warning("could not keep the circuit graph of run %s; answering without its page", run_id,
                        exc_info=True)
            return result
        return result if self.pages is None else self.pages.add_circuit(result, run_id, in_text)

    async def _call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None
                         ) -> CallToolResult | InputRequiredResult:
        valid = await self.argument_names(name)
        unknown = sorted(set(arguments) - valid)
        if valid and unknown:
            raise ToolError(f"{name} has no argument {', '.join(map(repr, unknown))}; its arguments: "
                            f"{', '.join(sorted(valid))}")
        try:
            with watching_request(context):  # its device and row waits end when its client goes away
                return await super().call_tool(name, arguments, context)
        except UnexpectedToolError as exc:
            raise internal_error(name, exc) from exc
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):  # the arguments did not fit the input schema
                raise ToolError(f"invalid arguments for {name}: {validation_message(exc.__cause__)}") from exc.__cause__
            raise

    async def list_tools(self) -> list[MCPTool]:
        """The SDK's tool list with the input schemas written compactly (published_schema): every conversation
        pays for the list before its first call."""
        tools = await super().list_tools()
        if self._defaults is None:  # read before compaction, which leaves out the null defaults
            self._defaults = {t.name: {k: v["default"] for k, v in t.input_schema.get("properties", {}).items()
                                       if isinstance(v, dict) and "default" in v} for t in tools}
        for t in tools:
            t.description = " ".join((t.description or "").split())  # a docstring's line breaks and indentation
            t.input_schema = published_schema(t.input_schema)
            if self.ledger is not None and self.recorded(t.name) and t.output_schema:
                props = t.output_schema.get("properties", {})
                t.output_schema = {**t.output_schema, "properties": {**props, "run_id": RUN_ID_SCHEMA}}
            if self.pages is not None and t.output_schema and names_features(t.input_schema):
                props = t.output_schema.get("properties", {})
                t.output_schema = {**t.output_schema, "properties": {**props, "page": PAGE_SCHEMA}}
            if self.pages is not None and self.ledger is not None and self.circuits is not None and \
                    t.output_schema is not None and draws_circuit(t.output_schema):
                props = t.output_schema.get("properties", {})
                t.output_schema = {**t.output_schema, "properties": {**props, "page": CIRCUIT_PAGE_SCHEMA}}
        return tools

    async def argument_names(self, name: str) -> set[str]:
        """The tool's argument names from its published input schema (empty for an unknown tool)."""
        if self._argument_names is None:
            tools = await self.list_tools()
            self._argument_names = {t.name: set(t.input_schema.get("properties", {})) for t in tools}
        return self._argument_names.get(name, set())

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None, context: Context | None = None
                         ) -> GetPromptResult | InputRequiredResult:
        listed = {p.name: p for p in await self.list_prompts()}
        if name in listed:
            missing = [a.name for a in listed[name].arguments or [] if a.required and not (arguments or {}).get(a.name)]
            if missing:
                raise MCPError(INVALID_PARAMS, f"prompt {name!r} needs the argument(s) {', '.join(missing)}")
        return await super().get_prompt(name, arguments, context)


def with_run_id(result: CallToolResult, run_id: str) -> CallToolResult:
    """The result with run_id in its structured content and as the last line of its first text. In place: the
    result was made for this call (as_tool_result), and a copy would cost as much as the rest of the recording."""
    for i, c in enumerate(result.content):
        if isinstance(c, TextContent):
            result.content[i] = TextContent.model_construct(type="text", text=f"{c.text}\nrun_id: {run_id}",
                                                            annotations=c.annotations, meta=c.meta)
            break
    if result.structured_content is not None:
        result.structured_content["run_id"] = run_id
    return result


def internal_error(name: str, exc: UnexpectedToolError) -> ToolError:
    """A crash inside tool `name` (the SDK's wrapper around it) -> a ToolError whose one-line message names the
    exception, its traceback logged here once. The reason lets the agent change what it asks; the traceback stays
    on the server."""
    cause: BaseException = exc
    while isinstance(cause, (UnexpectedToolError, UnexpectedResourceError)) and cause.__cause__ is not None:
        cause = cause.__cause__  # the SDK's wrappers (nested tool or resource calls) down to what was raised
    log.error("internal error in tool %s", name, exc_info=(type(cause), cause, cause.__traceback__))
    reason = " ".join(str(cause).split()) or "(no message)"
    if len(reason) > SHOWN_REASON:
        reason = reason[:SHOWN_REASON] + "..."
    return ToolError(f"internal error in {name}: {type(cause).__name__}: {reason}")


TYPE_KEYWORDS = {  # JSON Schema keywords that constrain only values of these types (and are ignored on others)
    "number": {"maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum", "multipleOf"},
    "string": {"maxLength", "minLength", "pattern", "format"},
    "array": {"items", "maxItems", "minItems", "uniqueItems", "prefixItems"},
    "object": {"properties", "additionalProperties", "maxProperties", "minProperties", "propertyNames", "required"},
}
FAMILY = {"integer": "number", "number": "number", "string": "string", "array": "array", "object": "object"}


def published_schema(schema: Any) -> Any:
    """A tool's input schema as the agent reads it: the same constraints on every value it may send, in fewer
    characters (every conversation pays for the tool list before its first call; bench/bench_transcript.py):
    - no `title` keywords: pydantic titles every property with its own name capitalised (a property *named* title
      stays: its value is a schema, the keyword's a string);
    - an optional argument, pydantic's {"anyOf": [S, {"type": "null"}], "default": null}, as S: optional is said by
      its absence from `required` (the server still takes an explicit null);
    - a union of simple types, e.g. a position or a list of positions, as one schema with a list of types: each
      option's keywords constrain only values of its own type, so the merged schema accepts the same values;
    - a nested model written where it is used instead of under $defs and a $ref (our models are not recursive),
      without its docstring: the argument that takes it says it.
    """
    if isinstance(schema, list):
        return [published_schema(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: published_schema(v) for k, v in schema.items() if k != "title" or not isinstance(v, str)}
    if "$defs" in out:
        defs = {f"#/$defs/{name}": {k: v for k, v in d.items() if k != "description"}
                for name, d in out.pop("$defs").items()}
        out = inlined(out, defs)
    options = out.get("anyOf")
    if isinstance(options, list):
        options = [o for o in options if o != {"type": "null"}]
        merged = merged_types(options)
        if merged is not None:
            rest = {k: v for k, v in out.items() if k != "anyOf" and not (k == "default" and v is None)}
            out = {**merged, **rest}
    return out


def inlined(schema: Any, defs: dict[str, dict]) -> Any:
    """`schema` with each {"$ref": "#/$defs/X"} replaced by X's schema (then compacted as the rest)."""
    if isinstance(schema, list):
        return [inlined(v, defs) for v in schema]
    if not isinstance(schema, dict):
        return schema
    if set(schema) == {"$ref"} and schema["$ref"] in defs:
        return published_schema(inlined(defs[schema["$ref"]], defs))
    out = {k: inlined(v, defs) for k, v in schema.items()}
    return published_schema(out) if "anyOf" in out else out


def family_of(option: object) -> str | None:
    """The type family of an anyOf option of one simple type; None for anything else."""
    kind = option.get("type") if isinstance(option, dict) else None
    return FAMILY.get(kind) if isinstance(kind, str) else None


def merged_types(options: list) -> dict | None:
    """anyOf options of distinct simple types, each constrained only by its own type's keywords -> one schema
    with the list of types (or the one type); None where that would change what is accepted (a $ref, an enum,
    two options of one family such as integer and number)."""
    families = [family_of(o) for o in options]
    known = [f for f in families if f is not None]
    if not options or len(known) != len(families) or len(set(known)) != len(known):
        return None
    if any(set(o) - {"type", "description"} - TYPE_KEYWORDS[f] for o, f in zip(options, known)):
        return None
    types = [o["type"] for o in options]
    merged = {"type": types[0] if len(types) == 1 else types}
    for o in options:
        merged.update({k: v for k, v in o.items() if k != "type"})
    return merged


def validation_message(exc: ValidationError) -> str:
    """A pydantic ValidationError -> 'top_k: Input should be less than or equal to 100 (given 5000); ...'."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "arguments"
        given = repr(err.get("input"))
        given = given if len(given) <= SHOWN_INPUT else given[:SHOWN_INPUT] + "..."
        parts.append(f"{where}: {err['msg']}" + ("" if err["type"] == "missing" else f" (given {given})"))
    return "; ".join(parts)


def domain_errors(fn: Callable[..., BaseModel], render: Callable[[Any], str] | None
                  ) -> Callable[..., CallToolResult | InputRequiredResult]:
    """Our domain errors become the SDK's ToolError (the caller sees our message as an isError result), and a
    result model becomes a compact CallToolResult (its text rendered by `render`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> CallToolResult | InputRequiredResult:  # the tool's own arguments
        try:
            return as_tool_result(fn(*args, **kwargs), render)
        except SaeMcpError as exc:
            raise ToolError(str(exc)) from exc

    return wrapper


def register_tool(server: SaeMcpServer, spec: ToolSpec[Any], deps: ToolDeps) -> None:
    """The tool `spec` describes, made with `deps` and added to the server, then the resources that come with it.
    The SDK reads the function's signature (input schema), return annotation (output schema) and docstring
    (description)."""
    server.add_tool(domain_errors(spec.make(deps), spec.render), name=spec.name, annotations=spec.annotations(deps))
    server.tools[spec.name] = spec
    if spec.resources is not None:
        spec.resources(server, deps)
