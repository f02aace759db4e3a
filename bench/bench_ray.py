"""`sae-mcp index --ray` on this box: 2 CPU workers against 1 (one torch thread each), and the merge's cost.

What is timed: RayIndexer.build_index as `sae-mcp index --ray --workers N` runs it, from an empty data dir:
describe, the walk (worker 0 tokenizes the budget's documents to find shard boundaries), the shards' scans in
chunks of --checkpoint-seconds (each checkpointed into SQLite by the driver), and the final merge into the 'index'
row. Not timed: starting the cluster and the workers (model loads), paid once per command. Runs are interleaved and
the best of --repeats taken (a shared box moves single runs by +-10%). Also: one process without Ray (the floor
a worker has to match), the walk alone, and merge_states on full states of a 4096- and a 24576-feature SAE.

Shape: the real stories260K model with a random 4096-wide SAE calibrated to L0 ~64 (common.stories_engine),
saved as a SAELens folder so that the workers load it from Settings like any SAE; the TinyStories corpus.

    python bench/bench_ray.py [--tokens 200000] [--repeats 2] [--batch 8] [--checkpoint-seconds 30]

Printed per batch size (a fixed one, and the one each build picks: fewer windows a batch for 2 workers, so
that each gets whole buffers): 1 and 2 workers' throughput and their ratio, and tokens per worker CPU second.

How it scales on N GPUs (one worker each): each worker scans its own range of windows, so the scan part is
N times faster; what does not shrink with N is
  - the walk: one worker tokenizes the whole budget once, on one CPU core (measured below, in tokens/s);
    TOKENIZERS_PARALLELISM=true lets a fast tokenizer use the node's cores for it;
  - the driver's writes: every chunk, its windows (4 bytes a token) and the shard's state (~2.7 kB a feature:
    66 MB for 24576 features) go into SQLite, one chunk per --checkpoint-seconds per worker (8 workers at 30 s
    on a 24576-feature SAE: ~18 MB/s, well within a local disk);
  - the merge: (shards + 1) x features x the per-feature cost below, once per build;
  - balance: shards are runs of whole buffers (32 batches), so the batch size is lowered when needed for each
    worker to get a fair share (index_shards.batch_for; the fullest shard within ~10-20% of the mean).
So the speed-up is N * scan / (scan + walk + merge + write) with scan the single-GPU scan time; with the walk at
the rate below and the scan of a gpt2-small-sized SAE at a few hundred thousand tokens/s per GPU, the walk is
the first limit, at roughly (walk rate / scan rate per GPU) GPUs.

Measured on the shared 2-core dev box (CPU), stories260K with a 4096-feature SAE, one thread per worker, 200k tokens
(`python bench/bench_ray.py --tokens 100000`): 2 workers ran 1.48-1.49x the throughput of 1 (14.6-15.2k tokens/s
alone), at 0.83-0.94 of one worker's tokens per CPU second: the rest of the 2x is the driver and other processes
sharing the two cores. The walk ran at ~1.4M tokens/s on one core; the merge costs ~20 us a feature per shard.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from common import CORPUS, STORIES_HF, stories_engine

from sae_mcp.index.merge import merge_states
from sae_mcp.index.samples import MAX_POS, SAMPLE_BINS, SAMPLES_PER_BIN
from sae_mcp.index.scan import KEEP
from sae_mcp.index.state import HIST_BINS, ScanState
from sae_mcp.settings import Settings


def saved_sae(folder: Path) -> Path:
    """The bench SAE (random, L0 ~64 on TinyStories) as a SAELens folder the workers can load."""
    _, sae = stories_engine("cpu")
    sae.sae.save_model(str(folder))
    return folder


def single_process(settings: Settings, tokens: int, batch: int | None) -> float:
    """tokens/s of ExampleSource.build_index in this process (1 thread): the floor one worker has to match."""
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.index.source import ExampleSource

    src = ExampleSource(Engine.from_settings(settings), settings)
    t = time.perf_counter()
    rep = src.build_index(None, tokens, batch_windows=batch)
    return rep.tokens_scanned / (time.perf_counter() - t)


def ray_build(indexer, tokens: int, batch: int | None) -> tuple[float, float, int]:
    """(wall seconds, the workers' CPU seconds, tokens) of one build from nothing; the index file is removed
    afterwards (the workers name it, so a fresh data dir would not do)."""
    cpu = indexer.pool.ask("cpu_seconds")
    t = time.perf_counter()
    rep = indexer.build_index(None, tokens, batch_windows=batch)
    seconds = time.perf_counter() - t
    cpu = sum(indexer.pool.ask("cpu_seconds")) - sum(cpu)
    assert not rep.reused
    for suffix in ("", "-wal", "-shm"):
        Path(rep.path + suffix).unlink(missing_ok=True)
    return seconds, cpu, rep.tokens_scanned


def compare(indexers: dict, tokens: int, batches: tuple, repeats: int) -> None:
    """1 vs 2 workers at each batch size (None: what the build picks, index_shards.batch_for), interleaved,
    best of `repeats`: wall throughput, and tokens per worker CPU second (which others' load does not change)."""
    best = {(n, b): (float("inf"), float("inf")) for n in indexers for b in batches}
    for _ in range(repeats):
        for b in batches:
            for n, ix in indexers.items():
                seconds, cpu, done = ray_build(ix, tokens, b)
                best[n, b] = (min(best[n, b][0], seconds), min(best[n, b][1], cpu))
    for b in batches:
        (w1, c1), (w2, c2) = best[1, b], best[2, b]
        what = f"--batch-windows {b}" if b else "batch size picked per build (the user path)"
        print(f"{what}: 1 worker {done / w1:,.0f} tokens/s, 2 workers {done / w2:,.0f} tokens/s: {w1 / w2:.2f}x; "
              f"tokens per worker CPU second {done / c1:,.0f} and {done / c2:,.0f} ({c1 / c2:.2f})")


def merge_cost(n_features: int, repeats: int = 3) -> float:
    """Microseconds a feature for merge_states of two full states (every top-K slot and sample slot used)."""

    def full(seed: int) -> ScanState:
        g = torch.Generator().manual_seed(seed)
        st = ScanState.empty(n_features, KEEP, "cpu")
        st.top_vals = torch.rand(KEEP, n_features, generator=g).sort(0, descending=True).values
        st.top_pos = torch.randint(0, MAX_POS, (KEEP, n_features), generator=g)
        st.n_fired = torch.randint(0, 1000, (n_features,), generator=g)
        st.hist = torch.randint(0, 100, (n_features, HIST_BINS), generator=g)
        shape = (n_features, SAMPLE_BINS, SAMPLES_PER_BIN)
        st.samp_pos = torch.randint(0, MAX_POS, shape, generator=g)
        st.samp_vals = torch.rand(shape, generator=g)
        return st

    a, b = full(0), full(1)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        merge_states(a, b)
        best = min(best, time.perf_counter() - t)
    return best / n_features * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--checkpoint-seconds", type=float, default=30.0)
    ap.add_argument("--batch", type=int, default=8, help="the fixed batch size compared besides the picked one")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import ray

    from sae_mcp.index.ray_driver import RayIndexer

    print(f"torch {torch.__version__}, ray {ray.__version__}, {os.cpu_count()} CPU(s), 1 thread per worker; "
          f"load average at start {os.getloadavg()[0]:.2f} (other processes share these cores)")
    folder = saved_sae(Path(tempfile.mkdtemp(prefix="bench-ray-sae-")))
    settings = Settings(model=str(STORIES_HF), saes=(str(folder),), corpus=str(CORPUS), device="cpu",
                        data_dir=Path(tempfile.mkdtemp(prefix="bench-ray-")))
    for b in (args.batch, None):
        one = settings.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="bench-1p-"))})
        print(f"one process, no Ray, batch {b or 'from memory'}: {single_process(one, args.tokens, b):,.0f} tokens/s")
    # 3 logical CPUs for the 1-worker and the 2-worker indexers' 3 actors, alive together so that their runs can be
    # interleaved; only one indexer scans at a time, so at most 2 threads compute.
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING)
    indexers = {n: RayIndexer(settings, workers=n, checkpoint_s=args.checkpoint_seconds) for n in (1, 2)}
    compare(indexers, args.tokens, (args.batch, None), args.repeats)
    t = time.perf_counter()
    w = indexers[1].pool.ask("walk", indexers[1].keys[0], 0, args.tokens, 32, slots=[0])[0]
    print(f"walk alone (worker 0, 1 core): {w.tokens / (time.perf_counter() - t):,.0f} tokens/s")
    for ix in indexers.values():
        ix.close()
    ray.shutdown()
    for f in (4096, 24576):
        print(f"merge_states, {f} features (K={KEEP}): {merge_cost(f):.2f} us a feature")


if __name__ == "__main__":
    main()
