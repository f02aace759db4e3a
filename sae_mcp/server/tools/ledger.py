"""ledger: reading the ledger back, the tool and the ledger:// resources.

    tool        ledger(session?, tool?, feature?, sae?, run?, limit)   earlier runs, newest first, one line each with
                their key numbers, under how many match in all; `run=` gives one run as the agent read it when the
                call answered: one line (id, time, session, tool(arguments), ok or its error), then the recorded
                result re-validated into its tool's result model and rendered as that tool renders it (ToolSpec);
                the structured content holds the run whole (arguments as resolved, digest, result copy)
    resources   ledger://sessions         the sessions, newest first (id, time, runs, model, first prompt)
                ledger://session/{id}     one session's runs, in order, one line each

An agent (or the next conversation) reads where an investigation stopped and cites runs by id. Calls to the tool
itself are not recorded (its SPEC has no ledger rule): reading the ledger is not an experiment, and would copy runs
into runs.

No `from __future__ import annotations`: the SDK reads the tool's annotations at registration.
"""

from collections.abc import Callable
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.types import CallToolResult
from pydantic import BaseModel, Field, ValidationError

from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.ledger.bounds import BOUNDED_LIST, SECRET_FIELDS
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.summary import args_line, run_line, session_line, summary_of, when
from sae_mcp.server.text import compact_json, text_content
from sae_mcp.server.tools.spec import ToolDeps, ToolSpec, read_only

MAX_LIMIT = 200
MAX_JSON_TEXT = 8_000  # characters of a result shown as JSON (a cut copy can hold 256k): the rest is structured


class LedgerRun(BaseModel):
    run_id: str
    session: str
    time: str = Field(description="Local time it was called")
    tool: str
    arguments: dict[str, Any] = Field(description="As given, long values cut (run= has them whole)")
    ok: bool
    error: str | None = None
    summary: str = Field(description="Its key numbers (or its error)")


class LedgerAnswer(BaseModel):
    current_session: str | None = Field(default=None, description="This conversation's session id")
    session: str | None = Field(default=None, description="The session listed, when one was asked for")
    runs: list[LedgerRun] = Field(description="Newest first")
    total: int | None = Field(default=None, description="Runs matching the filters, in all")
    run: dict[str, Any] | None = Field(
        default=None, description="With run=: its arguments as resolved, wall time, digest and recorded result"
    )
    note: str | None = None


def _sae_key(engine: Engine, sae: str) -> str:
    """The key runs were filed under: the loaded SAE's (alias or hook), else the text as given (an earlier
    session's SAE)."""
    try:
        return engine.sae(sae).key
    except SaeMcpError:
        return sae


