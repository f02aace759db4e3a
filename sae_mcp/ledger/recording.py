"""Recording every tool call (the ledger), as the server makes them.

    Ledger(engine, settings, tools, recording=True)     built once by Services; `services.ledger`; `tools`: the
                            registered tools by name, whose ledger rules (ledger/rule.py) say how each
                            tool's calls are resolved, digested and summarised, and which runs are kept
      .store                the LedgerStore (opened on first use: a server that is never called writes no file)
      .prepare()            starts computing the environment (model/SAE weights hashes, versions) in the background
      .begin(tool, given, session, client, defaults) -> Pending, or None when not recording; `session` is the
                            conversation's id (the MCP face finds it: server/conversations.py)

    Pending.finish(structured) -> run id   before the answer leaves: digest, a bounded copy, the resolved arguments,
                            one committed insert, of the result's structured content (plain JSON data); the MCP
                            face puts the run id in the answer (server/wiring.py)
    Pending.fail(message)   a failed call, with the message the client sees

Recording never changes a result (the digest is taken without run_id) and never fails a call: an error while
recording is logged and the answer goes out without a run_id. The digest is the SHA-256 of the result's
canonical JSON without the fields that vary between identical calls (its rule's volatile fields: timings of an
index build, the ids a store hands out) and
with the value of any secret field replaced (ledger/bounds.py SECRET_FIELDS: a blind set's submit secret is never
written), so a replay compares digests. What is stored of the arguments, the result and the error is
ledger/bounds.py's; the size cap (pruning the oldest runs no label cites) is ledger/store.py's; the cap is
DEFAULT_MAX_MB, or SAE_MCP_LEDGER_MAX_MB megabytes when set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydantic_core

from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import InvalidInput
from sae_mcp.ledger.bounds import (
    MAX_REJECTED_CHARS,
    MAX_RESULT_CHARS,
    SECRET_FIELDS,
    SECRET_MARK,
    fit,
    scrub,
    secrets_in,
    without_secrets,
)
from sae_mcp.ledger.env import env_id, environment
from sae_mcp.ledger.records import Run
from sae_mcp.ledger.resolve import features_of, resolve
from sae_mcp.ledger.rule import Recorded, ResolveContext, rule_of, tools_where
from sae_mcp.ledger.store import DEFAULT_MAX_MB, PRUNE_BATCH, PRUNE_TO, LedgerStore, ledger_path
from sae_mcp.ledger.summary import summarize
from sae_mcp.settings import Settings
from sae_mcp.store.explanations import cited_runs

log = logging.getLogger(__name__)

CHECK_EVERY_CHARS = 1_000_000  # the ledger's size is checked after this much text is recorded (or a 16th of the cap)
ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base 32: no i, l, o, u to misread in a citation


def new_id(prefix: str, n: int = 8) -> str:
    """prefix + n random base-32 characters (5 bits each: 8 characters are 40 bits)."""
    bits = int.from_bytes(secrets.token_bytes((5 * n + 7) // 8), "big")
    return prefix + "".join(ALPHABET[(bits >> (5 * i)) & 31] for i in range(n))


def canonical(volatile: tuple[str, ...], structured: dict | None) -> bytes:
    """The JSON the digest is taken of (UTF-8), volatile fields and run_id left out, secret fields' values replaced.
    Written by pydantic-core (4x faster than json.dumps: recording must stay cheap); keys stay in the result model's
    field order (deterministic; replay compares the fields themselves when digests differ, so a reordering alone
    reads as the same result). A secret is looked for in the JSON text (one C search) before the result is walked."""
    body = without_volatile(volatile, structured)
    text = pydantic_core.to_json(body)
    if any(f'"{name}"'.encode() in text for name in SECRET_FIELDS):
        text = pydantic_core.to_json(scrub(body))
    return text


def without_volatile(volatile: tuple[str, ...], structured: dict | None) -> dict:
    """The result without run_id and the `volatile` fields (a.b: b inside a) of its tool's rule (a shallow copy;
    nested dicts copied where cut)."""
    out = {k: v for k, v in (structured or {}).items() if k != "run_id"}
    for path in volatile:
        *parents, leaf = path.split(".")
        node = out
        for name in parents:
            if not isinstance(node.get(name), dict):
                break
            node[name] = node = dict(node[name])
        else:
            node.pop(leaf, None)
    return out


def digest_of(volatile: tuple[str, ...], structured: dict | None) -> str:
    return hashlib.sha256(canonical(volatile, structured)).hexdigest()[:32]


@dataclass
class Pending:
    """One call being recorded: begun on the event loop, finished (or failed) exactly once."""

    ledger: Ledger
    tool: str
    given: dict
    defaults: dict
    session: str
    client: str | None
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)
    done: bool = False
    run_id: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _claim(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def finish(self, structured: dict | None) -> str | None:
        """Record the call's result (its structured content); its run id, or None when it was not recorded (done
        before, or recording failed: logged)."""
        if not self._claim():
            return None
        try:
            self.run_id = self.ledger.write(self, structured=structured)
        except Exception:
            log.warning("could not record the %s call in the ledger; answering anyway", self.tool, exc_info=True)
        return self.run_id

    def fail(self, message: str) -> None:
        if not self._claim():
            return
        try:
            self.run_id = self.ledger.write(self, error=message)
        except Exception:
            log.warning("could not record the failed %s call in the ledger", self.tool, exc_info=True)


class Ledger:
    def __init__(self, engine: Engine, settings: Settings, tools: Mapping[str, Recorded], recording: bool = True,
                 store: LedgerStore | None = None,
                 max_activation: Callable[[str, int], tuple[float, str] | None] | None = None,
                 max_bytes: int | None = None):
        self.engine, self.settings, self.tools, self.recording = engine, settings, tools, recording
        self.max_bytes = max_bytes if max_bytes is not None else ledger_cap()
        self._pruning = False  # over the cap: each recorded run deletes a batch until under PRUNE_TO of it
        self._unchecked = 0  # characters recorded since the size was last checked
        self._warned_full = False
        self._store = store
        self._lock = threading.Lock()
        self._env: tuple[str, dict] | None = None
        self._env_thread: threading.Thread | None = None
        self._resolve = ResolveContext(engine, max_activation, self._corpus_of)
        self._written_sessions: set[str] = set()  # sessions whose row this ledger wrote (once each)

    @property
    def store(self) -> LedgerStore:
        """The data dir's ledger. Not recording (--no-ledger), an existing one is read but none is created: an empty
        one in memory stands in."""
        with self._lock:
            if self._store is None:
                path = ledger_path(self.settings.data_dir)
                self._store = LedgerStore(path if self.recording or path.exists() else Path(":memory:"))
            return self._store

    # -- the environment ----------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Compute the environment on a daemon thread (hashing a large local model takes a while, once)."""
        if self.recording and self._env_thread is None:
            self._env_thread = threading.Thread(target=self._prepare, name="sae-mcp-ledger-env", daemon=True)
            self._env_thread.start()

    def _prepare(self) -> None:
        try:
            self.environment()
        except Exception:  # e.g. a data dir that cannot be written: each call's recording logs it again
            log.warning("the ledger could not record the environment; calls are answered without run ids",
                        exc_info=True)

    def environment(self) -> tuple[str, dict]:
        """(id, body), computed once and written to the store."""
        with self._lock:
            if self._env is not None:
                return self._env
        body = environment(self.engine, self.settings, self.store)
        eid = env_id(body)
        self.store.put_env(eid, body, time.time())
        with self._lock:
            self._env = (eid, body)
        return self._env

    def _corpus_of(self, key: str) -> dict | None:
        return next((s["corpus"] for s in self.environment()[1]["saes"] if s["key"] == key), None)

    # -- recording ----------------------------------------------------------------------------------------------

    def begin(self, tool: str, given: dict, session: str, client: str | None, defaults: dict) -> Pending | None:
        """A call of `tool` with the arguments `given`, in the conversation `session` (of the client named
        `client`), to be recorded when it answers; None when this ledger does not record."""
        if not self.recording:
            return None
        return Pending(self, tool, dict(given), defaults, session, client)

    def write(self, p: Pending, structured: dict | None = None, error: str | None = None) -> str:
        """Record one call (its result's structured content, or the error it failed with); returns its run id
        (committed)."""
        wall = time.perf_counter() - p.t0
        structured = structured if error is None else None
        if self._env_thread is not None and self._env_thread is not threading.current_thread():
            self._env_thread.join()  # the first call waits for the hashes begun at start (seconds, once)
        eid = self.environment()[0]
        given, args_cut = p.given, False
        if error is not None:  # a rejected call's arguments are cut before anything reads them (a 3.5 MB answer
            given, args_cut = fit(scrub(given), MAX_REJECTED_CHARS)  # would be tokenized to resolve it)
            error = without_secrets(error, secrets_in(p.given))
        rule = rule_of(self.tools, p.tool)
        resolved = resolve(rule, given, p.defaults, structured, self._resolve)
        sae = resolved.get("sae") if isinstance(resolved.get("sae"), str) else None
        run = Run(id=new_id("r"), session=p.session, env=eid, time=p.started, tool=p.tool, given=given,
                  resolved=resolved, wall_s=wall, ok=error is None, error=error, args_cut=args_cut, sae=sae,
                  features=features_of(rule, resolved, structured))
        view = structured
        if error is None:
            text = canonical(rule.volatile, structured)
            run.digest = hashlib.sha256(text).hexdigest()[:32]
            run.result_chars = len(text)
            if structured is not None and (rule.volatile or SECRET_MARK.encode() in text):
                view = scrub(structured)  # a secret may sit in a volatile field, which canonical() left out
            if structured is not None and not rule.volatile and len(text) <= MAX_RESULT_CHARS:
                run.result_json = text.decode()  # the canonical JSON is the whole result: no second dump
            elif structured is not None:
                run.result, run.truncated = fit(view, MAX_RESULT_CHARS, size=len(text))
        run.summary = summarize(rule, view, run.ok, error)
        if p.session not in self._written_sessions:
            self.store.put_session(p.session, p.started, eid, p.client)
            self._written_sessions.add(p.session)
        self._unchecked += self.store.record(run)
        if self._pruning or self._unchecked >= min(CHECK_EVERY_CHARS, self.max_bytes // 16):
            self._unchecked = 0
            self._keep_under_cap()
        return run.id

    # -- the size cap -------------------------------------------------------------------------------------------

    def _keep_under_cap(self) -> None:
        """Past the cap, delete up to PRUNE_BATCH of the oldest runs no label cites (ledger/store.py's policy).
        Checking reads three page counts (10 us: done once per CHECK_EVERY_CHARS written, or a 16th of the cap);
        deleting starts over the cap and goes on, a batch per recorded run, until the pages in use are under PRUNE_TO
        of it."""
        used = self.store.used_bytes()
        if not self._pruning and used <= self.max_bytes:
            return
        if not self._pruning:
            log.warning("the ledger %s holds %.0f MB, over its cap of %.0f MB: deleting its oldest runs that no label "
                        "cites (SAE_MCP_LEDGER_MAX_MB sets the cap)", self.store.path, used / 1e6, self.max_bytes / 1e6)
        target = int(self.max_bytes * PRUNE_TO)
        done = self.store.prune(cited_runs(self.settings.data_dir), kept_tools(self.tools), max_bytes=target,
                                most=PRUNE_BATCH)
        self._written_sessions.difference_update(done.sessions)
        self._pruning = done.used_bytes > target and done.runs > 0
        if done.used_bytes > self.max_bytes and done.runs == 0 and not self._warned_full:
            self._warned_full = True
            log.warning("the ledger %s is over its cap and every run left is cited by a label (or records one): "
                        "raise SAE_MCP_LEDGER_MAX_MB", self.store.path)


def ledger_cap() -> int:
    """The ledger's size cap: SAE_MCP_LEDGER_MAX_MB megabytes when set, else DEFAULT_MAX_MB."""
    raw = os.environ.get("SAE_MCP_LEDGER_MAX_MB", "").strip()
    if not raw:
        return DEFAULT_MAX_MB * 1_000_000
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 1 <= mb <= 10_000_000:
        raise InvalidInput(f"SAE_MCP_LEDGER_MAX_MB={raw!r}: give the ledger's cap in megabytes, 1 to 10000000")
    return int(mb * 1_000_000)


def kept_tools(tools: Mapping[str, Recorded]) -> list[str]:
    """The tools whose successful runs are never pruned (their rule keeps them: the runs that recorded a label)."""
    return tools_where(tools, lambda rule: rule.keeps_runs)
