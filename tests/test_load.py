"""Load behaviour in-process: cheap calls never wait behind device work, and device calls queue fairly (FIFO,
bounded, with a retry hint). Abandoned calls over HTTP: test_load_http.py.

A heavy call is made slow and deterministic with a sleeping generation step, as test_causal_tools does, and can be
held at a step. Each test asserts an order or a count (what answered before which step, while what held the
device), not a duration; bench/bench_load.py measures the latencies.
"""

from __future__ import annotations

import threading
import time

import anyio
import anyio.to_thread
import pytest
from mcp import Client

from sae_mcp.engine.admission import DeviceBusy, DeviceQueue
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import Busy
from sae_mcp.index.source import ExampleSource
from sae_mcp.server.app import build_server
from sae_mcp.server.tools import tool_map
from sae_mcp.services import MEASURING, Services
from sae_mcp.settings import Settings

from helpers.servers import server_at
from load_helpers import STEER, Gate, fresh_engine, slow_generation, slow_scan, wait_until
from mcp_client import call_many, error_text

# Explanation search ranks lexically here: MiniLM's one-time load (~1 s on this box, on the first search) is not
# what these tests measure.
pytestmark = pytest.mark.usefixtures("lexical_only")

CHEAP = [
    ("model_info", {}),
    ("search_explanations", {"query": "cat"}),
    ("label_feature", {"feature": 3, "label": "cats", "evidence": "test"}),
    ("project_to_vocab", {"feature": 3, "top_k": 5}),
    ("top_examples", {"feature": 3, "k": 3}),
    ("feature_card", {"feature": 3}),
]


@pytest.fixture
def engine(tiny_loaded, tiny_engine):
    return fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=5.0, max_queued=4)


@pytest.fixture
def steps(monkeypatch):
    return slow_generation(monkeypatch)


