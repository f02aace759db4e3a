"""Reading the ledger back: the `ledger` tool and the ledger:// resources.

register(server, tool, engine, services) adds:
    tool        ledger(session?, tool?, feature?, sae?, run?, limit)   earlier runs, newest first, one line each with
                their key numbers; `run=` gives one run's recorded arguments (as resolved) and result copy
    resources   ledger://sessions         the sessions, newest first (id, time, runs, model, first prompt)
                ledger://session/{id}     one session's runs, in order, one line each

An agent (or the next conversation) reads where an investigation stopped and cites runs by id. Calls to `ledger`
itself are not recorded (wiring.UNRECORDED).

No `from __future__ import annotations`: the SDK reads the tools' annotations at registration.
"""

from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.types import CallToolResult
from pydantic import BaseModel, Field

from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.server.text import compact_json, text_content
from sae_mcp.server.wiring import ToolDecorator
from sae_mcp.services import Services
from sae_mcp.services.ledger_summary import args_line, run_line, session_line, summary_of, when

MAX_LIMIT = 200


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


def register(server: MCPServer, tool: ToolDecorator, engine: Engine, services: Services) -> None:
    ledger = services.ledger

    def one_run(run_id: str) -> dict[str, Any]:
        r = ledger.store.run(run_id)
        return {"run_id": r.id, "session": r.session, "tool": r.tool, "resolved": r.resolved, "wall_s": r.wall_s,
                "ok": r.ok, "error": r.error, "digest": r.digest, "result": r.result, "truncated": r.truncated or None,
                "arguments_cut": r.args_cut or None, "env": r.env}

    @tool(name="ledger")
    def ledger_tool(
        session: Annotated[str | None, Field(max_length=64, description="Id (or prefix), or 'current'")] = None,
        tool: Annotated[str | None, Field(max_length=64, description="Only runs of this tool")] = None,
        feature: Annotated[int | None, Field(ge=0, description="Only runs about this feature")] = None,
        sae: Annotated[str | None, Field(max_length=256, description="With feature: this SAE's")] = None,
        run: Annotated[str | None, Field(max_length=32, description="One run in full")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 20,
        mcp_context: Context = None,
    ) -> Annotated[CallToolResult, LedgerAnswer]:
        """Earlier runs of every tool, newest first, with their key numbers: to pick up where you (or an earlier
        conversation) stopped, and to find run ids to cite (label_feature evidence_runs)."""
        current = ledger.session_of(mcp_context)[0] if ledger.recording else None
        store = ledger.store
        sid = current if session == "current" else (store.resolve_session(session) if session else None)
        if sae and feature is None:
            raise InvalidInput("sae= narrows feature=; pass feature too")
        key = _sae_key(engine, sae) if sae else None
        # run= alone asks for that one run: listing the newest runs beside it would bury it
        listing = run is None or any(x is not None for x in (session, tool, feature))
        runs = store.runs(session=sid, tool=tool, feature=feature, sae=key, limit=limit, newest_first=True,
                          light=True) if listing else []
        rows = [LedgerRun(run_id=r.id, session=r.session, time=when(r.time), tool=r.tool, arguments=r.given, ok=r.ok,
                          error=r.error, summary=summary_of(r)) for r in runs]
        note = None if rows or not listing else "no run matches" + ("" if store.count() else ": the ledger is empty")
        if not ledger.recording:
            note = "this server records nothing (--no-ledger): runs of earlier servers only" + (f"; {note}" if note
                                                                                                 else "")
        answer = LedgerAnswer(current_session=current, session=sid, runs=rows, run=one_run(run) if run else None,
                              note=note)
        lines = ([f"{len(rows)} runs, newest first (this session: {current})" if current else f"{len(rows)} runs"]
                 if listing else [])
        lines += [f"{r.run_id} {r.time} {r.session} {r.tool}({args_line(r.arguments)}) -> {r.summary}" for r in rows]
        if answer.run is not None:
            lines.append("run " + compact_json(answer.run))  # no nulls, 4 significant digits
        if note:
            lines.append(note)
        return CallToolResult(content=[text_content("\n".join(lines))],
                              structured_content=answer.model_dump(mode="json", exclude_none=True))

    register_resources(server, ledger)


def register_resources(server: MCPServer, ledger) -> None:
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
        return "\n".join([f"session {sid}: {len(runs)} runs"] + [run_line(r) for r in runs])
