"""Ways to a faster forward to the SAE's hook (issue 24's first way in), as ratios measured side by side in one run.

    TL        transformer-lens' forward stopped before block L (what forward_to_hook ran before fast_forward.py)
    (c) ours  fast_forward.resid: transformer-lens' modules and processed weights, attention by fused SDPA
    (a) HF    the Hugging Face implementation with SDPA attention, its layers cut at L (stories260K only: the HF
              weights are loaded beside transformer-lens'; the gpt2 shape is random and has none)
    (b) compile  torch.compile of transformer-lens' forward to the hook, and of ours (after a timed first call)

Each way runs the same batch (a scan batch of TinyStories windows, right-padded), interleaved, best of --repeats;
each is checked equal to transformer-lens' residual first (max abs difference printed). Everything runs under
no_grad, not inference_mode: torch.compile's guards fail under inference_mode here (torch 2.13, "Guard failed on the
same frame it was created").

    python bench/bench_fast_forward.py [--repeats 5] [--skip-gpt2] [--skip-compile] [--device cuda]

Measured 2026-12-06 on the shared 2-core dev box (CPU, 1 thread, torch 2.13; python bench/bench_fast_forward.py):

    stories260K, 64 windows x 128 to blocks.2     ms     x TL   max |x - TL|
    TL (transformer-lens, stopped at the layer)   302.0  1.00
    (c) ours (fast_forward.py)                     69.5  4.35   3.1e-06
    (a) HF + SDPA                                  66.6  4.53   7.9e-06   +0.5 MiB of HF weights (2x for big models)
    (b) compile TL                                 96.9  3.12   4.8e-06   first call (compile) 4.5 s, each shape
    (b) compile ours                               61.5  4.91   4.5e-06   first call (compile) 4.1 s, each shape
    gpt2-small shape, 10 windows x 128 to blocks.7
    TL                                           1773.8  1.00
    (c) ours                                     1572.3  1.13   8.2e-06
    (b) compile TL                               1452.9  1.22   8.7e-06   compile 9.5 s
    (b) compile ours                             1379.9  1.29   1.1e-05   compile 11.6 s

Kept: (c). (a) is as fast but holds a second copy of the weights and needs transformer-lens' weight processing
re-derived (LayerNorm models: the centred residual); (b) gains 10-30% over (c) only after a multi-second compile for
every batch shape (a scan's length-sorted batches come in many lengths), and fails under inference_mode. The GPU
side is unmeasured (bench/bench_index.py has the one command for it).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import STORIES_HF, corpus_windows, gpt2_engine, stories_engine

from sae_mcp.engine import fast_forward
from sae_mcp.engine.corpus import pad_windows
from sae_mcp.index.scan import batch_windows_for, windows_pad_id


def tl_forward(model, layer: int):
    def run(tokens):
        return model(tokens, stop_at_layer=layer, attention_mask=torch.ones_like(tokens))
    return run


def ours(model, layer: int):
    return lambda tokens: fast_forward.resid(model, tokens, layer)


def hf_forward(layer: int, device: str):
    """The HF Llama with SDPA attention, layers cut at `layer` and no final norm: its last hidden state is the
    residual stream before block `layer` (RMSNorm models are not centred by transformer-lens)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(STORIES_HF), dtype=torch.float32, attn_implementation="sdpa")
    hf.model.layers = hf.model.layers[:layer]
    hf.model.norm = torch.nn.Identity()
    hf.to(device).eval()
    extra = sum(p.numel() * p.element_size() for p in hf.parameters())

    def run(tokens):
        return hf.model(input_ids=tokens, use_cache=False).last_hidden_state
    return run, extra


def compiled(fn, tokens) -> tuple[object, float]:
    """torch.compile(fn) and the seconds its first call (the compile) took."""
    c = torch.compile(fn, dynamic=False)
    t = time.perf_counter()
    c(tokens)
    return c, time.perf_counter() - t


def timed(ways: dict, tokens, repeats: int, device: str) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = {name: float("inf") for name in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn(tokens)  # warm
        for _ in range(repeats):  # interleaved: load on a shared box hits every way alike
            for name, fn in ways.items():
                sync()
                t = time.perf_counter()
                fn(tokens)
                sync()
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def compare(title: str, engine, sae, args, with_hf: bool) -> None:
    model, layer = engine.model, sae.layer
    batch = batch_windows_for(engine, sae, 128, sae.d_sae)
    ws = [w for w in corpus_windows(model.tokenizer, 200 * batch) if len(w.ids) > 1][:batch]
    tokens = pad_windows(ws, windows_pad_id(engine), bos=True)[0].to(args.device)  # [B, T]
    ways = {"TL": tl_forward(model, layer), "(c) ours": ours(model, layer)}
    notes = {}
    if with_hf:
        ways["(a) HF sdpa"], extra = hf_forward(layer, args.device)
        notes["(a) HF sdpa"] = f"+{extra / 2**20:.1f} MiB of HF weights beside transformer-lens'"
    if not args.skip_compile:
        with torch.no_grad():
            for name, fn in (("(b) compile TL", ways["TL"]), ("(b) compile ours", ways["(c) ours"])):
                try:
                    ways[name], secs = compiled(fn, tokens)
                    notes[name] = f"first call (compile) {secs:.1f} s; recompiles for each new batch shape"
                except Exception as exc:  # a backend missing on this machine: say so, measure the rest
                    notes[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    with torch.no_grad():
        ref = ways["TL"](tokens)
        for name, fn in ways.items():
            diff = float((fn(tokens).float() - ref.float()).abs().max())
            notes[name] = f"max |x - TL| {diff:.1e}" + (f"; {notes[name]}" if name in notes else "")
    best = timed(ways, tokens, args.repeats, args.device)
    n_tok = tokens.numel()
    print(f"\n== {title}: forward to blocks.{layer} of a batch of {tokens.shape[0]} windows x {tokens.shape[1]}")
    for name, secs in best.items():
        print(f"  {name:18s} {secs * 1000:8.1f} ms  {n_tok / secs:10,.0f} tok/s  TL / it {best['TL'] / secs:5.2f}x  "
              f"{notes.get(name, '')}")
    for name in notes.keys() - best.keys():
        print(f"  {name:18s} {notes[name]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {where}")
    engine, sae = stories_engine(args.device)
    compare("stories260K (Llama: RMSNorm, rotary, GQA)", engine, sae, args, with_hf=True)
    if not args.skip_gpt2:
        g_engine, g_sae = gpt2_engine(args.device, engine.model.tokenizer)
        compare("gpt2-small shape (LayerNormPre, random weights)", g_engine, g_sae, args, with_hf=False)


if __name__ == "__main__":
    main()