def with_index(engine: Engine, tmp_path) -> Settings:
    """Settings over a tiny corpus whose feature index is built, so top_examples and cards answer from it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(["the cat sat on the mat and Lily saw the dog ran to the park " * 3] * 8),
                      encoding="utf-8")
    settings = Settings(corpus=str(corpus), data_dir=tmp_path / "data")
    ExampleSource(engine, settings).build_index(None, 2000)
    return settings


@pytest.fixture
def indexed_settings(engine, tmp_path):
    return with_index(engine, tmp_path)


def device_call_in_thread(engine: Engine, i: int, done: list[int], errors: list[Exception]) -> threading.Thread:
    """A device call `i` on its own thread (not an anyio worker: a fresh call): done.append(i) once it runs."""

    def run():
        try:
            with engine.device_work():
                done.append(i)
        except Exception as exc:  # kept for the assertions
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------------------------ cheap calls never wait


def test_cheap_calls_answer_while_a_long_steer_generate_waits_for_the_held_device(engine, indexed_settings,
                                                                                  monkeypatch):
    """The steer_generate is held at its step 5; then another call takes the device and the generation's step 6
    queues for it. Every cheap call (3 rounds) answers in that state: no step ran meanwhile and the device stayed
    held with the generation still queued, so none of them waited for the device (with a busy timeout of 5 s, one
    that did would have been answered busy). Then the generation runs its 50 steps."""
    gate = Gate(at=5)
    steps = slow_generation(monkeypatch, gate)
    server = build_server(engine, indexed_settings)
    answered: list[tuple[str, int, int]] = []  # (tool, steps run, calls waiting for the device) when it answered
    errors: list[str] = []

    async def until(predicate) -> None:
        while not predicate():  # a hang guard only: a generation that never gets there fails here
            assert len(steps) < 50, "the generation ended first"
            await anyio.sleep(0.01)

    async def go():
        async with Client(server) as heavy, Client(server) as cheap:
            await cheap.call_tool("model_info", {})  # fidelity measured once, while the device is free
            async with anyio.create_task_group() as tg:
                tg.start_soon(heavy.call_tool, "steer_generate", STEER)
                await until(lambda: len(steps) == gate.at)
                engine._lock.acquire()  # another call holds the device
                try:
                    gate.go.set()
                    await until(lambda: engine.device_status().waiting == 1)  # step 6 queued for it
                    for _ in range(3):
                        for name, args in CHEAP:
                            res = await cheap.call_tool(name, args)
                            answered.append((name, len(steps), engine.device_status().waiting))
                            if res.is_error:
                                errors.append(f"{name}: {error_text(res)}")
                finally:
                    engine._lock.release()

    anyio.run(go)
    assert not errors, errors
    assert len(answered) == 3 * len(CHEAP)
    assert all((n, waiting) == (gate.at, 1) for _, n, waiting in answered), answered
    assert len(steps) == 50 and engine.is_clean()


def test_a_one_forward_call_queued_beside_a_long_generation_runs_between_its_steps_and_sees_the_plain_model(
    tiny_loaded, tiny_engine
):
    """A next_token started while a steer_generate generates answers before the generation ends (by order: the
    generation waits for it at its step 3, with a hang guard, and would wait forever if it held the device across
    steps), equals the plain model's (the steering hook is attached only while a step runs), and the generation's
    numbers equal those of the same call run alone."""
    from sae_mcp.engine import logits as L
    from sae_mcp.engine import steering

    e = fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=60.0, max_queued=4)
    plain = L.next_token(e, "the cat sat", top_k=5)
    request = steering.SteeringRequest(STEER["prompt"], ((5, 40.0),), calibration="absolute", max_new_tokens=12,
                                       temperature=0.0, answer=" mat")
    alone = steering.steer_generate(e, request)
    order: list[str] = []
    short: dict = {}
    done = threading.Event()

    def next_token_call():
        short["result"] = L.next_token(e, "the cat sat", top_k=5)
        order.append("next_token")
        done.set()

    def progress(step, total):
        if step == 3:
            threading.Thread(target=next_token_call, daemon=True).start()
            done.wait(60)  # a hang guard only: it answers at once when the device is free between steps

    interleaved = steering.steer_generate(e, request, progress=progress)
    order.append("steer_generate")
    done.wait(120)
    assert order == ["next_token", "steer_generate"]
    assert short["result"] == plain  # the plain model, not the steered one
    assert interleaved == alone
    assert e.is_clean()


def test_a_device_call_from_another_client_answers_while_a_long_steer_generate_is_still_generating(
    engine, indexed_settings, steps
):
    """Over MCP, from a second client: next_token and get_feature_acts (device calls) answer while the 50-step
    steer_generate still has steps to go (counted, not timed), each equal to the same call with the device free."""
    server = build_server(engine, indexed_settings)
    device_calls = [("next_token", {"prompt": "the cat sat", "top_k": 5}),
                    ("get_feature_acts", {"prompt": "the cat sat", "top_k": 3})]
    free = [r.structured_content for r in call_many(server, device_calls)]
    seen: list[tuple[int, dict]] = []

    async def go():
        async with Client(server) as heavy, Client(server) as other:
            async with anyio.create_task_group() as tg:
                tg.start_soon(heavy.call_tool, "steer_generate", STEER)
                while len(steps) < 5:
                    await anyio.sleep(0.01)
                for name, args in device_calls:
                    res = await other.call_tool(name, args)
                    assert not res.is_error, error_text(res)
                    seen.append((len(steps), res.structured_content))

    anyio.run(go)
    assert all(n < 50 for n, _ in seen), [n for n, _ in seen]  # answered before the generation's last step
    for (_, got), want in zip(seen, free):
        assert {k: v for k, v in got.items() if k != "run_id"} == {k: v for k, v in want.items() if k != "run_id"}
    assert len(steps) == 50 and engine.is_clean()


def test_cheap_tools_never_take_the_device(tiny_loaded, tiny_engine, tmp_path):
    """With the device held by another call and a 0.2 s busy timeout, every cheap tool still answers, and a
    device tool answers busy."""
    short = fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=0.2)
    server = build_server(short, with_index(short, tmp_path))
    short._lock.acquire()
    try:
        res = call_many(server, CHEAP)
        busy = call_many(server, [("next_token", {"prompt": "the cat"})])[0]
    finally:
        short._lock.release()
    assert not any(r.is_error for r in res), [error_text(r) for r in res if r.is_error]
    assert "busy" in error_text(busy) and "try again in" in error_text(busy)


def test_feature_stats_answers_while_another_call_holds_the_device(tiny_loaded, tiny_engine, tmp_path):
    """feature_stats reads weights only (the moments of W_dec @ W_U): it queued behind device work and failed busy
    after 30 s beside a long steer_generate. Here the device is held and no call may queue (max_queued 0): a
    device tool is refused at once, feature_stats over every feature and over named ones answers."""
    held = fresh_engine(tiny_loaded, tiny_engine, max_queued=0)
    server = server_at(held, tmp_path / "data")
    held._lock.acquire()
    try:
        every, named, busy = call_many(server, [("feature_stats", {"top": 5}), ("feature_stats", {"features": [2, 3]}),
                                                ("next_token", {"prompt": "the cat"})])
    finally:
        held._lock.release()
    assert not every.is_error and not named.is_error, error_text(every if every.is_error else named)
    assert len(every.structured_content["features"]) == 5
    assert sorted(f["feature"] for f in named.structured_content["features"]) == [2, 3]
    assert "device is busy" in error_text(busy)
    assert held.is_clean()


def test_model_info_does_not_wait_for_a_busy_device_and_measures_fidelity_in_the_background(tiny_loaded,
                                                                                             tiny_engine, tmp_path):
    """model_info answers while another call holds the device, before it is released: on an engine whose busy
    timeout (600 s) outlasts the test's hang guard, a model_info that waited for the device could not answer."""
    engine = fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=600.0)
    services = Services(engine, with_index(engine, tmp_path), tools=tool_map())
    server = build_server(engine, services=services)
    answered, got = threading.Event(), {}

    def ask():
        (got["info"],) = call_many(server, [("model_info", {})])
        got["held"] = engine.device_status().held
        answered.set()

    engine._lock.acquire()  # a long call holds the device
    try:
        threading.Thread(target=ask, daemon=True).start()
        assert answered.wait(120), "model_info waited for the device"  # a hang guard: it answers at once
        assert got["held"] and got["info"].structured_content["saes"][0]["fidelity_note"] == MEASURING
    finally:
        engine._lock.release()
    wait_until(lambda: services._fidelity.get(next(iter(engine.saes)), (None, None))[0] is not None, 60)
    (info,) = call_many(server, [("model_info", {})])
    assert info.structured_content["saes"][0]["fidelity"]["tokens"] > 0
    assert engine.is_clean()


