"""Admission to the device: one call at a time, first come first served, a bounded queue and a bounded wait.

Why not a plain threading.Lock: it is not fair (whoever wakes first wins), and it offers only a timeout, so a
light call could lose to a stream of long ones: measured, a next_token waited 116.7 s behind steer_generate calls
before anything answered, and "busy" came only at the 120 s timeout. Here waiters hold tickets in a deque and
the device goes to the head of the queue; a call beyond `max_queued` waiters is answered busy at once, and one
that waits longer than the timeout gets busy then; both messages say how many calls are ahead and how long the
current work has run, and when to try again.

The retry hint is built from what is queued: the running call's likely remaining time plus the calls waiting
before this one. The running call declares nothing, so its remaining time is read from the recent holds (the last
HOLD_WINDOW): of those that lasted at least as long as it has run so far, their mean length, minus what it has run;
when none lasted that long, as long again as it has run. A mean of all holds, as before, said "try again in ~4 s"
3.7 s into a 36 s steer_generate, the cheap calls' holds outweighing the long ones. Each waiter ahead counts the
mean hold.

Why bound the queue at all: the SDK runs sync tools on anyio's worker threads (40 by default), and each caller
waiting here holds one. An unbounded queue of device calls would leave no thread for the cheap tools (model_info,
search_explanations, index reads), which never take the device.

A waiter also stops waiting when its call was abandoned (the client cancelled or disconnected): `abandoned()` is
polled every POLL_S while it waits, outside the queue's own lock (it may ask the event loop). What a call counts
as abandoned comes from the server (call_abandoned: the call's progress reporter, or the check the server sets
around every tool call), so the engine knows nothing of MCP or HTTP.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass

from sae_mcp.errors import Busy, Cancelled

log = logging.getLogger(__name__)

POLL_S = 0.05  # seconds between checks that a waiting call was not abandoned
MALLOC_ARENAS = 2  # glibc malloc arenas for the whole process (see cap_malloc_arenas)
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
HOLD_WINDOW = 256  # recent device holds (seconds) the retry hint is read from


class DeviceBusy(Busy):
    """Busy, with the numbers behind the message: calls ahead, seconds the current work has run, a retry hint."""

    def __init__(self, message: str, ahead: int, running_s: float, retry_after_s: float):
        super().__init__(message)
        self.ahead, self.running_s, self.retry_after_s = ahead, running_s, retry_after_s


@dataclass(frozen=True)
class QueueStatus:
    held: bool  # whether a call holds the device now
    held_s: float  # how long it has held it (0 when free)
    waiting: int  # calls queued for it
    mean_hold_s: float  # mean of the recent holds (HOLD_WINDOW; 0 before the first)


# Per call, not per thread: the SDK runs each sync tool call in a fresh copy of its task's context
# (anyio.to_thread.run_sync), so a value set during one call is never seen by the next call on the same worker
# thread. They are set only on anyio worker threads (elsewhere, e.g. on the main thread, a value would outlive
# the call), and each records the thread that set it, as a belt to those braces.
_admitted: ContextVar[int | None] = ContextVar("sae_mcp_device_admitted", default=None)
_watch: ContextVar[tuple[int, Callable[[], bool]] | None] = ContextVar("sae_mcp_call_watch", default=None)
# Set by the server around each tool call, on the event loop, so every call has one whatever its tool does
# (anyio copies it into the call's worker thread); reset by the server when the call ends (watch_request's token).
_request_watch: ContextVar[Callable[[], bool] | None] = ContextVar("sae_mcp_request_watch", default=None)


def mark_admitted() -> None:
    """This call has had the device once: its later device work (a scan's next batch) is a continuation."""
    if in_worker_thread():
        _admitted.set(threading.get_ident())


def is_continuation() -> bool:
    return _admitted.get() == threading.get_ident()


def watch_call(abandoned: Callable[[], bool]) -> None:
    """Say how this call learns that it was abandoned (the server's progress reporter registers its client-gone
    check here); device waits poll it. Without one, `worker_cancelled()` is polled."""
    if in_worker_thread():
        _watch.set((threading.get_ident(), abandoned))


def watch_request(abandoned: Callable[[], bool]) -> Token:
    """Say, for the whole tool call about to run in this context, how it learns that its client went away (the
    server does this for every call, so calls without a progress reporter leave the device queue too). -> the
    token to reset it with (unwatch_request) when the call ends."""
    return _request_watch.set(abandoned)


def unwatch_request(token: Token) -> None:
    _request_watch.reset(token)


def call_abandoned() -> bool:
    """Whether the call running on this thread was abandoned: its registered check, else its request's check
    (watch_request), else worker_cancelled()."""
    watch = _watch.get()
    if watch is not None and watch[0] == threading.get_ident():
        return watch[1]()
    request = _request_watch.get()
    if request is not None and request():
        return True
    return worker_cancelled()


def _worker_state() -> bool | None:
    """None outside an anyio worker thread; else whether the anyio task it runs for was cancelled."""
    import anyio.from_thread

    try:
        anyio.from_thread.check_cancelled()
    except RuntimeError:  # NoEventLoopError: not a worker thread (the CLI, tests calling the engine directly)
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # the backend's cancellation exception (asyncio.CancelledError)
        return True
    return False


def in_worker_thread() -> bool:
    """Whether this thread runs one call for an anyio task (the SDK's sync tools, Starlette's threadpool)."""
    return _worker_state() is not None


def worker_cancelled() -> bool:
    """True when the anyio task running this worker thread was cancelled: the SDK cancels a request's handler on
    notifications/cancelled, and on the 2026 HTTP wire when the client closes the response."""
    return _worker_state() is True


def cap_malloc_arenas() -> None:
    """Cap glibc's malloc arenas at MALLOC_ARENAS, before a server's worker threads exist.

    glibc gives threads that allocate at once their own arenas (up to 8 per core) and rarely hands their freed
    memory back. Measured with bench/bench_load.py (32 clients, stories260K, CPU): the server's RSS rose from 1030
    to 1487 MB between 1,000 and 6,000 calls with the default arenas, and stayed at 897 -> 892 MB with
    MALLOC_ARENA_MAX=2, at the same latencies. An explicit MALLOC_ARENA_MAX in the environment wins; other C
    libraries (macOS, musl) are left alone."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    if mallopt(M_ARENA_MAX, MALLOC_ARENAS) != 1:
        log.debug("mallopt(M_ARENA_MAX) refused; malloc arenas left as they are")


class DeviceQueue:
    """FIFO admission. Lock-compatible `acquire()`/`release()` too (the tests hold the device that way)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._waiters: deque[object] = deque()
        self._held_since: float | None = None
        self._holds: deque[float] = deque(maxlen=HOLD_WINDOW)  # seconds each recent hold lasted

    def status(self) -> QueueStatus:
        with self._cond:
            held_s = self._clock() - self._held_since if self._held_since is not None else 0.0
            return QueueStatus(self._held_since is not None, held_s, len(self._waiters), self._mean_hold())

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        try:
            self.admit(None if blocking and timeout < 0 else (timeout if blocking else 0.0), None, lambda: False)
        except Busy:
            return False
        return True

    def admit(self, timeout_s: float | None, max_queued: int | None, abandoned: Callable[[], bool]) -> None:
        """Wait for the device in arrival order. DeviceBusy at once when `max_queued` calls already wait, or after
        `timeout_s` (None: no limit); Cancelled when `abandoned()` turns true while waiting."""
        me = object()
        with self._cond:
            if self._held_since is None and not self._waiters:
                self._take()
                return
            if max_queued is not None and len(self._waiters) >= max_queued:
                waiting = len(self._waiters)
                raise self._busy(waiting, f"{waiting} calls already wait for it (at most {max_queued} may)")
            self._waiters.append(me)
        deadline = None if timeout_s is None else self._clock() + timeout_s
        try:
            while not self._wait_turn(me, deadline, timeout_s):
                if abandoned():
                    raise Cancelled("the call was abandoned (cancelled, or its client went away) while it waited "
                                    "for the device; nothing ran")
        except BaseException:
            with self._cond:
                if me in self._waiters:
                    self._waiters.remove(me)
                    self._cond.notify_all()  # the next waiter may now be at the head
            raise

    def _wait_turn(self, me: object, deadline: float | None, timeout_s: float | None) -> bool:
        """Wait up to POLL_S for `me` to reach the head of a free device; True once it holds the device."""
        with self._cond:
            if self._turn(me):
                return True
            left = None if deadline is None else deadline - self._clock()
            if left is not None and left <= 0:
                raise self._busy(self._waiters.index(me), f"this call waited {timeout_s:.3g} s for it")
            self._cond.wait(POLL_S if left is None else min(left, POLL_S))
            return self._turn(me)

    def _turn(self, me: object) -> bool:
        """With the condition held: take the device when it is free and `me` heads the queue."""
        if self._held_since is None and self._waiters[0] is me:
            self._waiters.popleft()
            self._take()
            return True
        return False

    def _take(self) -> None:
        self._held_since = self._clock()

    def release(self) -> None:
        with self._cond:
            if self._held_since is None:
                raise RuntimeError("release of a device that is not held")
            self._holds.append(self._clock() - self._held_since)
            self._held_since = None
            self._cond.notify_all()

    def _mean_hold(self) -> float:
        return sum(self._holds) / len(self._holds) if self._holds else 0.0

    def _running_left(self, running: float) -> tuple[float, str]:
        """(seconds the running call likely still needs, the basis in words), from the recent holds (module doc)."""
        lasted = [h for h in self._holds if h >= running]
        if not lasted:
            return running, "longer than any recent call, so perhaps as long again"
        typical = sum(lasted) / len(lasted)
        return typical - running, f"recent calls that ran as long took ~{typical:.1f} s"

    def _busy(self, waiting: int, why: str) -> DeviceBusy:
        """Call with the condition held. `waiting`: calls queued before this one (the running one aside)."""
        mean = self._mean_hold()
        if self._held_since is None:  # only waiters: the head is about to take the device
            running, left, current = 0.0, 0.0, "none holds it this instant"
        else:
            running = self._clock() - self._held_since
            left, basis = self._running_left(running)
            current = f"the running one has held it {running:.1f} s ({basis}: ~{left:.0f} s more)"
        retry = max(1.0, left + waiting * mean)
        ahead = waiting + (self._held_since is not None)
        msg = (f"the device is busy: {why}; {ahead} call(s) are ahead of this one: {current}, and {waiting} wait "
               f"before this one (recent device calls took ~{mean:.1f} s each); try again in ~{retry:.0f} s")
        return DeviceBusy(msg, ahead=ahead, running_s=round(running, 2), retry_after_s=round(retry, 1))
