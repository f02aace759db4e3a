"""Abandoned calls over streamable HTTP stop within a step or batch and free the device: a client that disconnects
(2025 session wire, where the SDK does not cancel the handler), one that closes its request (2026 wire), and
calls still queued for the device. The real streamable-HTTP app runs under uvicorn on a thread, over the tiny
engine; heavy calls are slowed with a sleeping step.

Each test asserts an order or a count: how many steps or batches ran after the server cancelled the call, whether
the device was held when a queued call left the queue. How many seconds the server takes to notice a client gone
depends on the box; bench/bench_load.py measures it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import anyio
import anyio.to_thread
import httpx
import pytest
from mcp import Client

from sae_mcp.engine.runtime import Engine
from sae_mcp.server.app import build_server
from sae_mcp.settings import Settings

from load_helpers import (
    PROMPT,
    STEER,
    Cancels,
    fresh_engine,
    record_cancels,
    slow_generation,
    slow_scan,
    wait_until,
)


@pytest.fixture
def engine(tiny_loaded, tiny_engine):
    """A busy timeout (600 s) past every hang guard here: a call that leaves a queue or a row's wait left it because
    the server saw its client go, not because it gave up."""
    return fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=600.0, max_queued=4)


@pytest.fixture(autouse=True)
def own_data_dir(tmp_path, monkeypatch):
    """Servers built here without a data dir keep their stores (the ledger) in the test's, not the user's."""
    monkeypatch.setenv("SAE_MCP_DATA_DIR", str(tmp_path / "default-data"))


@pytest.fixture
def steps(monkeypatch):
    return slow_generation(monkeypatch)


LEGACY = "2025-06-18"  # the session wire: the SDK does not cancel a handler whose client disconnects
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@contextlib.contextmanager
def serving(server):
    """The server's streamable-HTTP app under uvicorn on a thread -> its /mcp URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port before uvicorn listens on it
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, 10)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def legacy_session(url: str) -> dict[str, str]:
    """Initialize a 2025-wire session with plain HTTP -> the headers of its later requests."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    with httpx.Client(timeout=10) as c:
        sid = c.post(url, headers=HEADERS, json=init).headers["mcp-session-id"]
        headers = {**HEADERS, "mcp-session-id": sid, "mcp-protocol-version": LEGACY}
        c.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


@contextlib.contextmanager
def tool_call_stream(url: str, headers: dict[str, str], name: str, arguments: dict, call_id: int = 2):
    """POST one tools/call (no progress token) and hold its response open; leaving drops the connection."""
    body = {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
    with httpx.Client(timeout=30) as c, c.stream("POST", url, headers=headers, json=body) as resp:
        assert resp.status_code == 200
        yield resp


def stopped_within_one(engine: Engine, cancels: Cancels, done: list) -> None:
    """The abandoned work stopped on its cancel (a check between steps or batches raised: it had not ended), within
    one step or batch of that cancel, ran nothing after, and gave the device back. `done`: the steps or batches run;
    `cancels` counts them."""
    wait_until(lambda: cancels.stopped, 30)  # a hang guard: work the server never cancels fails here
    wait_until(lambda: not engine.device_status().held, 30)
    (stopped,) = cancels.stopped
    assert stopped - cancels.cancelled[-1] <= 1 and len(done) == stopped, (cancels, len(done))
    assert engine.is_clean() and engine.device_status().waiting == 0


def test_an_http_disconnect_stops_steer_generate_within_a_step_and_frees_the_device(engine, steps, monkeypatch):
    cancels = record_cancels(monkeypatch, lambda: len(steps))
    with serving(build_server(engine)) as url:
        headers = legacy_session(url)
        with tool_call_stream(url, headers, "steer_generate", STEER):
            wait_until(lambda: len(steps) >= 5)
        stopped_within_one(engine, cancels, steps)
    assert len(steps) < 50


def test_a_2026_wire_client_that_closes_its_request_stops_the_work(engine, steps, monkeypatch):
    cancels = record_cancels(monkeypatch, lambda: len(steps))

    async def go(url):
        async with Client(url) as client:  # the SDK client speaks the 2026-07-28 wire to this server
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "steer_generate", STEER)
                while len(steps) < 5:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # closes the request

    with serving(build_server(engine)) as url:
        anyio.run(go, url)
        stopped_within_one(engine, cancels, steps)
    assert len(steps) < 50


@contextlib.contextmanager
def device_held(engine: Engine):
    """The device held by another caller (a thread inside engine.device_work()) until the block ends: a queue that
    does not move. A long call now gives the device up between its steps, so it no longer makes one."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        with engine.device_work():
            taken.set()
            release.wait(60)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


def test_a_call_queued_for_the_device_leaves_the_queue_when_its_client_disconnects(engine, steps):
    with serving(build_server(engine)) as url:
        headers = legacy_session(url)
        with device_held(engine):
            with tool_call_stream(url, headers, "steer_generate", STEER, call_id=3):
                wait_until(lambda: engine.device_status().waiting == 1)
            wait_until(lambda: engine.device_status().waiting == 0, 30)
            assert engine.device_status().held  # it left while the holder still held the device
        wait_until(lambda: not engine.device_status().held)
    assert not steps and engine.is_clean()  # it never ran a step


