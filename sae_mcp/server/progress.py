"""MCP progress and cancellation for long tool calls (corpus scans, generation) running on worker threads.

A sync tool runs on an anyio worker thread. When the client cancels (notifications/cancelled) the SDK cancels
the handler's scope, but the thread runs on and, measured, `report_progress` keeps succeeding; so each progress
step also asks anyio whether the request was cancelled, and trips the engine's CancelToken, which long work
checks between batches/steps.
"""

import logging
from collections.abc import Callable
from typing import Any

import anyio.from_thread

from sae_mcp.engine.runtime import CancelToken

log = logging.getLogger(__name__)


def request_cancelled() -> bool:
    """True when the MCP request running this worker thread was cancelled; False outside an anyio worker."""
    try:
        anyio.from_thread.check_cancelled()
    except RuntimeError:  # not an anyio worker thread (NoEventLoopError): nothing to check
        return False
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # the backend's cancellation exception (asyncio.CancelledError)
        return True
    return False


def progress_reporter(mcp_context: Any, cancel: CancelToken, unit: str) -> Callable[[int, int], None]:
    """A (done, total) callback for engine work: reports MCP progress, and cancels `cancel` when the client
    cancelled or the request is gone. With mcp_context None (called outside MCP) it only watches for cancellation."""

    def progress(done: int, total: int) -> None:
        if request_cancelled():
            log.info("the client cancelled the request; stopping between steps")
            cancel.cancel()
            return
        if mcp_context is None:
            return
        try:
            anyio.from_thread.run(mcp_context.report_progress, done, total, f"{done}/{total} {unit}")
        except Exception:  # the request is gone (disconnected): stop before the next step
            log.info("progress report failed; cancelling")
            cancel.cancel()

    return progress
