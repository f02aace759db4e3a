"""MCP over stdio where every request gets an answer, malformed ones included.

The SDK's stdio reader (mcp/server/stdio.py, SDK 2.3) parses each line with the JSON-RPC message adapter and hands
a line that fails to the dispatcher as an exception, which logs it at DEBUG and answers nothing. A client whose
request holds a lone surrogate (an emoji cut in half), nests deeper than the parser's ~200 levels, sends
`"params": []`, `"jsonrpc": "1.0"` or a batch then waits forever. JSON-RPC 2.0 (section 5) wants an error reply:
-32700 when the text is not JSON, -32600 when the JSON is not a valid request, with the request's id when it can be
read and null otherwise.

Here each line is checked (check_line) before the SDK's reader sees it: a well-formed message passes through
unchanged, to be parsed by the SDK as before; anything else is answered through the SDK's own stdout writer (one
writer, so frames never interleave and stdout stays pure JSON-RPC). Input is read as bytes and decoded strictly:
the SDK decodes with errors="replace", which silently turns invalid UTF-8 into U+FFFD inside the arguments.

Upstream, check_line belongs in stdio_server's stdin_reader: on a failed parse, write check_line's JSONRPCError
to stdout instead of forwarding the exception (or forward the raw line with the exception, so the dispatcher's
on_stream_exception can answer it); the stdin claim (_claim_fd) would then not need reusing from outside.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, BinaryIO, cast

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

try:  # the SDK's own claim on fd 0 (private): children read EOF and the wire stays ours alone
    from mcp.server.stdio import _claim_fd, _open_stdin_diversion

    CLAIMS_STDIN = True
except ImportError:  # a later SDK may rename them: read stdin in place, as SDK 1.x did
    CLAIMS_STDIN = False

log = logging.getLogger(__name__)

SHOWN = 200  # characters of a parser's message quoted back
# The SDK's parser (pydantic's jiter) stops at 200 levels of arrays and objects, the whole message included.
TOO_DEEP = "invalid JSON: nested deeper than the 200 levels of arrays and objects the parser reads; send flatter data"


def parse_error(message: str, request_id: str | int | None = None) -> types.JSONRPCError:
    return _error(types.PARSE_ERROR, f"parse error: {message}", request_id)


def invalid_request(message: str, request_id: str | int | None = None) -> types.JSONRPCError:
    return _error(types.INVALID_REQUEST, f"invalid request: {message}", request_id)


def _error(code: int, message: str, request_id: str | int | None) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))


def check_line(raw: bytes) -> str | types.JSONRPCError | None:
    """One line from the client -> its text when it is a message the SDK accepts, the error to answer it with
    otherwise, or None for a blank line (no message, nothing to answer)."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = f"invalid UTF-8 at byte {exc.start} ({raw[exc.start:exc.start + 4]!r}); send UTF-8 text"
        return parse_error(hint, _readable_id(raw.decode("utf-8", "replace")))
    try:
        message = types.jsonrpc_message_adapter.validate_json(text, by_name=False)
    except ValidationError as exc:
        return _diagnose(text, exc)
    if isinstance(message, types.JSONRPCNotification):  # the SDK drops an unusable id and answers nothing
        given = json.loads(text)
        if "id" in given:
            return invalid_request(f'"id" must be a string or an integer (given {json.dumps(given["id"])[:SHOWN]})')
    return text


def _diagnose(text: str, exc: ValidationError) -> types.JSONRPCError:
    """Why the SDK's parser refused `text` -> the error reply naming it."""
    try:
        obj = json.loads(text)
    except RecursionError:
        return parse_error(TOO_DEEP)
    except ValueError as err:
        return parse_error(f"invalid JSON: {err}")
    request_id = _id_of(obj)
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":  # Python's json read it, the SDK's stricter parser did not
        reason = str(first.get("ctx", {}).get("error", first["msg"]))
        if "recursion limit" in reason:
            return parse_error(TOO_DEEP, request_id)
        if _has_lone_surrogate(obj):
            return parse_error("invalid JSON: a string holds a lone surrogate escape (half of a UTF-16 pair, e.g. "
                               "\\ud800 alone); send whole characters", request_id)
        return parse_error(f"invalid JSON: {reason[:SHOWN]}", request_id)
    return invalid_request(_request_problem(obj, exc), request_id)


