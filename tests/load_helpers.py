"""What tests/test_load.py and tests/test_load_http.py share: a slow, deterministic heavy call, a step it can be
held at, a record of cancellations, and polling.

These tests assert order and counts (which step ran before which answer, how many ran after a cancel), never how
many seconds something took: a loaded box stretches every duration. bench/bench_load.py reports the durations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sae_mcp.engine import generation, runtime
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import Cancelled
from sae_mcp.settings import Limits

PROMPT = "the cat sat on the mat and the dog"
STEER = {"prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
         "max_new_tokens": 50, "temperature": 0}
STEP_S = 0.05  # one slowed generation step: STEER is 50 steps = 2.5 s of device work


def fresh_engine(tiny_loaded, tiny_engine, **limits) -> Engine:
    """A new engine (its own device queue) over the session's tiny model and SAE, with these limits."""
    return Engine(tiny_loaded, list(tiny_engine.saes.values()), "cpu", Limits(**limits))


@dataclass
class Gate:
    """Holds a slowed generation at one step: step `at` (counted from 1) waits for `go`, after its forward, so
    without the device (each step takes the device for its forward only)."""

    at: int  # the step that waits
    go: threading.Event = field(default_factory=threading.Event)  # set to let that step and the rest run


def slow_generation(monkeypatch, gate: Gate | None = None) -> list[float]:
    """Make every generation step sleep STEP_S (and wait at the gate's step until it opens; a hang guard of 60 s);
    -> the list of the steps' start times, filled as they run."""
    times: list[float] = []
    real = generation._sample

    def slow_sample(*a):
        times.append(time.monotonic())
        if gate is not None and len(times) == gate.at:
            assert gate.go.wait(60), "the gate was never opened"
        time.sleep(STEP_S)
        return real(*a)

    monkeypatch.setattr(generation, "_sample", slow_sample)
    return times


def slow_scan(monkeypatch, step_s: float) -> list[float]:
    """Make every scan batch's state update sleep step_s; -> the list of the batches' start times, filled as they
    run."""
    from sae_mcp.index import scan as scan_module

    batches: list[float] = []
    real = scan_module.update_state

    def slow_update(*a):
        batches.append(time.monotonic())
        time.sleep(step_s)
        return real(*a)

    monkeypatch.setattr(scan_module, "update_state", slow_update)
    return batches


def wait_until(predicate, timeout_s: float = 5.0) -> float:
    """Poll until predicate() holds; the seconds it took (fails after timeout_s)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "timed out waiting"
        time.sleep(0.005)
    return time.monotonic() - t0


@dataclass
class Cancels:
    """What long work's CancelTokens saw, as counts of the work done (count(): e.g. the steps run so far)."""

    cancelled: list[int] = field(default_factory=list)  # at each cancel(): the server saw the client cancel or go
    stopped: list[int] = field(default_factory=list)  # at each check() that raised Cancelled: the work stopped there


def record_cancels(monkeypatch, count: Callable[[], int]) -> Cancels:
    """Record count() at every CancelToken.cancel() and at every check() that stops the work; -> the record, filled
    as they come."""
    seen = Cancels()
    real_cancel, real_check = runtime.CancelToken.cancel, runtime.CancelToken.check

    def cancel(token: runtime.CancelToken) -> None:
        seen.cancelled.append(count())
        real_cancel(token)

    def check(token: runtime.CancelToken) -> None:
        try:
            real_check(token)
        except Cancelled:
            seen.stopped.append(count())
            raise

    monkeypatch.setattr(runtime.CancelToken, "cancel", cancel)
    monkeypatch.setattr(runtime.CancelToken, "check", check)
    return seen