# ------------------------------------------------------------------------------------------- the device queue


def test_device_calls_are_served_in_arrival_order(engine):
    done, errors = [], []
    engine._lock.acquire()  # the running call
    try:
        threads = []
        for i in range(4):
            threads.append(device_call_in_thread(engine, i, done, errors))
            wait_until(lambda: engine.device_status().waiting == i + 1)  # queued before the next arrives
    finally:
        engine._lock.release()
    for t in threads:
        t.join(5)
    assert done == [0, 1, 2, 3] and not errors
    assert engine.device_status().waiting == 0 and not engine.device_status().held


def test_a_call_beyond_max_queued_is_answered_busy_at_once_with_the_queue_and_a_retry_hint(engine):
    done, errors = [], []
    engine._lock.acquire()
    try:
        time.sleep(0.2)  # the running call has run a while
        threads = []
        for i in range(engine.limits.max_queued):  # fill the queue: 4 waiters
            threads.append(device_call_in_thread(engine, i, done, errors))
            wait_until(lambda: engine.device_status().waiting == i + 1)
        with pytest.raises(DeviceBusy) as refused:
            with engine.device_work():
                pass
        # refused before any queued call ran and without joining the queue (one that waited would have been
        # refused only after the 5 s busy timeout, saying so: "waited 5 s")
        at_refusal = (list(done), engine.device_status().waiting)
    finally:
        engine._lock.release()
    for t in threads:
        t.join(5)
    busy = refused.value
    assert at_refusal == ([], 4)
    assert busy.ahead == 5 and busy.running_s >= 0.2 and busy.retry_after_s >= 1
    assert "4 calls already wait for it (at most 4 may)" in str(busy) and "try again in" in str(busy)
    assert sorted(done) == [0, 1, 2, 3] and not errors  # the queued ones all ran


