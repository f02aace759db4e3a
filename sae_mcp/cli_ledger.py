"""sae-mcp ledger sessions | show | export | replay | prune: the record of every tool call (docs/ledger.md).

    sae-mcp ledger sessions [--data-dir D]                     the sessions, newest first
    sae-mcp ledger show [--session ID]                         one session's runs, one line each
    sae-mcp ledger export [--session ID] --format ipynb|py|md --out FILE
    sae-mcp ledger replay [--session ID] [--model M] [--sae SPEC ...] [--device D] [--dtype T] [--corpus C]
    sae-mcp ledger prune [--max-mb N] [--older-than-days D]

--session takes an id, a unique prefix, or nothing for the latest session. replay loads the recorded model and
SAEs unless --model / --sae / --corpus / --dtype say otherwise, and exits 1 when a result differs. prune deletes
the oldest runs no label cites (ledger/store.py's policy: the runs that recorded a label are kept too)
until the ledger is under --max-mb (default: the cap, SAE_MCP_LEDGER_MAX_MB) and every run older than
--older-than-days, then rewrites the file (VACUUM) so the space goes back to the disk.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from sae_mcp.errors import NotFound


def add_no_ledger_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-ledger", action="store_true",
                   help="do not record tool calls in the ledger (<data-dir>/ledger/ledger.sqlite); results then "
                   "carry no run_id")


def _store(args: argparse.Namespace):
    from sae_mcp.ledger.store import open_existing
    from sae_mcp.settings import default_data_dir

    data_dir = args.data_dir or default_data_dir()
    store = open_existing(data_dir)
    if store is None:
        raise NotFound(f"no ledger in {data_dir}: serve or call a tool first (or pass --data-dir)")
    return store, data_dir


def _tools():
    """The registered tools by name: how each tool's runs are summarised, exported, replayed and kept."""
    from sae_mcp.server.tools import tool_map

    return tool_map()


