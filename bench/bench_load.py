"""Load: many MCP clients at once against a real `sae-mcp serve --transport http`, mixing cheap and heavy tools.

The server runs the bundled stories260K model with its layer-3 SAE (sae_mcp/demo; or --sae DIR for another) over
its TinyStories corpus, indexed beforehand with
`sae-mcp index`, so top_examples answers from the index. Each client is an SDK Client (its own connection) that
calls tools back to back, drawn from MIX by weight: cheap ones never run the model (model_info,
search_explanations, label_feature, project_to_vocab, top_examples from the index, feature_card), heavy ones hold
the device (steer_generate over 4 doses, ablate_and_test, get_feature_acts, build_index growing the index 2,000
tokens a call: a scan taking the device per batch).

First, --abandon rounds of a long steer_generate given up by its client after 5 steps, in this process (the
engine watched): how soon the generation stops after the give-up, and how many steps it started meanwhile (the
wall-clock side of tests/test_load_http.py, which asserts only the order). Then, reported per client count:
per tool p50/p99/max latency, busy answers, errors; the cheap calls' p99 overall and for the cheap calls started
while a heavy call was in flight (goal < 1 s; tests/test_load.py asserts that they answer while the device is
held). Then a phase at the largest client
count for WARM_CALLS + --rss-calls calls gives the server's RSS growth from its warm state to the end (goal <=
5%), sampled along the way. A client answered busy waits the hinted seconds (at most BACKOFF_MAX_S) before its
next call, as an agent would. The clients share this process's event loop and, on a small box, the CPUs with the
server: latencies include that client-side queueing.

    python bench/bench_load.py [--clients 8 32] [--seconds 60] [--rss-calls 10000] [--baseline] [--legacy]
                               [--abandon 5] [--sae DIR] [--server-env KEY=VALUE ...] [--json out.json]

Measured on the shared 2-core dev box, CPU, clients and server on the same two cores, the SDK's 2026 wire,
p50 / p99 in seconds. Since the listening socket sets TCP_NODELAY (issue 20; before, every request after the first
on a kept-alive connection waited ~41 ms for a delayed ACK: bench_keepalive.py), two short runs back to back on
the same box, the code before the fix then after, `--clients 8 32 --seconds 20 --rss-calls 0`:
    8 clients, 20 s:   cheap p50 0.054 -> 0.019, p99 0.146 -> 0.199 (the tail is the CPU, not the wire); heavy
                       p50 unchanged within noise (steer_generate 1.24 -> 1.40, ablate_and_test 0.86 -> 0.91,
                       get_feature_acts 0.89 -> 0.83); busy 0%; 24.4 -> 24.2 calls/s; no errors
    32 clients, 20 s:  cheap p50 0.073 -> 0.039, p99 1.64 -> 1.43 (both cores saturated by 32 clients and the
                       server); heavy p50 2.7-3.0 s, 24% -> 23% answered busy; 25.8 -> 25.6 calls/s; no errors
A third run before the fix, minutes earlier, gave cheap p50 0.054 / 0.058 and p99 0.209 / 1.078 (8 / 32 clients):
at 20 s the 32-client p99 moves by half a second from run to run; the p50 is the delay's mark.
Before the fix, 60 s runs (--baseline, default durations):
    8 clients, 60 s:   cheap p50 0.060 / p99 0.216 (all 744 started while a heavy call ran); heavy: steer_generate
                       1.45 / 3.31, ablate_and_test 1.02 / 2.28, get_feature_acts 0.94 / 2.83, build_index
                       1.72 / 5.29; busy 0%; 17.9 calls/s; no errors
    32 clients, 60 s:  cheap p50 0.056 / p99 0.675 (the 844 during heavy calls: 0.671); heavy p99 ~5.1 s, 12.5%
                       answered busy (the 16-call queue full); build_index p50 19 s (its calls wait on the index
                       row's lock, one scan at a time, and each batch queues behind the device queue); 20.8 calls/s
    cheap calls only:  8 clients p99 0.160; 32 clients p99 1.101 (113 and 110 calls/s: the box is saturated by the
                       calls themselves; search_explanations, label_feature and feature_card share the explanation
                       store's lock, behind which MiniLM embeds the new labels on each search: their p50 ~0.5 s)
    RSS, 32 clients:   910 MB after 1,000 calls -> 924 MB after 11,000 (+1.6%), cheap p99 0.216, heavy 34% busy;
                       before malloc arenas were capped (admission.cap_malloc_arenas): 1030 -> 1487 MB over 5,000
The single-call floor (model_info from one client on a kept-alive connection) is now ~3.5 ms; it was ~0.05 s
before the fix, the delayed ACK's ~41 ms included (with --legacy, the 2025 session wire, it measured ~0.01 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import CORPUS, STORIES_HF, STORIES_SAE  # first: the hub offline, the repo importable

PROMPT = "Once upon a time, there was a little girl named Lily. She"
CHEAP = {"model_info", "search_explanations", "label_feature", "project_to_vocab", "top_examples", "feature_card"}
WARM_CALLS = 1000  # RSS baseline: allocator and caches warm
CALL_TIMEOUT_S = 120.0
RSS_EVERY = 250  # calls between samples of the server's RSS
BACKOFF_MAX_S = 5.0  # the longest a busy client waits before its next call


def mix(rng: random.Random, index_tokens: list[int], cheap_only: bool = False) -> tuple[str, dict]:
    """One call drawn by weight: ~2/3 cheap, ~1/3 heavy (cheap_only: a baseline without device work)."""
    f = rng.randrange(256)
    table = [
        (3, "model_info", {}),
        (3, "search_explanations", {"query": rng.choice(["girl", "dog", "happy", "ball", "park"])}),
        (1, "label_feature", {"feature": f, "label": "bench label", "evidence": "bench_load"}),
        (3, "project_to_vocab", {"feature": f, "top_k": 10}),
        (3, "top_examples", {"feature": f, "k": 5}),
        (2, "feature_card", {"feature": f}),
        (2, "steer_generate", {"prompt": PROMPT, "features": [{"feature": f, "strength": 2.0}],
                               "calibration": "absolute", "max_new_tokens": 48, "strengths": [0.5, 1, 2, 4]}),
        (2, "ablate_and_test", {"prompt": PROMPT, "answer": " was", "features": [f]}),
        (2, "get_feature_acts", {"prompt": PROMPT, "top_k": 5}),
        (1, "build_index", None),
    ]
    weights = [0 if cheap_only and name not in CHEAP else w for w, name, _ in table]
    _, name, args = rng.choices(table, weights=weights)[0]
    if name == "build_index":
        index_tokens[0] += 2000
        args = {"tokens": index_tokens[0]}
    return name, args


# ------------------------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_args(sae: Path, data: Path, port: int, clients: int) -> list[str]:
    cmd = [sys.executable, "-m", "sae_mcp", "serve", "--transport", "http", "--port", str(port),
           "--model", str(STORIES_HF), "--sae", str(sae), "--corpus", str(CORPUS), "--data-dir", str(data)]
    help_text = subprocess.run(cmd[:4] + ["--help"], capture_output=True, text=True).stdout
    if "--max-sessions-per-client" in help_text:  # each client holds a session on the 2025 wire
        cmd += ["--max-sessions-per-client", str(clients + 8)]
    if "--max-sessions " in help_text:  # and all of them together
        cmd += ["--max-sessions", str(max(clients + 8, 256))]
    return cmd


def start_server(cmd: list[str], port: int, log: Path, extra_env: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "SAE_MCP_TOKEN"} | extra_env  # loopback, no token
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not listen within 180 s; see {log}")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# ------------------------------------------------------------------------------------------------ the clients


class Run:
    """What one load phase recorded."""

    def __init__(self, cheap_only: bool = False, backoff: bool = True):
        self.cheap_only, self.backoff = cheap_only, backoff
        self.calls: list[tuple[str, float, str, bool]] = []  # tool, seconds, ok|busy|error, heavy in flight
        self.heavy_in_flight = 0
        self.rss: list[tuple[int, float]] = []  # (calls so far, MB), every RSS_EVERY calls
        self.next_rss = 0


async def one_call(client, run: Run, name: str, args: dict) -> None:
    import anyio

    heavy = name not in CHEAP
    overlapped = run.heavy_in_flight > 0
    run.heavy_in_flight += heavy
    t0, text = time.perf_counter(), ""
    try:
        with anyio.fail_after(CALL_TIMEOUT_S):
            res = await client.call_tool(name, args)
        text = " ".join(getattr(c, "text", "") for c in res.content)
        outcome = "ok" if not res.is_error else ("busy" if "device is busy" in text else "error")
        if outcome == "error":
            print(f"  error from {name}: {text[:200]}", file=sys.stderr)
    except Exception as exc:  # a transport failure or our timeout
        outcome = "error"
        print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        run.heavy_in_flight -= heavy
    run.calls.append((name, time.perf_counter() - t0, outcome, overlapped and not heavy))
    if outcome == "busy" and run.backoff:
        hint = re.search(r"try again in ~(\d+) s", text)
        await anyio.sleep(min(float(hint.group(1)) if hint else 1.0, BACKOFF_MAX_S))


async def client_loop(url: str, mode: str, seed: int, stop: float, run: Run, index_tokens: list[int],
                      until_calls: int | None, pid: int) -> None:
    from mcp import Client

    rng = random.Random(seed)
    async with Client(url, mode=mode) as client:
        while time.monotonic() < stop and (until_calls is None or len(run.calls) < until_calls):
            await one_call(client, run, *mix(rng, index_tokens, run.cheap_only))
            if len(run.calls) >= run.next_rss:
                run.rss.append((len(run.calls), rss_mb(pid)))
                run.next_rss += RSS_EVERY


def load_phase(url: str, mode: str, clients: int, seconds: float, index_tokens: list[int], pid: int,
               until_calls: int | None = None, cheap_only: bool = False) -> Run:
    import anyio

    run = Run(cheap_only)

    async def go():
        stop = time.monotonic() + seconds
        async with anyio.create_task_group() as tg:
            for i in range(clients):
                tg.start_soon(client_loop, url, mode, 1000 * clients + i, stop, run, index_tokens, until_calls, pid)

    anyio.run(go)
    return run


# ------------------------------------------------------------------------------------------------ the figures


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def summarize(run: Run, seconds: float) -> dict:
    by_tool: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for name, dt, outcome, _ in run.calls:
        by_tool[name].append((dt, outcome))
    tools = {}
    for name, rows in sorted(by_tool.items()):
        answered = [dt for dt, o in rows if o == "ok"]
        tools[name] = dict(calls=len(rows), p50=pct(answered, 0.5), p99=pct(answered, 0.99),
                           max=max(answered, default=float("nan")), busy=sum(o == "busy" for _, o in rows),
                           errors=sum(o == "error" for _, o in rows))
    cheap = [dt for name, dt, o, _ in run.calls if name in CHEAP and o == "ok"]
    overlapped = [dt for name, dt, o, ov in run.calls if ov and o == "ok"]
    heavy = [o for name, _, o, _ in run.calls if name not in CHEAP]
    return dict(calls=len(run.calls), calls_per_s=len(run.calls) / seconds, tools=tools,
                cheap_p50=pct(cheap, 0.5), cheap_p99=pct(cheap, 0.99), cheap_max=max(cheap, default=float("nan")),
                cheap_during_heavy=len(overlapped), cheap_p99_during_heavy=pct(overlapped, 0.99),
                busy_rate_heavy=sum(o == "busy" for o in heavy) / max(len(heavy), 1),
                errors=sum(o == "error" for _, _, o, _ in run.calls))


def print_summary(clients: int, seconds: float, s: dict) -> None:
    print(f"\n{clients} clients, {seconds:.0f} s: {s['calls']} calls ({s['calls_per_s']:.1f}/s), "
          f"busy rate of heavy calls {s['busy_rate_heavy']:.1%}, errors {s['errors']}")
    print(f"  {'tool':22s} {'calls':>6s} {'p50 s':>8s} {'p99 s':>8s} {'max s':>8s} {'busy':>5s} {'err':>4s}")
    for name, t in s["tools"].items():
        kind = "" if name in CHEAP else " *"
        print(f"  {name + kind:22s} {t['calls']:6d} {t['p50']:8.3f} {t['p99']:8.3f} {t['max']:8.3f} "
              f"{t['busy']:5d} {t['errors']:4d}")
    print(f"  cheap calls: p50 {s['cheap_p50']:.3f} s, p99 {s['cheap_p99']:.3f} s, max {s['cheap_max']:.3f} s; "
          f"the {s['cheap_during_heavy']} started while a heavy call (*) was in flight: p99 "
          f"{s['cheap_p99_during_heavy']:.3f} s (goal < 1 s)")


def rss_report(run: Run) -> dict:
    """RSS from the first sample at or after WARM_CALLS of the phase to its last, with the samples between."""
    warm = next(((n, mb) for n, mb in run.rss if n >= WARM_CALLS), None)
    if warm is None or run.rss[-1][0] <= warm[0]:
        return dict(note="too few calls for an RSS figure")
    (n0, mb0), (n1, mb1) = warm, run.rss[-1]
    growth = (mb1 - mb0) / mb0
    series = [(n, round(mb)) for n, mb in run.rss if n % 1000 < RSS_EVERY]
    print(f"\nserver RSS {mb0:.0f} MB after {n0} calls -> {mb1:.0f} MB after {n1} calls: {growth:+.1%} over "
          f"{n1 - n0} calls (goal <= +5% over 10,000)\n  (calls, MB): {series}")
    return dict(warm_calls=n0, warm_mb=mb0, end_calls=n1, end_mb=mb1, growth=growth, series=series)


# ------------------------------------------------------------------------------------------------ abandoned calls


def abandon_phase(mode: str, rounds: int, sae: Path) -> dict:
    """How soon an abandoned call stops (tests/test_load_http.py asserts the order: within a step of the server's
    cancel, the device then free; this times it). In this process, so that the engine can be watched: the same
    model and SAE behind the streamable-HTTP app under uvicorn on a thread. Per round, a client starts a 200-step
    steer_generate and gives it up after its 5th step (its request closed); timed: the give-up until the generation
    stops at its cancel check, and the steps it started after the give-up."""
    import threading

    import anyio
    import uvicorn
    from mcp import Client

    from sae_mcp.engine import generation, runtime
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.errors import Cancelled
    from sae_mcp.server.app import build_server
    from sae_mcp.settings import Settings

    settings = Settings(model=str(STORIES_HF), saes=(str(sae),), device="cpu",
                        data_dir=Path(tempfile.mkdtemp(prefix="sae-mcp-abandon-")))
    engine = Engine.from_settings(settings)
    steps: list[float] = []  # each generation step's start (perf_counter)
    stops: list[tuple[float, int]] = []  # (when, steps so far) each time a cancel check stopped the work
    real_sample, real_check = generation._sample, runtime.CancelToken.check

    def sample(*a):
        steps.append(time.perf_counter())
        return real_sample(*a)

    def check(token: runtime.CancelToken) -> None:
        try:
            real_check(token)
        except Cancelled:
            stops.append((time.perf_counter(), len(steps)))
            raise

    generation._sample, runtime.CancelToken.check = sample, check
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(build_server(engine, settings).streamable_http_app(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    long_steer = {"prompt": PROMPT, "features": [{"feature": 3, "strength": 2.0}], "calibration": "absolute",
                  "max_new_tokens": 200, "temperature": 0}
    stop_s, extra = [], []

    async def one_round() -> None:
        async with Client(url, mode=mode) as client:
            n0, k0 = len(stops), len(steps)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: client.call_tool("steer_generate", long_steer))
                while len(steps) < k0 + 5:
                    await anyio.sleep(0.005)
                given_up, at = time.perf_counter(), len(steps)
                tg.cancel_scope.cancel()
            with anyio.fail_after(CALL_TIMEOUT_S):
                while len(stops) == n0 or engine.device_status().held:
                    await anyio.sleep(0.005)
            stop_s.append(stops[-1][0] - given_up)
            extra.append(stops[-1][1] - at)

    try:
        while not srv.started:
            time.sleep(0.05)
        for _ in range(rounds):
            anyio.run(one_round)
    finally:
        generation._sample, runtime.CancelToken.check = real_sample, real_check
        srv.should_exit = True
        thread.join(10)
        sock.close()
    out = {"rounds": rounds, "stopped_after_p50_s": pct(stop_s, 0.5), "stopped_after_max_s": max(stop_s),
           "steps_after_max": max(extra)}
    print(f"\nabandoned steer_generate ({rounds} rounds, {mode} wire, given up after its 5th step): stopped "
          f"p50 {out['stopped_after_p50_s']:.3f} s, max {out['stopped_after_max_s']:.3f} s after the give-up; "
          f"at most {out['steps_after_max']} step(s) started after it")
    return out


# ------------------------------------------------------------------------------------------------ main


def prepare(args, work: Path) -> Path:
    sae = args.sae or STORIES_SAE
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "sae_mcp", "index", "--model", str(STORIES_HF), "--sae", str(sae),
                    "--corpus", str(CORPUS), "--data-dir", str(work / "data"), "--tokens", "20000"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"SAE {sae}; index of 20,000 tokens built in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return Path(sae)


def warm_up(url: str, mode: str, index_tokens: list[int], pid: int) -> None:
    """One call of every tool (fidelity measured, the explanation search's model loaded), untimed."""
    rng = random.Random(0)
    seen: set[str] = set()
    run = Run()
    import anyio
    from mcp import Client

    async def go():
        async with Client(url, mode=mode) as client:
            while len(seen) < 10:
                name, a = mix(rng, index_tokens)
                if name not in seen:
                    seen.add(name)
                    await one_call(client, run, name, a)

    anyio.run(go)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=60.0, help="per client count")
    ap.add_argument("--rss-calls", type=int, default=10_000, help="calls of the RSS phase after its warm-up (0: none)")
    ap.add_argument("--rss-max-seconds", type=float, default=900.0, help="cap on that phase")
    ap.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE", help="for the server process")
    ap.add_argument("--legacy", action="store_true", help="the 2025 session wire instead of the SDK's 2026 default")
    ap.add_argument("--baseline", action="store_true", help="first, each client count with cheap calls only")
    ap.add_argument("--sae", type=Path, default=None, help="an SAE folder (default: the bundled layer-3 SAE)")
    ap.add_argument("--abandon", type=int, default=5, help="rounds of the abandoned-call phase (0: none)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    mode = "legacy" if args.legacy else "auto"
    work = Path(tempfile.mkdtemp(prefix="sae-mcp-load-"))
    sae = prepare(args, work)
    abandoned = abandon_phase(mode, args.abandon, sae) if args.abandon else None
    port = free_port()
    env = dict(kv.split("=", 1) for kv in args.server_env)
    proc = start_server(serve_args(sae, work / "data", port, max(args.clients)), port, work / "server.log", env)
    try:
        figures = run_phases(args, mode, f"http://127.0.0.1:{port}/mcp", proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    if abandoned is not None:
        figures["abandon"] = abandoned
    if args.json:
        args.json.write_text(json.dumps(dict(mode=mode, seconds=args.seconds, **figures), indent=1))


def run_phases(args, mode: str, url: str, pid: int) -> dict:
    """Warm-up, then the cheap-only baselines (if asked), the timed phases, the RSS phase -> their figures."""
    index_tokens, figures = [20_000], {}
    warm_up(url, mode, index_tokens, pid)
    phases = [(n, True) for n in args.clients if args.baseline] + [(n, False) for n in args.clients]
    for n, cheap_only in phases if args.seconds else []:
        run = load_phase(url, mode, n, args.seconds, index_tokens, pid, cheap_only=cheap_only)
        key = f"{n}_clients" + ("_cheap_only" if cheap_only else "")
        figures[key] = summarize(run, args.seconds)
        print_summary(n, args.seconds, figures[key])
    if args.rss_calls:
        t0, n = time.monotonic(), max(args.clients)
        run = load_phase(url, mode, n, args.rss_max_seconds, index_tokens, pid, until_calls=WARM_CALLS + args.rss_calls)
        figures["rss_phase"] = summarize(run, time.monotonic() - t0)
        print_summary(n, time.monotonic() - t0, figures["rss_phase"])
        figures["rss"] = rss_report(run)
    return figures


if __name__ == "__main__":
    main()
