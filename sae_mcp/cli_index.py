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
    p.add_argument("--checkpoint-seconds", type=float, default=30.0,
                   help="seconds between checkpoints (a killed run resumes from the last; default 30)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="shard the scan over Ray actors, one per GPU (or CPU slot), merged into the same index: a "
                   "local cluster, or join ADDRESS ('auto', HOST:PORT, ray://HOST:10001); needs sae-mcp[ray]")
    p.add_argument("--workers", type=int, default=None,
                   help="with --ray: actors to start (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--shards", type=int, default=None,
                   help="with --ray: corpus ranges the scan is cut into (default: one per worker)")
    p.set_defaults(fn=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from sae_mcp.cli_common import build_engine, settings_from_args
    from sae_mcp.index.source import ExampleSource

    settings = settings_from_args(args)
    if args.ray is not None:
        return _index_ray(settings, args)
    source = ExampleSource(build_engine(settings), settings, checkpoint_s=args.checkpoint_seconds)
    keys = [args.only] if args.only else list(source.engine.saes)
    return _with_cancel(source, keys, args)


def _with_cancel(source, keys, args) -> int:
    from sae_mcp.engine.runtime import CancelToken

    cancel = CancelToken()
    def interrupted(signum: int, frame: object) -> None:
        """Ctrl-C: stop between batches, keep the last whole batch in a checkpoint; a second Ctrl-C kills at once."""
        cancel.cancel()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    old = signal.signal(signal.SIGINT, interrupted)
    try:
        return _index_all(source, keys, args, cancel)
    finally:
        signal.signal(signal.SIGINT, old)


def _index_ray(settings, args) -> int:
    """--ray: the same index and report, built by Ray workers (index/ray_driver.py); exit 2 without Ray."""
    from sae_mcp.index.ray_driver import INSTALL_HINT, RayIndexer, import_ray
    from sae_mcp.preflight import check_settings

    if import_ray() is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    check_settings(settings)  # data dir writable, local corpus readable: before any worker loads a model
    with contextlib.redirect_stdout(sys.stderr):  # Ray's and the libraries' chatter; stdout is the report
        indexer = RayIndexer(settings, address=args.ray or None, workers=args.workers, shards=args.shards,
                             checkpoint_s=args.checkpoint_seconds)
    with indexer:
        return _with_cancel(indexer, [args.only] if args.only else indexer.keys, args)


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