def cmd_sessions(args: argparse.Namespace) -> int:
    from sae_mcp.ledger.summary import session_line

    store, _ = _store(args)
    for s in store.sessions(limit=args.limit):
        print(session_line(store, s))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from sae_mcp.ledger.summary import run_line

    store, _ = _store(args)
    sid = store.resolve_session(args.session)
    print(f"session {sid}")
    tools = _tools()
    for run in store.runs(session=sid, limit=100_000, light=True):
        print(run_line(run, tools))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sae_mcp.ledger.export import export
    from sae_mcp.ledger.export.session import load_session

    store, _ = _store(args)
    data = load_session(store, args.session, _tools())
    export(data, args.format, Path(args.out))
    print(f"{args.out}: session {data.id}, {len(data.runs)} runs, {len(data.labels)} labels ({args.format})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import time

    from sae_mcp.ledger.recording import kept_tools, ledger_cap
    from sae_mcp.store.explanations import cited_runs

    store, data_dir = _store(args)
    before = time.time() - args.older_than_days * 86400 if args.older_than_days is not None else None
    max_bytes = int(args.max_mb * 1_000_000) if args.max_mb is not None else ledger_cap()
    cited = cited_runs(data_dir)
    was, runs = store.path.stat().st_size, store.count()
    done = store.prune(cited, kept_tools(_tools()), max_bytes=max_bytes, before=before)
    store.vacuum()
    print(f"{store.path}: deleted {done.runs} of {runs} runs (and {len(done.sessions)} sessions left without runs), "
          f"kept {done.kept} that labels cite; file {was / 1e6:.1f} MB -> {store.path.stat().st_size / 1e6:.1f} MB")
    return 0


def _replay_settings(args: argparse.Namespace, env: dict, data_dir: Path):
    """The recorded server's settings, with what the flags override."""
    from sae_mcp.settings import Settings

    rec = env.get("settings", {})
    if not rec and not (args.model and args.saes):
        raise NotFound("the session's environment is not recorded; pass --model and --sae")
    return Settings(model=args.model or rec["model"], saes=tuple(args.saes or rec["saes"]), device=args.device,
                    dtype=args.dtype or rec.get("dtype", "float32"), corpus=args.corpus or rec.get("corpus"),
                    data_dir=data_dir)


def cmd_replay(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from sae_mcp.ledger.export.replay import FLOAT_RTOL
    from sae_mcp.ledger.export.session import load_session

    store, data_dir = _store(args)
    data = load_session(store, args.session, _tools())
    scratch = None if args.in_place else Path(tempfile.mkdtemp(prefix="sae-mcp-replay-"))
    try:
        settings = _replay_settings(args, data.env, scratch or data_dir)
        results = _replay(settings, store, data, args.in_place)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for r in results:
        print(f"{r.run_id} {r.tool:<20} {r.status}" + (f": {r.detail}" if r.detail else ""))
    counts = {s: sum(r.status == s for r in results) for s in ("same", "close", "differs", "skipped")}
    close = f"{counts['close']} close (numbers within {FLOAT_RTOL:g}, as another thread count or device gives), " \
        if counts["close"] else ""
    print(f"{counts['same']} same, {close}{counts['differs']} differ, {counts['skipped']} skipped")
    return 1 if counts["differs"] else 0


def _replay(settings, store, data, in_place: bool) -> list:
    from sae_mcp.cli_common import build_engine
    from sae_mcp.ledger.env import environment
    from sae_mcp.ledger.export.replay import env_changes, replay
    from sae_mcp.ledger.recording import Ledger
    from sae_mcp.server.app import build_server
    from sae_mcp.services import Services

    engine = build_engine(settings)
    # A replay is no new experiment: nothing is recorded, but label_feature checks its evidence_runs in this ledger.
    tools = _tools()
    services = Services(engine, settings, tools=tools, ledger=Ledger(engine, settings, tools, recording=False,
                                                                     store=store))
    server = build_server(engine, settings, services=services, record=False)
    print(f"replaying session {data.id} ({len(data.runs)} runs) on {settings.model} with {', '.join(settings.saes)}"
          + ("" if in_place else " (scratch data dir)"))
    for line in env_changes(data.env, environment(engine, settings, None)):
        print(f"changed since the recording: {line}")
    with contextlib.redirect_stdout(sys.stderr):  # library chatter during the calls stays off the report
        return replay(server, data, in_place)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ledger", help="the record of every tool call: list, show, export (py/ipynb/md), replay")
    lsub = p.add_subparsers(dest="ledger_command", required=True)

    def common(q: argparse.ArgumentParser, session: bool = True) -> None:
        q.add_argument("--data-dir", default=None, type=Path, help="where the ledger lives (default: the data dir)")
        if session:
            q.add_argument("--session", default=None, help="session id or unique prefix (default: the latest)")

    q = lsub.add_parser("sessions", help="the recorded sessions, newest first")
    common(q, session=False)
    q.add_argument("--limit", type=int, default=50)
    q.set_defaults(fn=cmd_sessions)

    q = lsub.add_parser("show", help="one session's runs, one line each")
    common(q)
    q.set_defaults(fn=cmd_show)

    q = lsub.add_parser("export", help="a session as a runnable script or notebook that checks every number, or a "
                        "markdown report")
    common(q)
    q.add_argument("--format", required=True, choices=["ipynb", "py", "md"])
    q.add_argument("--out", required=True, help="the file to write")
    q.set_defaults(fn=cmd_export)

    q = lsub.add_parser("replay", help="rerun every recorded call and report the results that differ")
    common(q)
    q.add_argument("--model", default=None, help="default: the recorded model")
    q.add_argument("--sae", action="append", dest="saes", metavar="SPEC", help="default: the recorded SAEs")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    q.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="default: recorded")
    q.add_argument("--corpus", default=None, help="default: the recorded corpus")
    q.add_argument("--in-place", action="store_true",
                   help="use the data dir's index, cached scans and labels (default: a scratch data dir, where the "
                   "session's labels are written again)")
    q.set_defaults(fn=cmd_replay)

    q = lsub.add_parser("prune", help="delete the oldest runs no label cites, to a size or an age, and give the "
                        "space back to the disk")
    common(q, session=False)
    q.add_argument("--max-mb", type=_bounded_float(0, 10_000_000), default=None,
                   help="keep the ledger under this many MB (default: its cap, $SAE_MCP_LEDGER_MAX_MB or 1024)")
    q.add_argument("--older-than-days", type=_bounded_float(0, 100_000), default=None,
                   help="also delete every run older than this (cited runs and labels' own runs are kept)")
    q.set_defaults(fn=cmd_prune)


def _bounded_float(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        if not lo <= x <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: give a number from {lo:g} to {hi:g}")
        return x
    return parse