def test_a_queued_call_without_progress_leaves_the_queue_when_its_2025_client_disconnects(engine):
    """ablate_and_test has no progress reporter, and on the 2025 wire the SDK does not cancel it: the check the
    server sets around every tool call asks the HTTP request instead."""
    with serving(build_server(engine)) as url:
        headers = legacy_session(url)
        with device_held(engine):
            ablate = {"prompt": PROMPT, "answer": " mat", "features": [3]}
            with tool_call_stream(url, headers, "ablate_and_test", ablate, call_id=3):
                wait_until(lambda: engine.device_status().waiting == 1)
            wait_until(lambda: engine.device_status().waiting == 0, 30)
            assert engine.device_status().held  # left while the device was still held
        wait_until(lambda: not engine.device_status().held)
    assert engine.is_clean()


def slow_batches(tmp_path, monkeypatch) -> tuple[Settings, list[float]]:
    """A corpus and settings, with every scan batch slowed by 0.3 s -> (settings, the batches' start times)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the cat sat on the mat {i % 10} and Lily saw the dog" for i in range(600)),
                      encoding="utf-8")
    return Settings(corpus=str(corpus), data_dir=tmp_path / "data"), slow_scan(monkeypatch, 0.3)


def row_waits(monkeypatch) -> list[str]:
    """Record the row each scan asks for (ExampleSource._row_lock, before it waits for another call's scan of it);
    -> the list, filled as they come."""
    from sae_mcp.index.source import ExampleSource

    asked: list[str] = []
    real = ExampleSource._row_lock

    @contextlib.contextmanager
    def row_lock(self, s, index, name, cancel):
        asked.append(name)
        with real(self, s, index, name, cancel):
            yield

    monkeypatch.setattr(ExampleSource, "_row_lock", row_lock)
    return asked


def test_an_http_disconnect_stops_a_top_examples_scan_between_batches(engine, tmp_path, monkeypatch):
    settings, batches = slow_batches(tmp_path, monkeypatch)
    cancels = record_cancels(monkeypatch, lambda: len(batches))
    with serving(build_server(engine, settings)) as url:
        headers = legacy_session(url)
        with tool_call_stream(url, headers, "top_examples", {"feature": 3, "max_scan_tokens": 100_000}):
            wait_until(lambda: len(batches) >= 1)
        stopped_within_one(engine, cancels, batches)


def test_a_call_waiting_for_another_calls_scan_of_its_row_leaves_when_its_client_disconnects(
        engine, tmp_path, monkeypatch):
    """Two build_index calls: the second waits for the first's scan of the same row. Its client leaves first, and
    the server cancels it while the first still scans; then the first's client leaves: had the second still been
    waiting, it would take the row and go on scanning."""
    settings, batches = slow_batches(tmp_path, monkeypatch)
    cancels = record_cancels(monkeypatch, lambda: len(batches))
    asked = row_waits(monkeypatch)
    with serving(build_server(engine, settings)) as url:
        headers = legacy_session(url)
        with tool_call_stream(url, headers, "build_index", {"tokens": 100_000}, call_id=2):
            wait_until(lambda: len(batches) >= 1)
            with tool_call_stream(url, headers, "build_index", {"tokens": 100_000}, call_id=3):
                wait_until(lambda: len(asked) == 2, 30)  # the second asks for the row the first scans
            wait_until(lambda: cancels.cancelled, 30)  # the server saw the second's client go: it left the wait
            assert not cancels.stopped  # while the first still scans
        stopped_within_one(engine, cancels, batches)
    assert asked == ["index", "index"]


def test_an_http_disconnect_stops_build_index_between_batches(engine, tmp_path, monkeypatch):
    settings, batches = slow_batches(tmp_path, monkeypatch)
    cancels = record_cancels(monkeypatch, lambda: len(batches))
    with serving(build_server(engine, settings)) as url:
        headers = legacy_session(url)
        with tool_call_stream(url, headers, "build_index", {"tokens": 100_000}):
            wait_until(lambda: len(batches) >= 1)
        stopped_within_one(engine, cancels, batches)


def test_a_queued_call_without_progress_leaves_the_queue_when_its_2026_client_closes(engine):
    """ablate_and_test has no progress reporter: its queue wait polls the worker's cancellation instead."""

    async def go(url):
        async with Client(url) as queued:
            async with anyio.create_task_group() as tg:
                ablate = {"prompt": PROMPT, "answer": " mat", "features": [3]}
                tg.start_soon(queued.call_tool, "ablate_and_test", ablate)
                while engine.device_status().waiting != 1:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # closes the request while it waits for the device
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: engine.device_status().waiting == 0, 30))
            assert engine.device_status().held  # it left while the holder still held the device

    with serving(build_server(engine)) as url:
        with device_held(engine):
            anyio.run(go, url)
        wait_until(lambda: not engine.device_status().held)
    assert engine.is_clean()
