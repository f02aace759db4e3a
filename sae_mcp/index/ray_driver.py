"""`sae-mcp index --ray [ADDRESS]`: the one-pass feature index built by Ray actors over shards of the corpus and
merged into the same SQLite index, byte for byte, that one process builds with the same batch size.

    RayIndexer(settings, address=None, workers=None, ...)      connects (a local cluster when no address) and
                                                                starts the workers (ray_worker.IndexWorker)
      .keys                                                     the loaded SAEs
      .build_index(key, max_tokens, progress, cancel, batch_windows)   -> IndexReport, like ExampleSource's

1. Workers: one actor per GPU (num_gpus = --n-devices each), or per CPU slot (--workers N, 1 thread each), each
   holding the model and SAEs once, built from the same Settings as a single process.
2. Describe: every worker names the index file and its meta, which must agree (the same model, SAE weights and
   corpus file on every node). The driver opens the file and is its only writer (SQLite over a network share is
   unsafe): workers return states and windows.
3. Walk: worker 0 walks the windows the budget covers, from where the 'index' row stopped (0 when there is
   none), with a cursor every BUFFER_BATCHES windows. Shards are runs of whole buffers (BUFFER_BATCHES *
   batch_windows windows), so each shard's batches are exactly those one process would make with that batch
   size: the same activations, the same statistics. Without --batch-windows it is the largest one memory allows
   that still gives every worker an even share of buffers (index_shards.py: plans, shard rows, the merge).
4. Scan: shards queue to idle workers in chunks of --checkpoint-seconds; after each chunk the driver writes its
   windows, then its state as the shard's row 'index/shard-<i>:<start>-<end>' (replaced, never added to). A chunk
   that fails is rerun from that row: on the same worker when it raised, on a new worker when the process died,
   at most MAX_RETRIES times a shard. Progress sums the shards' rows and the running chunks' live counts.
5. Merge: the 'index' row (when one was resumed) and the shard rows merge (index/merge.py: exact, any order)
   into the 'index' row, in one transaction that deletes the shard rows.
A rerun finds the shard rows: when they fit the walk (ranges on its cursors holding its token counts) they are
reused, finished ones as they are and the others from their checkpoints, whatever the worker count, and ranges no
row covers become shards of their own; otherwise (another budget or start) they are dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from pathlib import Path

from sae_mcp.engine.runtime import CancelToken
from sae_mcp.errors import InvalidInput, SaeMcpError
from sae_mcp.index.ray_worker import Chunk, IndexWorker, Walk
from sae_mcp.index.shards import (
    SHARD_PREFIX,
    Shard,
    batch_for,
    join_dtypes,
    merge_into_index,
    plan_shards,
    reuse_shards,
    save_row,
    shard_rows,
)
from sae_mcp.index.source import CHECKPOINT_S, INDEX, Progress, resumable
from sae_mcp.index.store import IndexStore, StoredScan
from sae_mcp.results import rounded
from sae_mcp.results.corpus import IndexReport
from sae_mcp.settings import Settings

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # failed chunks a shard may have before the build gives up (its checkpoints stay)
POLL_S = 0.5  # how often the driver looks at finished chunks, live progress and a cancel
INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'sae-mcp[ray]'"


def import_ray():
    """The ray module, or None when it is not installed (the extra)."""
    try:
        import ray
    except ImportError:
        return None
    return ray


class _Pool:
    """The worker actors. Chunks run one at a time per worker (its default concurrency group); progress polls
    answer from a second thread ('poll') while a chunk runs."""

    def __init__(self, ray, settings: Settings, n: int, gpus: int, cpus: int, device: str):
        self.ray, self.settings, self.gpus, self.cpus, self.device = ray, settings, gpus, cpus, device
        self.remote = ray.remote(concurrency_groups={"poll": 1})(IndexWorker)
        self.workers = [self._new() for _ in range(n)]

    def _new(self):
        return self.remote.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
            self.settings, self.device, max(1, self.cpus))

    def __len__(self) -> int:
        return len(self.workers)

    def replace(self, slot: int) -> None:
        """A new worker in `slot` (the old one died)."""
        self.stop(slot)
        self.workers[slot] = self._new()

    def stop(self, slot: int) -> None:
        """Kill the worker in `slot`, with whatever it runs; `revive` starts its successor when next needed (a
        cancelled build usually ends the process: no model is loaded for nothing)."""
        try:
            self.ray.kill(self.workers[slot], no_restart=True)
        except Exception as exc:  # already gone
            log.debug("worker %d: %s", slot, exc)
        self.workers[slot] = None

    def revive(self) -> None:
        self.workers = [w if w is not None else self._new() for w in self.workers]

    def ask(self, method: str, *args, slots: list[int] | None = None) -> list:
        """`method`'s results from the workers (all by default). A worker that died is replaced and all are asked
        again, at most MAX_RETRIES times; an error the method raised comes out as itself (see worker_error)."""
        slots = list(range(len(self.workers))) if slots is None else slots
        for attempt in itertools.count():
            refs = {i: getattr(self.workers[i], method).remote(*args) for i in slots}
            out, dead = {}, []
            for i, ref in refs.items():
                try:
                    out[i] = self.ray.get(ref)
                except self.ray.exceptions.RayActorError:
                    dead.append(i)
                except self.ray.exceptions.RayTaskError as exc:
                    raise worker_error(exc) from None
            if not dead:
                return [out[i] for i in slots]
            if attempt >= MAX_RETRIES:
                raise SaeMcpError(f"Ray workers {dead} keep dying (asked: {method}); see the log above")
            log.warning("worker(s) %s died; starting new ones", dead)
            for i in dead:
                self.replace(i)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for slot in range(len(self.workers)):
            self.stop(slot)
        self.workers = []


def worker_error(exc: Exception) -> Exception:
    """What a worker raised: its SaeMcpError as it is (the CLI prints its message), else the Ray error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, SaeMcpError) else exc


