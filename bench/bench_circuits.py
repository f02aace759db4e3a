"""trace_circuit on a long prompt: seconds for a 128-token prompt through 3 SAEs of 4096 features, on CPU.

The bundled stories260K model with three random SAEs of 4096 features at blocks.1/2/3.hook_resid_pre, each calibrated
to fire ~64 features a token (common.sparse_random_sae: a random SAE with a plain negative b_enc would fire a
third of its features and make every sparse path look slow for the wrong reason), a 128-token window of the bundled
corpus, the metric log P(its next token). Per max_nodes: the whole call (nodes, exact contributions of the kept
nodes, edges between consecutive SAEs, faithfulness), best of --repeats, one torch thread.

    python bench/bench_circuits.py [--max-nodes 40 200] [--repeats 2]

Measured on the shared 2-core dev box, one thread (2026-12-06): 128 tokens x 3 SAEs x 4096 features, 26,522
candidate nodes: max_nodes 40 (398 edges) in 2.9 s, max_nodes 200 (9,510 edges) in 16.8 s, best of 2. The edges
dominate the larger trace: one backward pass per kept downstream node, batched.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import CONTEXT, CORPUS, STORIES_HF, calibration_batch, sparse_random_sae

from sae_mcp.circuits.graph import CircuitRequest, trace_circuit
from sae_mcp.engine.corpus import iter_windows, resolve_corpus
from sae_mcp.engine.loading import load_model
from sae_mcp.engine.runtime import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-nodes", type=int, nargs="+", default=[40, 200])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(str(STORIES_HF), "cpu", torch.float32)
    windows = [w.ids for w in iter_windows(resolve_corpus(str(CORPUS)), loaded.model.tokenizer, CONTEXT, 1)
               if len(w.ids) == CONTEXT]
    calib = calibration_batch(loaded.model.tokenizer, 8)
    saes = [sparse_random_sae(loaded.model, f"blocks.{layer}.hook_resid_pre", layer, 4096, calib)
            for layer in (1, 2, 3)]
    engine = Engine(loaded, saes, "cpu")
    ids = windows[10][: args.tokens]
    prompt = loaded.model.tokenizer.decode(ids[1:])  # BOS is prepended again
    answer = loaded.model.tokenizer.decode([windows[10][args.tokens]]) if args.tokens < 128 else " the"
    n_tokens = engine.to_tokens(prompt).shape[1]
    print(f"prompt of {n_tokens} tokens, {len(saes)} SAEs x 4096 features, answer {answer!r}")
    for max_nodes in args.max_nodes:
        best, res = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = trace_circuit(engine, CircuitRequest(prompt, answer, max_nodes=max_nodes))
            best = min(best, time.perf_counter() - t0)
        print(f"max_nodes {max_nodes:4d}: {best:6.2f} s (best of {args.repeats}); {res.n_candidate_nodes} candidate "
              f"nodes, {res.n_nodes} kept, {res.n_edges} edges, faithfulness {res.faithfulness.faithfulness}")


if __name__ == "__main__":
    main()
