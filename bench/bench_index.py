"""The index build as users run it, against the floor: ratios measured side by side in one run.

user path   ExampleSource.build_index over a real corpus (TinyStories): documents read and tokenized, windows
            cut, batched (longest first within a buffer), forward to the SAE's layer, encode, the per-feature
            state updated, windows and checkpoints written to SQLite. What `sae-mcp index` and the build_index tool
            run.
bare        a forward to the layer + encode of exactly the same windows, batched by length (the least padding
            any batching can have), nothing else: the floor the user path can reach. The same forward and encode
            as the user path (Engine.forward_to_hook, Engine.encode into the scan's encode buffer), so a faster
            forward or encode raises both sides.

Both are measured at two token budgets and compared on the difference (marginal throughput), so start-up costs
(opening the index file, the first batch's allocations) cancel: the best of --repeats runs of each budget, the runs
interleaved, since a shared box moves single runs by +-10-30%. Beside the wall clock, the same per CPU second of
this process (steadier on a shared CPU box; meaningless on a GPU). --variants measures issue 24's changes switched
on one at a time (before, +encode, +update, +forward, after) in the same interleaved run; --profile times and
profiles three batches of the user path (forward, encode + firing entries, update) after a warm-up scan. Also
printed: the share of the forward's token slots that are padding, in corpus order (how scans batched before) and
bucketed by length (now).

Shapes: the real stories260K model with a 4096-wide SAE, and a gpt2-small-shaped random model (12 layers,
d_model 768, vocab 50257) with a 24576-wide SAE at blocks.7.hook_resid_pre, fed the same corpus through the
stories tokenizer (its 512 ids are valid gpt2-shape ids; the random model does not care what they mean, and the
corpus gives the real distribution of window lengths). Both SAEs are random but calibrated to L0 ~64.

    python bench/bench_index.py [--tokens 20000] [--repeats 2] [--skip-gpt2] [--variants before,after] [--profile]
    python bench/bench_index.py --device cuda --tokens 1000000 --corpus-repeat 10 [--fp32] [--gpu-extras]   (GPU)

Issue 24 (the index at GPU speed), 2026-12-06. The GPU figure is still open this round: no GPU was lent to this
session. The one command that gives it, on one H100 or H200 (the user path, the bare forward + encode, their ratio,
before and after issue 24's changes, and a profile of three batches; a few minutes):

    python bench/bench_index.py --device cuda --tokens 1000000 --corpus-repeat 10 --skip-stories \
        --variants before,+forward,after --profile

The lent GPU machines reach no package index and lack transformer-lens, sae-lens and pydantic: bench/gpu_wheels.sh
downloads them here as wheels (~44 MB, into .whl/) and gives the command that installs them there and runs this.

What changed: the forward to a residual-stream hook runs transformer-lens' modules with fused SDPA attention
(engine/fast_forward.py), the SAE encode is computed in place in the scan's precision, into a reused buffer on CPU
(engine/fast_encode.py), and the state update is written in place, merging only the features that have an entry
at or above their K-th kept value (state.update_state); those three are variant +forward. Variant after adds the
second round: the firing entries found inside the encode (index/firing.py), a cache-sized block of rows at a time,
by numpy. CPU figures, the shared 2-core dev box, 1 thread, torch 2.13, wall clock (per CPU second within 1-2% of
it):

    python bench/bench_index.py --tokens 60000 --repeats 3 --skip-gpt2 --variants before,+encode,+update,+forward
    stories260K, SAE 64x4096          user path     bare fwd+encode   user / bare
    before                            15.7k tok/s   17.8k tok/s       0.88
    +forward                          38.8k         58.3k             0.67
    (another run, best of differences: before 13.9k / 18.1k 0.77, +forward 39.7k / 57.8k 0.69)

    python bench/bench_index.py --tokens 4000 --repeats 3 --skip-stories --variants before,+encode,+update,+forward
    gpt2-small shape, SAE 768x24576   user path     bare fwd+encode   user / bare
    before                            520 tok/s     547 tok/s         0.95
    +forward                          610           596               1.02 (another run: 0.94 before, 0.99 after)

    The second round, side by side (--variants +forward,after; two runs of stories, one of gpt2):
    stories260K                       user path     bare fwd+encode   user / bare
    +forward                          37.1k, 39.2k  57.3k, 58.5k      0.65, 0.67
    after                             44.2k, 46.7k  62.2k, 62.3k      0.71, 0.75
    gpt2-small shape                  598 tok/s     609 tok/s         0.98 (+forward 611 / 611, 1.00: noise)

The intermediate variants moved by more than their differences between runs (the box is shared), so each change's
own share was measured apart, old and new interleaved on the same batches (best of 3; the old update is
update_before below, the old encode sae-lens' own, the old forward transformer-lens' stopped at the layer):

    per batch                 stories260K (8128 tokens x 4096)     gpt2 shape (1270 tokens x 24576)
    encode                    239 -> 65 ms (in place: 117 ms;      723 -> 548 ms
                              the reused buffer: 65 ms)
    state update, warm        61 -> 59 ms                          100 -> 30 ms
    forward to the hook       302 -> 70 ms (4.35x)                 1774 -> 1572 ms (1.13x; matmul-bound on CPU)
                              (bench/bench_fast_forward.py: the other ways in measured there did not pay)

So on stories260K the first round made the user path ~2.5x faster, but the bare forward + encode ~3.3x, and the
ratio fell: the tiny model's forward costs about as much as its 4096-wide SAE's encode, and the update (~60 ms a
batch) was 40% of a batch, half of it finding the ~460k firing entries among 33M activations (torch nonzero).
The second round finds them inside the encode while each block is in cache, and trims the update (shifts for
int64 division, the merge ranks keys alone, candidates cut to the rows used): --profile, 3 warm batches of 64
windows after 60k tokens: forward 72 ms, encode + firing entries 72 (the encode alone 56), update 24 (was ~33).
What is left of the gap at this shape is reading 33M activations once (~16 ms: numpy's compare and flatnonzero,
~0.5 ns an entry) and ~40 torch ops over ~460k entries (~24 ms), against a bare batch of ~128 ms; 0.9 there needs
a native kernel that compares, compacts and counts in one pass (not in torch's op set). At the gpt2 shape the CPU is
bound by the matrix products (forward 74%, encode 24%, update 2%) and the user path is at the bare.

--gpu-extras also times feature_stats and token_set_enrichment at the gpt2 shape (a 50257-token synthetic
vocabulary) and compares bf16-autocast top examples with fp32 ones on the same windows.
Measured 2026-11-30 on one NVIDIA H200, before issue 24 (torch 2.11 cu130; --tokens 1000000 --corpus-repeat 10, so
the marginal is 2.0M corpus tokens; batch from free memory: 681-725 windows at the gpt2 shape, peak 25-27 GiB
allocated):

    gpt2 shape, 24576 features      user path    bare fwd+encode   ratio
    fp32 (--fp32)                   178k tok/s   213k tok/s        0.83
    bf16 autocast (the default)     386-407k     516-527k          0.73-0.79 (0.79 with the read-ahead thread)
    bf16 weights (--model-dtype)    424k         662k              0.64
    stories260K (tiny model)        889k-1.13M   2.5-3.0M          0.36-0.38 (CPU-bound: reading, tokenizing)

    feature_stats, 24576 x 50257: 0.076 s; token_set_enrichment, every built-in set: 0.65-0.69 s
    bf16 autocast vs fp32, same 3581 windows, 15105 firing features: top-1 window equal for 94.5%, top-10 as sets
    70%; values at equal ranks differ by a median 1.8e-3 (p99 4.5e-2) of the feature's fp32 max; where the top-1
    differs, bf16's choice is a near-tie (median 1.4e-2 of the max below it in fp32). The random SAE's top
    activations crowd near its threshold, so its ties are closer than a trained SAE's.

The 1.3M tokens/s goal was not met on 2026-11-30 (before issue 24's changes): a profile of one 87k-token batch (bf16
autocast) spent 149 ms on the GPU, of which the matrix products were ~25 ms; the rest is elementwise work in
transformer-lens' forward (residual adds, gelu_new, casts between fp32 and bf16: aten::add 20%, copy_ 19%, mul 13%)
and the SAE's fp32 bias and ReLU over [87k, 24576]. The user path's gap to bare was the per-batch state update
(top-k merge, histogram) on the device. Issue 24's changes go at each of these; their GPU figure is open (above).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CORPUS, corpus_windows, gpt2_engine, stories_engine

from sae_mcp.engine import fast_encode, fast_forward
from sae_mcp.engine.corpus import pad_windows
from sae_mcp.engine.runtime import Engine
from sae_mcp.engine.saes import LoadedSAE
from sae_mcp.engine.stats import LogitWeightStats
from sae_mcp.index import scan as scan_mod
from sae_mcp.index import state as state_mod
from sae_mcp.index.samples import at, fold_samples
from sae_mcp.index.scan import (
    BUFFER_BATCHES,
    autocast_for,
    batch_windows_for,
    compute_dtype,
    encode_buffer,
    windows_pad_id,
)
from sae_mcp.index.source import ExampleSource
from sae_mcp.index.state import (
    HIST_BINS,
    HIST_LO,
    HIST_PER_DECADE,
    ScanState,
    _dense_candidates,
    _key,
    update_state,
)
from sae_mcp.settings import Settings


def padding_share(windows: list, batch: int, bucketed: bool) -> float:
    """Padded token slots / all token slots of the forward, batching in corpus order or by length in buffers."""
    padded = total = 0
    step = batch * BUFFER_BATCHES if bucketed else batch
    for b0 in range(0, len(windows), step):
        chunk = windows[b0 : b0 + step]
        if bucketed:
            chunk = sorted(chunk, key=lambda w: -len(w.ids))
        for i in range(0, len(chunk), batch):
            lens = [len(w.ids) for w in chunk[i : i + batch]]
            total += max(lens) * len(lens)
            padded += max(lens) * len(lens) - sum(lens)
    return padded / max(total, 1)


def clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): CPU seconds count only this process's work (its threads: the
    read-ahead tokenizer's too), so on a shared CPU box they move less with the other processes' load than the wall
    clock does; on a GPU the wall clock is the measure."""
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def bare(engine: Engine, sae: LoadedSAE, windows: list, batch: int) -> tuple[float, float]:
    """Forward to the layer + encode of the windows, sorted by length, nothing else (synced) -> seconds. The same
    forward and encode as the scan (Engine.forward_to_hook, Engine.encode into the scan's encode_buffer), so a
    faster forward or encode raises both sides."""
    ordered = sorted(windows, key=lambda w: -len(w.ids))
    buf = encode_buffer(engine, sae, batch * 128)
    t = clock()
    for i in range(0, len(ordered), batch):
        ids, valid = pad_windows(ordered[i : i + batch], windows_pad_id(engine), bos=True)
        with engine.device_work(), torch.inference_mode(), autocast_for(engine):
            x = engine.forward_to_hook(ids.to(engine.device), sae)
            acts = engine.encode(sae, x.reshape(-1, x.shape[-1])[valid.reshape(-1).to(engine.device)], out=buf)
            float(acts[0, 0])  # a sync point on a GPU
    return since(t)