def held_queue(holds: list[float], running_s: float) -> tuple[DeviceQueue, list[float]]:
    """A device queue on a clock the test moves: `holds` (seconds) as its recent history, then a call holding the
    device for `running_s` so far -> (the queue, the clock's cell)."""
    now = [100.0]
    queue = DeviceQueue(clock=lambda: now[0])
    for hold in holds:
        queue.acquire()
        now[0] += hold
        queue.release()
    queue.acquire()
    now[0] += running_s
    return queue, now


def test_the_busy_hint_3_7_s_into_a_36_s_call_reads_the_long_calls_not_the_mean_of_cheap_ones():
    """The reported case: a mean of recent holds said "try again in ~4 s" 3.7 s into a 36 s steer_generate. The
    running call's remaining time now comes from the recent holds that lasted as long as it has run."""
    queue, _ = held_queue([0.1] * 30 + [36.0] * 2 + [0.1] * 30, running_s=3.7)
    with pytest.raises(DeviceBusy) as refused:
        queue.admit(30.0, 0, lambda: False)  # no waiting allowed: refused at once
    busy = refused.value
    assert busy.ahead == 1 and busy.running_s == 3.7 and busy.retry_after_s == 32.3  # 36 - 3.7
    assert "held it 3.7 s (recent calls that ran as long took ~36.0 s: ~32 s more)" in str(busy)
    assert "try again in ~32 s" in str(busy)


def test_the_busy_hint_adds_a_mean_hold_for_each_call_queued_ahead():
    queue, _ = held_queue([1.0] * 10, running_s=0.4)
    hints = []
    for waiting in range(3):  # 0, 1, 2 calls queued before the refused one
        with pytest.raises(DeviceBusy) as refused:
            queue.admit(30.0, waiting, lambda: False)
        hints.append((refused.value.ahead, refused.value.retry_after_s))
        threading.Thread(target=queue.admit, args=(None, None, lambda: False), daemon=True).start()
        wait_until(lambda: queue.status().waiting == waiting + 1)
    assert hints == [(1, 1.0), (2, 1.6), (3, 2.6)]  # 0.6 s left of the running one (at least 1), 1 s per waiter
    assert "2 wait before this one (recent device calls took ~1.0 s each); try again in ~3 s" in str(refused.value)
    for _ in range(4):  # let the three waiters through, one after another
        queue.release()
        wait_until(lambda: queue.status().held or queue.status().waiting == 0)


def test_the_busy_hint_for_a_call_longer_than_any_recent_one_is_as_long_again():
    queue, now = held_queue([0.5] * 10, running_s=8.0)
    with pytest.raises(DeviceBusy) as refused:
        queue.admit(30.0, 0, lambda: False)
    assert refused.value.retry_after_s == 8.0 and "longer than any recent call" in str(refused.value)
    now[0] += 12.0
    with pytest.raises(DeviceBusy) as later:
        queue.admit(30.0, 0, lambda: False)
    assert later.value.retry_after_s == 20.0  # the longer it runs, the later the hint
    queue.release()


def test_a_call_that_waits_past_the_timeout_is_answered_busy_and_leaves_the_queue(tiny_loaded, tiny_engine):
    """It queues (its message counts the call ahead of it), is answered busy while the device is still held (the
    holder never let go), and leaves the queue. Its wait is at least the timeout (the queue's deadline is on the
    same monotonic clock)."""
    engine = fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=0.3)
    outcome: dict[str, object] = {}

    def call():
        t0 = time.monotonic()
        try:
            with engine.device_work():
                outcome["ran"] = True
        except Busy as exc:
            outcome["busy"], outcome["waited"] = exc, time.monotonic() - t0

    engine._lock.acquire()
    try:
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(60)  # a hang guard: it gives up after 0.3 s
        left = (engine.device_status().held, engine.device_status().waiting)
    finally:
        engine._lock.release()
    assert left == (True, 0) and "ran" not in outcome  # refused while still held, and out of the queue
    assert outcome["waited"] >= 0.3
    assert "waited 0.3 s" in str(outcome["busy"]) and "1 call(s) are ahead" in str(outcome["busy"])
    with engine.device_work():  # and the device is free for the next one
        pass


