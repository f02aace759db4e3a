"""MCP progress and cancellation for long tool calls (corpus scans, generation) running on worker threads.

A sync tool runs on an anyio worker thread, which runs on after its request is given up: the engine's CancelToken
is what stops it, and long work checks it between batches/steps. It trips when:
- the client cancels (notifications/cancelled), or closes the response on the 2026 HTTP wire: the SDK cancels the
  handler's scope, which the thread sees through anyio (`request_cancelled`);
- the client disconnects on the 2025 (session) HTTP wire: the SDK does NOT cancel the handler there (it keeps the
  request running for a client that might reconnect, and drops its progress and result; measured: abandoned
  scans ran 27-29 s more and report_progress kept succeeding), so we ask the HTTP request itself whether its
  connection is gone (ASGI answers receive() with http.disconnect once it is), at most every DISCONNECT_POLL_S.

The same check runs whether or not the client asked for progress notifications (no progress token), and is also
registered with the engine (admission.watch_call), so a call still queued for the device leaves the queue. The
server also sets one around every tool call (`watching_request`, wiring.py), so calls of tools without a progress
reporter (ablate_and_test, attribute, ...) leave the device queue, or a scan's row, when their client goes away.
"""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import anyio.from_thread
from mcp.server.mcpserver import Context

from sae_mcp.engine.admission import unwatch_request, watch_call, watch_request, worker_cancelled
from sae_mcp.engine.runtime import CancelToken

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1  # at most this often a round trip to the event loop to ask the HTTP request

request_cancelled = worker_cancelled  # True when the MCP request running this worker thread was cancelled


class HttpRequest(Protocol):
    """What is asked of the HTTP request that carried a call (Starlette's Request)."""

    async def is_disconnected(self) -> bool: ...


def http_request_of(mcp_context: Context | None) -> HttpRequest | None:
    """The Starlette request that carried this call over HTTP (None in-process, over stdio, or outside MCP)."""
    try:
        request = mcp_context.request_context.request if mcp_context is not None else None
    except (ValueError, AttributeError):  # no request context (called outside a request)
        return None
    return request if callable(getattr(request, "is_disconnected", None)) else None


def client_disconnected(request: HttpRequest) -> bool:
    """Ask the event loop whether the HTTP connection of `request` is gone; False when it cannot be asked."""
    try:
        return bool(anyio.from_thread.run(request.is_disconnected))
    except Exception as exc:  # not an anyio worker thread, or the loop is shutting down
        log.debug("could not ask whether the client disconnected: %s", exc)
        return False


def abandonment_check(mcp_context: Context | None, cancel: CancelToken) -> Callable[[], bool]:
    """A check that trips `cancel` (and answers True) once the call's client cancelled or went away."""
    request = http_request_of(mcp_context)
    last_asked = -float("inf")

    def abandoned() -> bool:
        nonlocal last_asked
        if cancel.cancelled:
            return True
        why = None
        if request_cancelled():
            why = "the client cancelled the request"
        elif request is not None and time.monotonic() - last_asked >= DISCONNECT_POLL_S:
            last_asked = time.monotonic()
            if client_disconnected(request):
                why = "the client disconnected"
        if why is None:
            return False
        log.info("%s; stopping between steps", why)
        cancel.cancel()
        return True

    return abandoned


@contextlib.contextmanager
def watching_request(mcp_context: Context | None) -> Iterator[None]:
    """Around one tool call, on the event loop: the engine's device and row waits of this call (on its worker
    thread, which inherits the context) end with Cancelled once its client cancelled or went away."""
    token = watch_request(abandonment_check(mcp_context, CancelToken()))
    try:
        yield
    finally:
        unwatch_request(token)


def progress_reporter(mcp_context: Context | None, cancel: CancelToken, unit: str) -> Callable[[int, int], None]:
    """A (done, total) callback for engine work: reports MCP progress, and cancels `cancel` when the client
    cancelled or the request is gone. With mcp_context None (called outside MCP) it only watches for cancellation.
    Call it on the tool's worker thread: it registers the same check for the call's device waits."""
    abandoned = abandonment_check(mcp_context, cancel)
    watch_call(abandoned)

    def progress(done: int, total: int) -> None:
        if abandoned() or mcp_context is None:
            return
        try:
            anyio.from_thread.run(mcp_context.report_progress, done, total, f"{done}/{total} {unit}")
        except Exception:  # the request is gone (disconnected): stop before the next step
            log.info("progress report failed; cancelling")
            cancel.cancel()

    return progress