class _Scheduler:
    """Runs every unfinished shard's chunks on the workers, checkpointing each chunk into its shard row."""

    def __init__(self, ray, pool: _Pool, index: IndexStore, job: Chunk, walk: Walk, shards: list[Shard],
                 max_retries: int):
        self.ray, self.pool, self.index, self.job, self.walk, self.shards = ray, pool, index, job, walk, shards
        self.max_retries = max_retries
        self.running: dict = {}  # windows ref -> (slot, shard, state ref)
        self.retries = 0

    def run(self, report, cancel: CancelToken | None) -> None:
        queue = deque(s for s in self.shards if not s.done)
        idle = list(range(len(self.pool)))
        try:
            while queue or self.running:
                if cancel is not None:
                    cancel.check()
                while idle and queue:
                    shard = queue.popleft()
                    self._submit(idle.pop(0), shard, shard.row)
                ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self._finished(ref, queue, idle)
                self._poll()
                report()
        finally:
            for slot, _, _ in self.running.values():  # stopped early: their chunks are lost, not their rows
                self.pool.stop(slot)
            self.running.clear()

    def _submit(self, slot: int, shard: Shard, state) -> None:
        """`state`: the shard's last row (a checkpoint, or the ref of the chunk before, on this worker)."""
        job = dataclasses.replace(self.job, name=shard.name, cursor=self.walk.at(shard.resume), first=shard.resume,
                                  end=shard.end, target=shard.target)
        state_ref, rows_ref = self.pool.workers[slot].scan_chunk.options(num_returns=2).remote(job, state)
        self.running[rows_ref] = (slot, shard, state_ref)

    def _finished(self, ref, queue: deque, idle: list) -> None:
        slot, shard, state_ref = self.running.pop(ref)
        try:
            rows, row = self.ray.get(ref), self.ray.get(state_ref)
        except self.ray.exceptions.RayError as exc:
            self._failed(slot, shard, exc)
            queue.appendleft(shard)  # from its checkpoint: nothing of the failed chunk was kept
            idle.append(slot)
            return
        if row.exhausted:
            raise SaeMcpError(f"{shard.name}: the corpus ended before the shard's end; did it change during the "
                              "build? Run the command again to start over")
        self.index.put_windows(rows)  # windows first: a checkpoint only refers to stored windows
        row.compute_dtype = join_dtypes(shard.row.compute_dtype if shard.row else None, row.compute_dtype)
        save_row(self.index, shard.name, row)
        shard.row, shard.live = row, 0
        if shard.done:
            idle.append(slot)
        else:
            self._submit(slot, shard, state_ref)  # on: the worker already has this state in its object store

    def _failed(self, slot: int, shard: Shard, exc: Exception) -> None:
        if isinstance(worker_error(exc), SaeMcpError):  # the scan refused (e.g. positions past 2^32): no retry
            raise worker_error(exc) from None
        shard.failures += 1
        self.retries += 1
        shard.live = 0
        died = isinstance(exc, self.ray.exceptions.RayActorError)
        log.warning("%s failed (%s, attempt %d of %d): %s", shard.name, "worker died" if died else "error",
                    shard.failures, self.max_retries + 1, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        if died:
            self.pool.replace(slot)
        if shard.failures > self.max_retries:
            raise SaeMcpError(f"{shard.name} failed {shard.failures} times; its last checkpoint is kept (run the "
                              f"command again to resume). Last error: {exc}") from None

    def _poll(self) -> None:
        """Live progress of the running chunks (shard-cumulative tokens), from the workers' 'poll' thread."""
        asks = {self.pool.workers[slot].progress.options(concurrency_group="poll").remote(): shard
                for slot, shard, _ in self.running.values()}
        ready, _ = self.ray.wait(list(asks), num_returns=len(asks), timeout=0.2) if asks else ([], [])
        for ref in ready:
            try:
                name, tokens = self.ray.get(ref)
            except self.ray.exceptions.RayError:  # a dead worker: its chunk's result says so
                continue
            if name == asks[ref].name:
                asks[ref].live = tokens


class RayIndexer:
    """Builds indexes on a Ray cluster: `address` None starts a local one (or uses the one this process already
    started), else ray.init(address) joins it ('auto', 'HOST:PORT', 'ray://HOST:10001'). `workers`: actors
    (default: one per GPU of the cluster, else one per CPU); `shards`: default one per worker. `fault` is a
    test-only hook (ray_worker.FailAfter)."""

    def __init__(self, settings: Settings, address: str | None = None, workers: int | None = None,
                 shards: int | None = None, checkpoint_s: float = CHECKPOINT_S, max_retries: int = MAX_RETRIES,
                 fault=None):
        self.ray = import_ray()
        if self.ray is None:
            raise SaeMcpError(INSTALL_HINT)
        self.settings, self.shards, self.checkpoint_s = settings, shards, checkpoint_s
        self.max_retries, self.fault = max_retries, fault
        self.retries = 0  # failed chunks rerun, over every build (the tests read it)
        self._started = False
        if not self.ray.is_initialized():
            local = {} if address else dict(num_cpus=workers, include_dashboard=False)
            self.ray.init(address=address, logging_level=logging.WARNING, **local)
            self._started = True
        try:
            self.pool = _Pool(self.ray, settings, *self._layout(workers))
            self.keys: list[str] = self.pool.ask("keys", slots=[0])[0]
        except BaseException:
            if self._started:  # a local cluster of ours: not left running
                self.ray.shutdown()
            raise

    def _layout(self, workers: int | None) -> tuple[int, int, int, str]:
        """(workers, GPUs each, CPUs each, device): GPU workers when the cluster has GPUs and --device allows."""
        res = self.ray.cluster_resources()
        per = max(1, self.settings.n_devices)
        if res.get("GPU", 0) >= per and self.settings.device not in ("cpu", "mps"):
            n, gpus = workers or int(res["GPU"] // per), per
        else:
            n, gpus = workers or max(1, int(res.get("CPU", 1))), 0
        # An actor the cluster can never place waits forever, and so would the build: say so now. (Against the
        # cluster's totals: what is free lags behind workers just killed, and busy ones are only waited for.)
        if n * gpus > res.get("GPU", 0) or n > res.get("CPU", 0):
            raise SaeMcpError(f"{n} workers need {n} CPU(s){f' and {n * gpus} GPU(s)' if gpus else ''}, and the Ray "
                              f"cluster has {res.get('CPU', 0):g} CPU(s) and {res.get('GPU', 0):g} GPU(s); pass a "
                              "smaller --workers")
        return n, gpus, 1, "cuda" if gpus else "cpu"

    def __enter__(self) -> "RayIndexer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()
        if self._started:
            self.ray.shutdown()
            self._started = False

    def _describe(self, key: str | None) -> dict:
        """What every worker says of the index; they must agree (one corpus, model and SAE on every node)."""
        self.pool.revive()  # workers stopped by a cancelled build
        infos = self.pool.ask("describe", key)
        for other in infos[1:]:
            if other["meta"] != infos[0]["meta"] or other["path"] != infos[0]["path"]:
                diff = {k: (infos[0]["meta"].get(k), other["meta"].get(k)) for k in infos[0]["meta"]
                        if infos[0]["meta"].get(k) != other["meta"].get(k)}
                raise SaeMcpError(f"workers on {infos[0]['host']} and {other['host']} see different indexes "
                                  f"({diff or 'paths differ'}): every node needs the same model, SAE and corpus file")
        return {**infos[0], "batch_windows": min(i["batch_windows"] for i in infos)}

    def build_index(self, key: str | None, max_tokens: int, progress: Progress | None = None,
                    cancel: CancelToken | None = None, batch_windows: int | None = None) -> IndexReport:
        """The 'index' row over the first `max_tokens` corpus tokens, as ExampleSource.build_index builds it."""
        if max_tokens < 1:
            raise InvalidInput(f"--tokens {max_tokens}: scan at least one token")
        t0 = time.perf_counter()
        info = self._describe(key)
        index = IndexStore(Path(info["path"]), info["meta"])
        try:
            prev = index.load_scan(INDEX)
            base = prev if resumable(prev) else None
            if base is not None and (base.exhausted or base.tokens >= max_tokens):
                return self._report(info, base, reused=True, seconds=time.perf_counter() - t0, scanned=0)
            before = self._build(index, info, base, max_tokens, progress, cancel, batch_windows)
            row = index.load_scan(INDEX)
            assert row is not None  # _build saved it
            return self._report(info, row, reused=False, seconds=time.perf_counter() - t0, scanned=row.tokens - before)
        finally:
            index.close()

    def _build(self, index: IndexStore, info: dict, base: StoredScan | None, max_tokens: int,
               progress: Progress | None, cancel: CancelToken | None, batch_windows: int | None) -> int:
        """Walk, plan (or reuse) shards, scan them, merge. -> the tokens that were in rows before this run.
        batch_windows None: batch_for's, at most what every worker's memory allows."""
        start, done0 = (base.windows, base.tokens) if base is not None else (0, 0)
        # A cursor every buffer of one-window batches: shard boundaries for any batch size.
        walk = self.pool.ask("walk", info["key"], start, max_tokens - done0, info["buffer_batches"], slots=[0])[0]
        if done0 + walk.tokens == 0:
            raise InvalidInput(f"the corpus {info['corpus']} has no text to scan")
        n = self.shards or len(self.pool)
        batch_windows = batch_windows or batch_for(walk, n, info["batch_windows"])
        shards = reuse_shards(shard_rows(index), walk)
        if shards is None:
            index.conn.execute("DELETE FROM scans WHERE name LIKE ?", (SHARD_PREFIX + "%",))  # another plan's
            shards = plan_shards(walk.every(batch_windows), n)
        if len(shards) < min(n, len(self.pool)):
            log.warning("%d shard(s) for %d workers: with %d windows a batch a buffer is %d windows; a smaller "
                        "--batch-windows or a larger --tokens gives each worker one", len(shards), len(self.pool),
                        batch_windows, batch_windows * info["buffer_batches"])
        before = done0 + sum(s.tokens for s in shards)
        job = Chunk(key=info["key"], name="", cursor=walk.cursors[0], first=0, end=0, target=0,
                    batch_windows=batch_windows, seconds=self.checkpoint_s, fault=self.fault)
        sched = _Scheduler(self.ray, self.pool, index, job, walk, shards, self.max_retries)

        def report() -> None:
            if progress is not None:
                progress(min(done0 + sum(s.tokens for s in shards), max_tokens), max_tokens)

        try:
            sched.run(report, cancel)
        finally:
            self.retries += sched.retries
        merge_into_index(index, base, shards, walk, max_tokens)
        return before

    def _report(self, info: dict, row: StoredScan, reused: bool, seconds: float, scanned: int) -> IndexReport:
        return IndexReport(
            path=info["path"], corpus=info["corpus"], sae=info["key"], tokens_scanned=row.tokens,
            windows=row.windows, exhausted=row.exhausted, reused=reused, seconds=rounded(seconds, 2),
            tokens_per_second=rounded(scanned / seconds if seconds > 0 else 0.0, 1),
        )
