"""`sae-mcp index`: the one-pass feature index of every loaded SAE over a corpus (resumable, Ctrl-C safe)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys


def register(sub, engine_flags) -> None:
    p = sub.add_parser(
        "index",
        help="scan a corpus once and store every feature's top examples, density and histogram",
        description="One pass over --corpus (default: the SAE's training dataset) for every feature of each --sae. "
        "Stored under --data-dir keyed by model, SAE and corpus; re-running resumes or reuses it.",
    )
    engine_flags(p)
    p.add_argument("--tokens", type=int, default=1_000_000, help="document tokens to scan (default 1,000,000)")
    p.add_argument("--batch-windows", type=int, default=None, help="windows per batch (default: from memory)")
    p.add_argument("--only", default=None, help="index only this SAE key (default: every loaded SAE)")
    p.set_defaults(fn=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from sae_mcp.cli_common import build_engine, settings_from_args
    from sae_mcp.engine.runtime import CancelToken
    from sae_mcp.services.example_source import ExampleSource

    settings = settings_from_args(args)
    source = ExampleSource(build_engine(settings), settings)
    keys = [args.only] if args.only else list(source.engine.saes)
    cancel = CancelToken()
    # Ctrl-C: stop between batches, keep the last whole batch in a checkpoint; a second Ctrl-C kills at once.
    old = signal.signal(signal.SIGINT, lambda *_: (cancel.cancel(), signal.signal(signal.SIGINT, signal.SIG_DFL)))
    try:
        return _index_all(source, keys, args, cancel)
    finally:
        signal.signal(signal.SIGINT, old)


def _index_all(source, keys, args, cancel) -> int:
    from tqdm import tqdm

    from sae_mcp.errors import Cancelled

    for key in keys:
        bar = tqdm(total=args.tokens, unit="tok", unit_scale=True, desc=f"index {key}", file=sys.stderr)

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        try:
            with contextlib.redirect_stdout(sys.stderr):
                report = source.build_index(key, args.tokens, progress=progress, cancel=cancel,
                                            batch_windows=args.batch_windows)
        except Cancelled:
            bar.close()
            print(f"cancelled: {key} is checkpointed; run the same command again to resume", file=sys.stderr)
            return 130
        bar.close()
        print(json.dumps(report.model_dump(mode="json")))
    return 0