def user(engine: Engine, sae: LoadedSAE, tokens: int, batch: int, corpus: Path) -> tuple[float, float]:
    """ExampleSource.build_index from an empty data dir -> (wall, CPU) seconds."""
    with tempfile.TemporaryDirectory() as d:
        source = ExampleSource(engine, Settings(corpus=str(corpus), data_dir=Path(d)))
        t = clock()
        source.build_index(sae.key, tokens, batch_windows=batch)
        return since(t)


# Issue 24's changes, switched on one more at a time, to measure each side by side in one run. "+forward" is where
# the first round of them ended (2026-12-06, the figures above); "after" adds the second (firing entries).
VARIANTS = {"before": set(), "+encode": {"encode"}, "+update": {"encode", "update"},
            "+forward": {"encode", "update", "forward"}, "after": {"encode", "update", "forward", "firing"}}


@contextlib.contextmanager
def changes(on: set[str]):
    """Run with only the `on` changes of issue 24: encode (fast_encode's in-place encode and the scan's reused
    buffer), update (the state updated in place, only the features with a candidate merged), forward
    (fast_forward's fused attention), firing (the firing entries found inside the encode, a cache-sized block of
    rows at a time, by numpy: index/firing.py); the others as they were before it (update_before for the update,
    wordwise_firing after the encode in one block for the firing entries)."""
    saved = (fast_encode._kind, fast_forward.supported, scan_mod.update_state, scan_mod.encode_firing,
             fast_encode.BLOCK_BYTES, state_mod.firing_entries)
    if "encode" not in on:
        fast_encode._kind = lambda sae: None  # sae-lens' encode, no buffer (encode_buffer asks can_fuse)
    if "forward" not in on:
        fast_forward.supported = lambda model, hook_name: False  # transformer-lens' forward, stopped at the layer
    if "update" not in on:
        scan_mod.update_state = update_before
    if "firing" not in on:
        fast_encode.BLOCK_BYTES = 0  # every W_enc is "too large": the encode in one block (the bare side's too)
        scan_mod.encode_firing = encode_then_find
        state_mod.firing_entries = wordwise_firing
    try:
        yield
    finally:
        (fast_encode._kind, fast_forward.supported, scan_mod.update_state, scan_mod.encode_firing,
         fast_encode.BLOCK_BYTES, state_mod.firing_entries) = saved