def test_a_call_admitted_once_is_never_refused_between_its_batches(tiny_loaded, tiny_engine):
    """A scan takes the device per batch: its later batches queue fairly but are not refused when the queue is
    full or the wait is long (that would break it off half-way); a new call at that moment is refused."""
    engine = fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=0.2, max_queued=1)
    first_batch_done, queue_full = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def call(fresh_call: bool) -> None:  # runs on an anyio worker thread, as the SDK runs tools
        if fresh_call:
            try:
                with engine.device_work():
                    outcome["fresh"] = "ran"
            except Busy as exc:
                outcome["fresh"] = exc
            return
        with engine.device_work():
            pass
        first_batch_done.set()
        queue_full.wait(5)
        with engine.device_work():  # the next batch: waits past the 0.2 s timeout, behind a full queue
            outcome["second batch"] = "ran"

    async def run_call(fresh_call: bool) -> None:
        await anyio.to_thread.run_sync(call, fresh_call)

    scan = threading.Thread(target=anyio.run, args=(run_call, False), daemon=True)
    scan.start()
    assert first_batch_done.wait(5)
    done, errors = [], []
    engine._lock.acquire()  # another call runs
    try:
        waiter = device_call_in_thread(engine, 0, done, errors)  # and one waits: the queue is full
        wait_until(lambda: engine.device_status().waiting == 1)
        queue_full.set()
        wait_until(lambda: engine.device_status().waiting == 2)  # the scan's next batch queued anyway
        anyio.run(run_call, True)  # a new call now is refused at once
        wait_until(lambda: errors)  # the queued one gives up after its 0.2 s, the device still held
        assert engine.device_status().waiting == 1  # the scan's next batch still waits: not refused
    finally:
        engine._lock.release()
    scan.join(5)
    waiter.join(5)
    assert outcome["second batch"] == "ran"
    # the two fresh calls were refused: one at once (the queue was full), the one queued after its 0.2 s
    assert isinstance(outcome["fresh"], Busy) and "at most 1 may" in str(outcome["fresh"])
    assert done == [] and len(errors) == 1 and "waited 0.2 s" in str(errors[0])


def test_a_second_scan_of_a_row_being_scanned_is_answered_busy_or_cancelled_not_left_waiting(
        tiny_loaded, tiny_engine, tmp_path, monkeypatch):
    """build_index while another build_index scans the same row (minutes, on a real corpus): the second waits as
    for the device, so it is answered busy after the busy timeout, or stops when cancelled, while the first runs."""
    from sae_mcp.engine.runtime import CancelToken
    from sae_mcp.errors import Cancelled

    engine = fresh_engine(tiny_loaded, tiny_engine, busy_timeout_s=0.3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the cat sat on the mat {i} and Lily saw the dog" for i in range(600)))
    source = ExampleSource(engine, Settings(corpus=str(corpus), data_dir=tmp_path / "data"))
    batches = slow_scan(monkeypatch, 0.1)
    first_cancel, outcome = CancelToken(), {}

    def first():
        try:
            outcome["first"] = source.build_index(None, 100_000, cancel=first_cancel)
        except Cancelled as exc:
            outcome["first"] = exc

    runner = threading.Thread(target=first, daemon=True)
    runner.start()
    wait_until(lambda: len(batches) >= 1)
    with pytest.raises(Busy) as busy:
        source.build_index(None, 100_000)
    mine = CancelToken()
    threading.Timer(0.1, mine.cancel).start()
    with pytest.raises(Cancelled) as cancelled:
        source.build_index(None, 100_000, cancel=mine, progress=lambda done, total: None)
    assert "first" not in outcome  # both answered while the first scan ran
    first_cancel.cancel()
    runner.join(5)
    assert "another call is scanning index" in str(busy.value) and "try again" in str(busy.value)
    assert "waited for another call's scan of index" in str(cancelled.value) and "nothing ran" in str(cancelled.value)
    assert isinstance(outcome["first"], Cancelled) and engine.is_clean() and engine.device_status().waiting == 0


def test_after_all_of_it_the_engine_is_clean_and_serves(tiny_engine, tiny_server):
    assert tiny_engine.is_clean() and not tiny_engine.device_status().held
    res = call_many(tiny_server, [("next_token", {"prompt": "the cat"}),
                                  ("steer_generate", {**STEER, "max_new_tokens": 3})])
    assert not any(r.is_error for r in res) and tiny_engine.is_clean()