def without_cut_marks(value: Any) -> tuple[Any, int]:
    """A cut copy of any JSON value (ledger/bounds.py bounded()) without the {'left_out': n} items that end its
    shortened lists, so it validates as the result it was cut from; and how many items they stood for."""
    if isinstance(value, dict):
        pairs = [(k, without_cut_marks(v)) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, sum(n for _, (_, n) in pairs)
    if isinstance(value, list):
        marks = [v["left_out"] for v in value if isinstance(v, dict) and set(v) == {"left_out"}]
        kept = [without_cut_marks(v) for v in value if not (isinstance(v, dict) and set(v) == {"left_out"})]
        return [v for v, _ in kept], sum(n for _, n in kept) + sum(m for m in marks if isinstance(m, int))
    return value, 0


def result_text(r: Run, spec: ToolSpec | None) -> str:
    """The recorded result as its tool rendered it (a secret it handed out is not recorded: left out); a cut copy is
    rendered from what it kept, said first; what does not validate as the tool's result model (or a run of a tool
    not registered now) is compact JSON."""
    if r.result is None:
        return ""
    body = {k: None if k in SECRET_FIELDS else v for k, v in r.result.items()}
    left_out = 0
    if r.truncated:
        body, left_out = without_cut_marks(body)
    if spec is not None:
        try:
            result = spec.result.model_validate(body)
            text = spec.render(result) if spec.render else compact_json(result.model_dump(mode="json"))
            return (f"(the ledger kept a cut copy: lists to their first {BOUNDED_LIST} items, {left_out:,} items left "
                    "out)\n" if r.truncated else "") + text
        except ValidationError:
            pass
    text = compact_json(r.result)
    if len(text) > MAX_JSON_TEXT:
        text = text[:MAX_JSON_TEXT] + f"... ({len(text) - MAX_JSON_TEXT:,} characters more in run.result)"
    return ("(the ledger kept a cut copy) " if r.truncated else "") + text


def run_head(r: Run) -> str:
    """One line: id, time, session, tool(arguments as given, each cut), then ok and its wall time, or its error."""
    outcome = f"ok in {r.wall_s:.3g} s" if r.ok else f"failed: {r.error}"
    return (f"run {r.id} {when(r.time)} {r.session} {r.tool}({args_line(r.given)})"
            + (" (arguments cut)" if r.args_cut else "") + f" -> {outcome}")


def make(deps: ToolDeps) -> Callable[..., CallToolResult]:
    engine, services, ledger = deps.engine, deps.services, deps.services.ledger

    def one_run(r: Run) -> dict[str, Any]:
        return {"run_id": r.id, "session": r.session, "tool": r.tool, "resolved": r.resolved, "wall_s": r.wall_s,
                "ok": r.ok, "error": r.error, "digest": r.digest, "result": r.result, "truncated": r.truncated or None,
                "arguments_cut": r.args_cut or None, "env": r.env}

    def ledger_tool(
        session: Annotated[str | None, Field(max_length=64, description="Id (or prefix), or 'current'")] = None,
        tool: Annotated[str | None, Field(max_length=64)] = None,
        feature: Annotated[int | None, Field(ge=0)] = None,
        sae: Annotated[str | None, Field(max_length=256, description="With feature: this SAE's")] = None,
        run: Annotated[str | None, Field(max_length=32, description="One run in full")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 20,
        mcp_context: Context | None = None,
    ) -> Annotated[CallToolResult, LedgerAnswer]:
        """Earlier runs of any conversation, newest first: to resume, and to find run_ids to cite."""
        current = deps.conversations.session_of(mcp_context)[0] if ledger.recording else None
        store = ledger.store
        sid = current if session == "current" else (store.resolve_session(session) if session else None)
        if sae and feature is None:
            raise InvalidInput("sae= narrows feature=; pass feature too")
        key = _sae_key(engine, sae) if sae else None
        one = store.run(run) if run else None
        # run= alone asks for that one run: listing the newest runs beside it would bury it
        listing = run is None or any(x is not None for x in (session, tool, feature))
        runs = store.runs(session=sid, tool=tool, feature=feature, sae=key, limit=limit, newest_first=True,
                          light=True) if listing else []
        total = (len(runs) if len(runs) < limit else store.count(session=sid, tool=tool, feature=feature, sae=key)
                 ) if listing else None
        rows = [LedgerRun(run_id=r.id, session=r.session, time=when(r.time), tool=r.tool, arguments=r.given, ok=r.ok,
                          error=r.error, summary=summary_of(r, services.tools)) for r in runs]
        note = None if rows or not listing else "no run matches" + ("" if store.count() else ": the ledger is empty")
        if not ledger.recording:
            note = "this server records nothing (--no-ledger): runs of earlier servers only" + (f"; {note}" if note
                                                                                                 else "")
        answer = LedgerAnswer(current_session=current, session=sid, runs=rows, total=total,
                              run=one_run(one) if one else None, note=note)
        lines = [f"{len(rows)} of {total:,} runs, newest first" + (f" (this session: {current})" if current else "")
                 ] if rows else []
        lines += [f"{r.run_id} {r.time} {r.session} {r.tool}({args_line(r.arguments)}) -> {r.summary}" for r in rows]
        if one is not None:
            lines += [run_head(one), result_text(one, deps.tools.get(one.tool))]
        if note:
            lines.append(note + (f" (this session: {current})" if current and not rows else ""))
        return CallToolResult(content=[text_content("\n".join(line for line in lines if line))],
                              structured_content=answer.model_dump(mode="json", exclude_none=True))

    return ledger_tool


def resources(server: MCPServer, deps: ToolDeps) -> None:
    ledger, tools = deps.services.ledger, deps.services.tools

    @server.resource("ledger://sessions", name="ledger_sessions", title="Recorded sessions",
                     description="Every recorded session (conversation), newest first: id, time, runs, model, "
                     "first prompt or query", mime_type="text/plain")
    def sessions_resource() -> str:
        store = ledger.store
        found = store.sessions(limit=100)
        return "\n".join(session_line(store, s) for s in found) or "no session recorded yet"

    @server.resource("ledger://session/{session}", name="ledger_session", title="One recorded session",
                     description="One session's runs in order, one line each: run id, time, tool(arguments) -> key "
                     "numbers. {session} is an id from ledger://sessions (or a unique prefix)",
                     mime_type="text/plain")
    def session_resource(session: str) -> str:
        try:
            sid = ledger.store.resolve_session(session)
        except SaeMcpError as exc:
            raise ResourceError(str(exc)) from exc
        runs = ledger.store.runs(session=sid, light=True)
        return "\n".join([f"session {sid}: {len(runs)} runs"] + [run_line(r, tools) for r in runs])


SPEC = ToolSpec(
    name="ledger",
    make=make,
    result=LedgerAnswer,
    render=None,  # it writes its own text: one line per run, or the run as its tool rendered it
    annotations=read_only,
    page_in_text=False,
    resources=resources,
    ledger=None,  # not recorded
    export=None,
    replay=None,
)
