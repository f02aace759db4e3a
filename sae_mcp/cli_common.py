"""What every engine-loading subcommand shares: the engine flags, settings from them, and a quiet engine build.

Kept apart from cli.py so the subcommand modules (cli_index, cli_explain) import down, never back up into cli.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from sae_mcp.settings import DEFAULT_MODEL, DEFAULT_SAE, Settings, default_data_dir


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="transformer-lens official name or local HF model folder")
    p.add_argument(
        "--sae",
        action="append",
        dest="saes",
        metavar="SPEC",
        help="RELEASE/SAE_ID or a local SAELens folder, optionally ALIAS=SPEC; repeatable "
        f"(default: {DEFAULT_SAE})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--corpus", default=None, help="HF dataset name or local .txt/.jsonl/.parquet for scans")
    p.add_argument("--data-dir", default=None, type=Path, help=f"stores live here (default: {default_data_dir()})")


def settings_from_args(args: argparse.Namespace) -> Settings:
    kw = dict(
        model=args.model,
        saes=tuple(args.saes) if args.saes else (DEFAULT_SAE,),
        device=args.device,
        dtype=args.dtype,
        corpus=args.corpus,
    )
    if args.data_dir is not None:
        kw["data_dir"] = args.data_dir
    return Settings(**kw)


def build_engine(settings: Settings):
    """Load model + SAEs with every byte of library chatter sent to stderr."""
    from sae_mcp.engine.runtime import Engine

    with contextlib.redirect_stdout(sys.stderr):
        return Engine.from_settings(settings)