def encode_then_find(engine: Engine, sae: LoadedSAE, x: torch.Tensor, buf, fidx):
    """scan.encode_firing as it was before the firing change: the encode alone, update_state finds the entries."""
    acts = engine.encode(sae, x, out=buf)
    return (acts if fidx is None else acts[:, fidx]), None


def wordwise_firing(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The firing entries as found before the firing change (commit d7e4c17): torch.nonzero over int64 words of
    two fp32 (or four 16-bit) floats, then the words with a set bit float by float; the values gathered after."""
    x = acts.reshape(-1)
    per = 8 // x.element_size()
    if x.element_size() not in (2, 4) or x.numel() % per:
        flat = (x > 0).nonzero().squeeze(1)
    else:
        words = x.view(torch.int64).nonzero().squeeze(1)
        ints = x.view(torch.int32 if per == 2 else torch.int16).view(-1, per)
        hit = (at(ints, words) > 0).nonzero()
        flat = at(words, hit[:, 0]) * per + hit[:, 1]
    return flat, at(x, flat)


def update_before(state: ScanState, acts: torch.Tensor, pos: torch.Tensor, firing=None) -> ScanState:
    """scan.update_state as it was before issue 24 (commit ae9cdae), for the side-by-side figures: new histogram
    and count tensors each batch, and every feature's [2K, F] top-K merged, the batch's candidates laid out dense."""
    n, f = acts.shape
    k = state.top_vals.shape[0]
    flat, vals = state_mod.firing_entries(acts)
    rows, cols = flat // f, flat % f
    b = ((vals.float().log10() - HIST_LO) * HIST_PER_DECADE).floor().clamp_(0, HIST_BINS - 1).long()
    cells = cols * HIST_BINS + b
    hist = state.hist + torch.bincount(cells, minlength=f * HIST_BINS).view(f, HIST_BINS)
    n_fired = state.n_fired + torch.bincount(cols, minlength=f)
    if flat.numel() * 8 <= n * f:
        c_in = (vals.float() >= at(state.top_vals[-1], cols)).nonzero().squeeze(1)
        r, c, v = at(rows, c_in), at(cols, c_in), at(vals, c_in)
        o1 = _key(v, at(pos, r)).argsort(descending=True)
        order = at(o1, at(c, o1).argsort(stable=True))
        n_c = torch.bincount(c, minlength=f)
        rank = torch.arange(c.numel(), device=acts.device) - at(torch.cumsum(n_c, 0) - n_c, at(c, order))
        sel = (rank < k).nonzero().squeeze(1)
        cell = at(rank, sel) * f + at(at(c, order), sel)
        cand_v = torch.zeros(k * f, device=acts.device).index_copy_(0, cell, at(at(v, order), sel).float())
        cand_p = torch.full((k * f,), scan_mod.MAX_POS, device=acts.device)
        cand_v, cand_p = cand_v.view(k, f), cand_p.index_copy_(0, cell, at(pos, at(at(r, order), sel))).view(k, f)
    else:
        cand_v, cand_p = _dense_candidates(acts, pos, k)
    all_v, all_p = torch.cat([state.top_vals, cand_v]), torch.cat([state.top_pos, cand_p])
    keep = _key(all_v, all_p).topk(k, dim=0).indices
    fold_samples(state.samp_pos, state.samp_vals, rows, cells, vals, pos)
    return ScanState(top_vals=all_v.gather(0, keep), top_pos=all_p.gather(0, keep), n_fired=n_fired, hist=hist,
                     samp_pos=state.samp_pos, samp_vals=state.samp_vals, tokens=state.tokens, windows=state.windows,
                     exhausted=state.exhausted)


def measure(name: str, engine: Engine, sae: LoadedSAE, tokens: int, batch: int, repeats: int, corpus: Path,
            variants: list[str]) -> None:
    tok = engine.model.tokenizer
    small, large = corpus_windows(tok, tokens, corpus), corpus_windows(tok, 3 * tokens, corpus)
    n_small, n_large = (sum(len(w.ids) - 1 for w in ws) for ws in (small, large))
    with changes(VARIANTS[variants[-1]]):
        user(engine, sae, tokens // 4, batch, corpus)  # warm-up: allocator, first-call costs
    # The best (least disturbed) of --repeats runs of each budget, then the difference of the bests: steadier on a
    # shared box than the best of the runs' differences (one disturbed run of the small budget inflates those).
    best = {(v, side, m): [float("inf")] * 2 for v in variants for side in ("user", "bare") for m in (1, 3)}
    for _ in range(repeats):  # interleaved, so load changes on a shared box hit every variant and side alike
        for v in variants:
            with changes(VARIANTS[v]):
                runs = {("user", m): user(engine, sae, m * tokens, batch, corpus) for m in (3, 1)}
                runs |= {("bare", m): bare(engine, sae, ws, batch) for m, ws in ((3, large), (1, small))}
            for (side, m), (w, c) in runs.items():
                b = best[v, side, m]
                best[v, side, m] = [min(b[0], w), min(b[1], c)]
    best = {(v, side): [best[v, side, 3][i] - best[v, side, 1][i] for i in (0, 1)]
            for v in variants for side in ("user", "bare")}
    n = n_large - n_small
    print(f"\n== {name}: marginal {n:,} corpus tokens, batches of {batch} windows")
    print(f"padding share of the forward's token slots: corpus order {padding_share(large, batch, False):.3f}, "
          f"bucketed by length {padding_share(large, batch, True):.3f}")
    print("variant    user path tok/s   bare fwd+encode tok/s   user / bare    (per CPU second: user, bare, ratio)"
          "   goal >= 0.9")
    for v in variants:
        (uw, uc), (bw, bc) = best[v, "user"], best[v, "bare"]
        print(f"{v:8s} {n / uw:>13,.0f} {n / bw:>17,.0f} {bw / uw:>15.3f}        "
              f"({n / uc:,.0f}, {n / bc:,.0f}, {bc / uc:.3f})")


def profile_batch(engine: Engine, sae: LoadedSAE, corpus: Path, batch: int, warm_tokens: int, n: int = 3,
                  rows: int = 12) -> None:
    """The user path's work on n batches after a scan of warm_tokens (the state as warm as at the start of the
    measured marginal), timed part by part (synced) and profiled: where the device's time goes (CUDA) or the
    CPU's. Also the documents read and tokenized a batch (the scan does that on its read-ahead thread)."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    ws = corpus_windows(engine.model.tokenizer, warm_tokens + 128 * batch * 2 * n, corpus)
    read = (time.perf_counter() - t) * batch / len(ws)
    request = scan_mod.ScanRequest(context_size=128, bos=True, max_tokens=warm_tokens)
    state = scan_mod.scan(engine, sae, iter(ws), request)
    rest = sorted(ws[state.windows :], key=lambda w: -len(w.ids))  # the next windows, longest first
    cuda = str(engine.device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    buf = encode_buffer(engine, sae, batch * 128)
    if buf is not None:
        buf.zero_()  # its pages faulted in now, as a scan's are after its first batch
    parts: dict[str, float] = {}

    def step(b: list) -> None:
        ids, valid = pad_windows(b, windows_pad_id(engine), bos=True)
        pos = (torch.tensor([w.index * 128 for w in b])[:, None] + torch.arange(ids.shape[1])).reshape(-1)
        ids, keep = ids.to(engine.device), valid.reshape(-1).nonzero().squeeze(1).to(engine.device)
        with torch.inference_mode(), autocast_for(engine):
            for part, fn in (("forward", lambda: engine.forward_to_hook(ids, sae)),
                             ("encode + firing", lambda: scan_mod.encode_firing(
                                 engine, sae, x.reshape(-1, x.shape[-1])[keep], buf, None)),
                             ("update", lambda: update_state(state, acts, pos[keep].to(engine.device), firing))):
                sync()
                t = time.perf_counter()
                out = fn()
                sync()
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - t
                if part == "forward":
                    x = out
                elif part == "encode + firing":
                    acts, firing = out

    for i in range(n):  # timed without the profiler (its per-op cost inflates the blocked encode's many ops)
        step(rest[i * batch : (i + 1) * batch])
    print(f"\n-- {n} batches of {batch} windows after {state.tokens:,} tokens, ms a batch: " + ", ".join(
        f"{k} {v * 1000 / n:.1f}" for k, v in parts.items()) + f"; read + tokenize {read * 1000:.1f} (read-ahead)")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(n, 2 * n):
            step(rest[i * batch : (i + 1) * batch])
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=rows, max_name_column_width=40))


