"""Corpus scan speed, as ratios measured side by side in one run (never absolute times: the box is shared).

1. Throughput: the full scan (forward to the SAE's layer, encode, per-feature top-k/density/histogram update
   and interval samples for ALL features, windows written to SQLite) versus a bare forward to the layer plus
   encode on the same batches, interleaved batch by batch. Goal: >= 0.9. The interval samples' own share of the
   scan's time is timed inside it (samples.fold_samples wrapped with a timer).
2. All features in one pass versus the tutorial's way for ONE feature: run_with_cache_with_saes over the full
   model, a pandas frame of every token of the batch, keep the rows where the feature fired.

Shapes: a gpt2-small-shaped random-weight model (config only, no download; random token ids) with a 24576-wide
SAE at blocks.7.hook_resid_pre, and the real stories260K model on its TinyStories corpus with a 4096-wide SAE.
The SAEs are random but made sparse like trained ones: b_enc is set so that ~64 features fire per token
(L0 ~ 64, as gpt2-small-res-jb), since the histogram's cost grows with the number of firing entries.

    python bench/bench_scan.py [--batches 4] [--skip-gpt2] [--device cuda --windows 256]

Measured on the shared 2-core dev box, 1 thread, CPU (python bench/bench_scan.py --batches 3):
    stories260K, SAE 64x4096:      scan / bare = 0.92;  tutorial for ONE feature = 1.6x our pass for ALL 4096
    gpt2-small shape, 768x24576:   scan / bare = 0.93 (0.97 in another run);  tutorial ONE = 2.3x our ALL 24576
    (first version, dense topk over dim 0 + masks: 0.39 and 0.81; the sparse sort path brought it to the above)
    a checkpoint of the whole 24576-feature state costs ~0.06 of a batch; it is written every 30 s.
With interval samples: 5 runs of the final code alternated with 5 of the code before them (same box, same
command; its load moves a single ratio by +-0.05, even above 1.0, so medians and ranges):
    stories260K:       scan / bare median 0.918 before (0.874..0.931), 0.933 after (0.893..0.985); the samples'
                       own share of the scan's time 0.021..0.025 (a cold state: 48k tokens never fill 4096 x 32 x 4
                       slots, so most entries enter; a long scan's warm state drops most before the sort)
    gpt2-small shape:  median 0.976 before (0.895..1.008), 0.946 after (0.922..0.966); samples 0.003..0.004
    the whole state's checkpoint grows from ~27 to ~65 MB at 24576 features: 0.12..0.16 of a batch, every 30 s.
    Gathers as index_select (6x faster than x[i] on this CPU), in the samples and in the top-K path, pay for most
    of the samples' cost (update_state on 6 synthetic stories-sized batches: 727 ms before, 750 ms after).
The CUDA path (bf16 autocast, batch from free memory) is written but unmeasured: no GPU was available.
The figures above predate issue 24 (the fast forward, the fused encode, the in-place state update); the bare side
now uses the scan's forward and encode buffer. bench/bench_index.py has the current figures, before and after.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import CORPUS, gpt2_model, sparse_random_sae, stories_engine

from sae_mcp.engine.corpus import Window, iter_windows, pad_windows, resolve_corpus
from sae_mcp.engine.loading import LoadedModel
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.index import state as state_module
from sae_mcp.index.scan import ScanRequest, autocast_for, encode_buffer, scan, windows_pad_id
from sae_mcp.index.store import IndexStore


def bare(engine: Engine, sae: LoadedSAE, batch: list[Window]) -> float:
    """Forward to the layer + encode, nothing else (the floor a scan can reach): the scan's forward and encode, into
    the scan's reused encode buffer on CPU (scan.encode_buffer), so a faster forward or encode raises both sides."""
    ids = pad_windows(batch, windows_pad_id(engine), bos=True)[0].to(engine.device)  # [B, T]
    buf = encode_buffer(engine, sae, ids.numel())
    t = time.perf_counter()
    # the same precision as the scan (bf16 autocast on CUDA), so the ratio compares like with like
    with engine.device_work(), torch.inference_mode(), autocast_for(engine):
        x = engine.forward_to_hook(ids, sae)
        acts = engine.encode(sae, x.reshape(-1, x.shape[-1]), out=buf)
        float(acts[0, 0])  # (a sync point on a GPU)
    return time.perf_counter() - t


def full_scan(engine: Engine, sae: LoadedSAE, batch: list[Window], store: IndexStore, state):
    t = time.perf_counter()
    request = ScanRequest(context_size=128, bos=True, max_tokens=10**12, batch_windows=len(batch))
    state = scan(engine, sae, batch, request, state=state,
                 on_batch=lambda ws, st, _: store.put_windows([(w.index, w.document, w.start, w.ids) for w in ws]))
    float(state.top_vals[0, 0])
    return time.perf_counter() - t, state