# The checks below read a line's parsed JSON, any JSON value (Any).
def _request_problem(obj: Any, exc: ValidationError) -> str:
    """Valid JSON that is no JSON-RPC 2.0 message MCP takes -> what is wrong with it."""
    if isinstance(obj, list):
        return "batches (JSON arrays of messages) are not supported; send one message per line"
    if not isinstance(obj, dict):
        return f"a message is a JSON object, not {type(obj).__name__}"
    if obj.get("jsonrpc") != "2.0":
        return f'"jsonrpc" must be "2.0" (given {json.dumps(obj.get("jsonrpc"))[:SHOWN]})'
    if "method" in obj and not isinstance(obj["method"], str):
        return '"method" must be a string'
    if "params" in obj and not isinstance(obj["params"], dict):
        kind = "an array" if isinstance(obj["params"], list) else json.dumps(obj["params"])[:SHOWN]
        return f'"params" must be an object (MCP methods take named parameters), not {kind}'
    if "method" in obj and "id" in obj and _id_of(obj) is None:
        return f'"id" must be a string or an integer (given {json.dumps(obj["id"])[:SHOWN]})'
    if "method" not in obj and "id" not in obj:
        return 'neither "method" (a request or notification) nor "id" (a response)'
    parts = ["{}: {}".format(".".join(map(str, e["loc"])) or "message", e["msg"]) for e in exc.errors()[:3]]
    return "not a JSON-RPC request, notification or response (" + "; ".join(parts)[:SHOWN] + ")"


def _id_of(obj: Any) -> str | int | None:
    """The id a reply must carry: a string or an integer (MCP forbids null; bool is not an integer here)."""
    request_id = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(request_id, str) or (isinstance(request_id, int) and not isinstance(request_id, bool)):
        return request_id
    return None


def _readable_id(text: str) -> str | int | None:
    try:
        return _id_of(json.loads(text))
    except (ValueError, RecursionError):
        return None


def _has_lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
    except (RecursionError, ValueError):
        return False


class CheckedLines:
    """The client's lines as the SDK's reader iterates them (str), malformed ones answered here instead."""

    def __init__(self, binary_stdin: BinaryIO):
        self._stdin = anyio.wrap_file(binary_stdin)
        self._write: MemoryObjectSendStream[SessionMessage] | None = None  # set by answer_with before it is used
        self._ready = anyio.Event()

    def answer_with(self, write_stream: MemoryObjectSendStream[SessionMessage]) -> None:
        """The SDK's outgoing stream: replies to malformed lines go through its one stdout writer."""
        self._write = write_stream
        self._ready.set()

    async def __aiter__(self) -> AsyncIterator[str]:
        async for raw in self._stdin:
            checked = check_line(raw)
            if checked is None or isinstance(checked, str):
                if checked is not None:
                    yield checked
                continue
            log.warning("answered a malformed message with %d: %s", checked.error.code, checked.error.message)
            await self._ready.wait()
            assert self._write is not None  # answer_with set it before _ready
            try:
                await self._write.send(SessionMessage(checked))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return  # the server is shutting down: nobody left to answer


@asynccontextmanager
async def checked_stdio_server():
    """The SDK's stdio_server with every line checked first: yields (read_stream, write_stream) as it does."""
    release = None
    if CLAIMS_STDIN:
        binary, release = _claim_fd(0, sys.stdin, "rb", _open_stdin_diversion)
    else:
        binary = sys.stdin.buffer
    lines = CheckedLines(binary)
    try:
        # The SDK's stdio_server only iterates its stdin (`async for line in stdin`), which CheckedLines does.
        async with stdio_server(stdin=cast("anyio.AsyncFile[str]", lines)) as (read_stream, write_stream):
            lines.answer_with(write_stream)
            yield read_stream, write_stream
    finally:
        if release is not None:
            release()


async def run_stdio_async(server: MCPServer) -> None:
    """MCPServer.run_stdio_async with checked_stdio_server in place of the SDK's stdio_server."""
    lowlevel = server._lowlevel_server  # what the SDK's own run_stdio_async drives
    async with checked_stdio_server() as (read_stream, write_stream):
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def run_stdio(server: MCPServer) -> None:
    anyio.run(run_stdio_async, server)
