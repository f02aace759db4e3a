"""What tests/test_load.py and tests/test_load_http.py share: a slow, deterministic heavy call and polling."""

from __future__ import annotations

import time

from sae_mcp.engine import generation
from sae_mcp.engine.runtime import Engine
from sae_mcp.settings import Limits

PROMPT = "the cat sat on the mat and the dog"
STEER = {"prompt": PROMPT, "features": [{"feature": 5, "strength": 4.0}], "calibration": "absolute",
         "max_new_tokens": 50, "temperature": 0}
STEP_S = 0.05  # one slowed generation step: STEER is 50 steps = 2.5 s of device work


def fresh_engine(tiny_loaded, tiny_engine, **limits) -> Engine:
    """A new engine (its own device queue) over the session's tiny model and SAE, with these limits."""
    return Engine(tiny_loaded, list(tiny_engine.saes.values()), "cpu", Limits(**limits))


def slow_generation(monkeypatch) -> list[float]:
    """Make every generation step sleep STEP_S; -> the list of the steps' start times, filled as they run."""
    times: list[float] = []
    real = generation._sample

    def slow_sample(*a):
        times.append(time.monotonic())
        time.sleep(STEP_S)
        return real(*a)

    monkeypatch.setattr(generation, "_sample", slow_sample)
    return times


def wait_until(predicate, timeout_s: float = 5.0) -> float:
    """Poll until predicate() holds; the seconds it took (fails after timeout_s)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, "timed out waiting"
        time.sleep(0.005)
    return time.monotonic() - t0