def tutorial_one_feature(engine: Engine, sae: LoadedSAE, batch: list[Window], feature: int, str_tok) -> float:
    """The 2024 tutorial's loop body for one feature: full forward with the SAE spliced in, a pandas frame of
    every token, keep what fired."""
    import pandas as pd

    ids = pad_windows(batch, windows_pad_id(engine), bos=True)[0].to(engine.device)  # [B, T]
    t = time.perf_counter()
    with torch.inference_mode():
        _, cache = engine.model.run_with_cache_with_saes(ids, saes=[sae.sae])
    acts = cache[f"{sae.hook_name}.hook_sae_acts_post"][..., feature]  # [B, T]
    rows = []
    for b in range(ids.shape[0]):
        toks = str_tok(ids[b])
        for p in range(ids.shape[1]):
            rows.append({"str_tokens": toks[p], "batch": b, "pos": p, "context": "".join(toks[max(0, p - 5): p + 1])})
    df = pd.DataFrame(rows)
    df["feature"] = acts.flatten().tolist()
    engine.model.reset_saes()
    kept = df[df["feature"] > 0]
    kept.sort_values("feature", ascending=False).head(10)
    return time.perf_counter() - t


class FoldTimer:
    """Wraps the state update's fold_samples (index/state.py) to time it (a sync before and after on CUDA, so it
    times only itself)."""

    def __init__(self, device: str):
        self.real, self.sync, self.seconds = state_module.fold_samples, device.startswith("cuda"), 0.0

    def __call__(self, *args) -> None:
        if self.sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        self.real(*args)
        if self.sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t


def measure(name: str, engine: Engine, sae: LoadedSAE, batches: list[list[Window]], str_tok) -> None:
    timer = state_module.fold_samples = FoldTimer(str(engine.device))
    try:
        _measure(name, engine, sae, batches, str_tok, timer)
    finally:
        state_module.fold_samples = timer.real


def _measure(name: str, engine: Engine, sae: LoadedSAE, batches: list[list[Window]], str_tok, timer) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = IndexStore(Path(d) / "bench.sqlite", {"bench": name})
        # Warm up both paths once (allocator, first-call costs).
        bare(engine, sae, batches[0])
        _, state = full_scan(engine, sae, batches[0], store, None)
        t_bare = t_scan = t_tut = 0.0
        n_tok = 0
        state = None
        timer.seconds = 0.0
        for b in batches:  # interleaved, so load changes on the shared box hit both alike
            t_bare += bare(engine, sae, b)
            dt, state = full_scan(engine, sae, b, store, state)
            t_scan += dt
            t_tut += tutorial_one_feature(engine, sae, b, 0, str_tok)
            n_tok += sum(len(w.ids) for w in b)
        t0 = time.perf_counter()
        store.save_scan(state.stored("bench", 1, None))
        t_ckpt = time.perf_counter() - t0
    print(f"\n== {name}: {len(batches)} batches x {len(batches[0])} windows, {n_tok} tokens, d_sae {sae.d_sae}")
    print(f"scan throughput / bare forward+encode throughput:  {t_bare / t_scan:.3f}   (goal >= 0.9)")
    print(f"  of the scan's time, the interval samples (fold_samples, a cold state: most entries enter) took "
          f"{timer.seconds / t_scan:.3f}")
    print(f"tutorial loop, ONE feature / our pass, ALL {sae.d_sae} features:  {t_tut / t_scan:.2f}x the time")
    print(f"  -> all features the tutorial's way would take ~{t_tut * sae.d_sae / t_scan:,.0f}x our one pass")
    print(f"one checkpoint of the whole state ({sae.d_sae} features) costs {t_ckpt / (t_scan / len(batches)):.2f} "
          f"batches' time (written every 30 s)")


def gpt2_shaped(n_batches: int, windows: int, device: str) -> None:
    model = gpt2_model(device)
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(n_batches + 1):
        ws = []
        for i in range(windows):
            n = b * windows + i
            ws.append(Window(n, n, 0, [50256] + torch.randint(0, 50257, (127,), generator=g).tolist()))
        batches.append(ws)
    calib = torch.tensor([w.ids for w in batches[0][:2]], device=device)
    sae = sparse_random_sae(model, "blocks.7.hook_resid_pre", 7, 24576, calib)
    engine = Engine(LoadedModel(model, "gpt2-shaped", "random", "generated"), [sae], device)
    # No tokenizer offline: the tutorial frame gets token ids as strings (cheaper than decoding: favours it).
    measure("gpt2-small shape (random weights), SAE 768x24576 at blocks.7.hook_resid_pre", engine, sae, batches[1:],
            lambda row: [str(int(t)) for t in row])


def stories(n_batches: int, windows: int, device: str) -> None:
    engine, sae = stories_engine(device)
    model = engine.model
    it = iter_windows(resolve_corpus(str(CORPUS)), model.tokenizer, 128, 1)
    batches = [[next(it) for _ in range(windows)] for _ in range(n_batches + 1)]
    measure("stories260K (real), SAE 64x4096 at blocks.2.hook_resid_pre, TinyStories", engine, sae, batches[1:],
            model.to_str_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the scan then runs under bf16 autocast)")
    ap.add_argument("--windows", type=int, default=None,
                    help="windows per batch (default: 64 for stories, 8 for the gpt2 shape on CPU; try 256+ on a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {where}")
    stories(args.batches * 2, args.windows or 64, args.device)
    if not args.skip_gpt2:
        gpt2_shaped(args.batches, args.windows or 8, args.device)


if __name__ == "__main__":
    main()