def repeated_corpus(k: int) -> Path:
    """The TinyStories corpus k times over as one JSONL file (a GPU scans the 384k-token original in well under a
    second, too short to time); identical documents are fine for throughput."""
    if k <= 1:
        return CORPUS
    out = Path(tempfile.mkdtemp(prefix="bench-corpus-")) / f"tinystories_x{k}.jsonl"
    text = CORPUS.read_text(encoding="utf-8")
    out.write_text(text * k if text.endswith("\n") else (text + "\n") * k, encoding="utf-8")
    return out


def full_precision(on: bool) -> None:
    """--fp32: the scan computes in fp32 on CUDA too (by default it autocasts fp32 weights to bf16 there)."""
    if on:
        scan_mod._autocast_dtype = lambda engine: None


# ------------------------------------------------------------------------------------------------ --gpu-extras
# At gpt2-small shapes (24576 x 50257 logit weights): feature_stats and token_set_enrichment over every feature
# (goal on an H200: < 2 s each, warm), and the bf16-autocast scan against the fp32 scan of the same windows: do the
# top examples agree, and to what tolerance?


def synthetic_vocab_tokenizer(n: int = 50257):
    """A word-level tokenizer of n tokens with text, standing in for GPT-2's (which needs the hub): some digit,
    capitalised and punctuation tokens, so that every built-in token set exists."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<s>"] + [(" " if i % 3 else "") + (str(i) if i % 7 == 0 else ("W" if i % 11 == 0 else "w") + str(i))
                       for i in range(1, n - 1)] + ["."]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # transformer-lens reloads a tokenizer by its name_or_path (to add BOS handling), which a tokenizer built in
    # memory lacks (KeyError 'name_or_path'): save it to a folder and load it from there.
    folder = tempfile.mkdtemp(prefix="synthetic-vocab-")
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<s>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` calls after one warm-up call (synced)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bf16_vs_fp32(engine, sae, windows) -> None:
    """The same windows scanned under bf16 autocast and in fp32: top-1 agreement and the value tolerance."""
    states = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        real = scan_mod._autocast_dtype
        scan_mod._autocast_dtype = (lambda e: dtype) if dtype is None else real
        try:
            request = scan_mod.ScanRequest(context_size=128, bos=True, max_tokens=10**12)
            states[name] = scan_mod.scan(engine, sae, windows, request)
        finally:
            scan_mod._autocast_dtype = real
    a, b = (states[n].top_vals.float().cpu().numpy() for n in ("bf16", "fp32"))  # [k, d_sae], rank-major
    pa, pb = (states[n].top_pos.cpu().numpy() for n in ("bf16", "fp32"))
    fired = np.nonzero(b[0] > 0)[0]
    scale = b[0, fired]  # each feature's fp32 max: the tolerance is relative to it
    rel = np.abs(a[:, fired] - b[:, fired]) / scale  # [k, n_fired] value gap at equal ranks
    top1 = pa[0, fired] == pb[0, fired]
    # Where the top-1 window differs: how far below the fp32 max is bf16's choice, in fp32? (a near-tie or not)
    gaps = []
    for j in np.nonzero(~top1)[0]:
        f = fired[j]
        hit = np.nonzero(pb[:, f] == pa[0, f])[0]
        gaps.append((b[0, f] - b[hit[0], f]) / b[0, f] if len(hit) else np.inf)
    gaps = np.array(gaps)
    print(f"bf16 vs fp32 on {len(windows)} windows, {len(fired)} firing features: top-1 window equal for "
          f"{top1.mean():.4f}; top-10 windows equal as sets for "
          f"{np.mean([set(pa[:10, f]) == set(pb[:10, f]) for f in fired]):.4f}")
    print(f"  values at equal ranks, |bf16 - fp32| / the feature's fp32 max: median {np.median(rel):.2e}, "
          f"p99 {np.quantile(rel, 0.99):.2e}, max {rel.max():.2e}")
    if len(gaps):
        print(f"  where top-1 differs, bf16's window is within x of the fp32 max (fp32 values): p50 "
              f"{np.median(gaps):.2e}, p99 {np.quantile(gaps, 0.99):.2e}, max {gaps.max():.2e} "
              f"(inf: not in fp32's top {b.shape[0]})")


def gpu_extras(engine: Engine, sae: LoadedSAE, windows: list) -> None:
    """feature_stats and token_set_enrichment at the gpt2 shape, then bf16 against fp32 on the same windows."""
    stats = LogitWeightStats(engine)
    print(f"feature_stats over {sae.d_sae} features: {timed(lambda: LogitWeightStats(engine).feature_stats()):.3f} s "
          "(cold moments each time)")
    w_engine, _ = gpt2_engine(str(engine.device), synthetic_vocab_tokenizer())
    w_stats = LogitWeightStats(w_engine)
    w_stats.builtin_excluded()  # the vocabulary's strings, once per server
    print(f"token_set_enrichment (every built-in set, {sae.d_sae} features, 50257 tokens): "
          f"{timed(lambda: w_stats.token_set_enrichment(top=10)):.3f} s")
    del stats
    bf16_vs_fp32(engine, sae, windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000, help="the small budget; the large one is 3x")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None,
                    help="windows per batch (default: what the scan picks, scan.batch_windows_for)")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--skip-stories", action="store_true", help="only the gpt2 shape (its tokenizer still loads)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus-repeat", type=int, default=1, help="scan the corpus this many times over (GPU budgets)")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA (the scan's default there)")
    ap.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the gpt2-shape model and SAE's weights (`sae-mcp --dtype`); bfloat16 needs no autocast")
    ap.add_argument("--variants", default="after",
                    help=f"comma-separated, measured interleaved: {', '.join(VARIANTS)} (issue 24's changes)")
    ap.add_argument("--profile", action="store_true", help="time and profile one batch of the user path")
    ap.add_argument("--gpu-extras", action="store_true", help="feature_stats, token_set_enrichment, bf16 vs fp32")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - VARIANTS.keys():
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    full_precision(args.fp32)
    corpus = repeated_corpus(args.corpus_repeat)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {where}")
    engine, sae = stories_engine(args.device)
    print(f"scan precision: {compute_dtype(engine, sae)}")
    batch = args.batch or batch_windows_for(engine, sae, 128, sae.d_sae)
    if not args.skip_stories:
        measure("stories260K (real), SAE 64x4096, TinyStories", engine, sae, args.tokens, batch, args.repeats, corpus,
                variants)
        if args.profile:
            profile_batch(engine, sae, corpus, batch, args.tokens)
    if args.skip_gpt2:
        return
    g_engine, g_sae = gpt2_engine(args.device, engine.model.tokenizer, getattr(torch, args.model_dtype))
    print(f"gpt2 shape: weights {args.model_dtype}, scan precision {compute_dtype(g_engine, g_sae)}")
    batch = args.batch or batch_windows_for(g_engine, g_sae, 128, g_sae.d_sae)
    measure("gpt2-small shape (random), SAE 768x24576, TinyStories windows", g_engine, g_sae, args.tokens, batch,
            args.repeats, corpus, variants)
    if args.profile:
        profile_batch(g_engine, g_sae, corpus, batch, args.tokens)
    if args.device.startswith("cuda"):
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.gpu_extras:
        gpu_extras(g_engine, g_sae, corpus_windows(engine.model.tokenizer, args.tokens))


if __name__ == "__main__":
    main()
