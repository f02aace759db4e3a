"""What every engine-loading subcommand shares: the engine flags, settings from them, and a quiet engine build.

Kept apart from cli.py so the subcommand modules (cli_index, cli_explain) import down, never back up into cli.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from pathlib import Path

from sae_mcp.settings import DEFAULT_MODEL, DEFAULT_SAE, Settings, default_data_dir


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--demo", action="store_true",
                   help="the bundled demo, offline: the stories260K model, its two SAEs (blocks.1 and blocks.3 "
                   "hook_resid_pre) and its TinyStories corpus; not with --model, --sae or --corpus")
    p.add_argument("--model", default=None,
                   help=f"transformer-lens official name or local HF model folder (default: {DEFAULT_MODEL})")
    p.add_argument(
        "--sae",
        action="append",
        dest="saes",
        metavar="SPEC",
        help="RELEASE/SAE_ID or a local SAELens folder, optionally ALIAS=SPEC; repeatable "
        f"(default: {DEFAULT_SAE})",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--n-devices", type=int, default=1, help="split the model's blocks over this many GPUs")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--corpus", default=None, help="HF dataset name or local .txt/.jsonl/.parquet for scans")
    p.add_argument("--data-dir", default=None, type=Path, help=f"stores live here (default: {default_data_dir()})")


def settings_from_args(args: argparse.Namespace) -> Settings:
    kw: dict = dict(device=args.device, n_devices=args.n_devices, dtype=args.dtype)
    if getattr(args, "demo", False):
        kw.update(demo_sources(args))
    else:
        kw.update(model=args.model or DEFAULT_MODEL, saes=tuple(args.saes) if args.saes else (DEFAULT_SAE,),
                  corpus=args.corpus)
    if args.data_dir is not None:
        kw["data_dir"] = args.data_dir
    return Settings(**kw)


def demo_sources(args: argparse.Namespace) -> dict:
    """--demo: the bundled model, SAEs and corpus; InvalidInput (exit 2) beside --model/--sae/--corpus, or when
    this installation lacks the demo's files."""
    from sae_mcp import demo
    from sae_mcp.errors import InvalidInput

    given = [flag for flag, value in (("--model", args.model), ("--sae", args.saes), ("--corpus", args.corpus))
             if value]
    if given:
        raise InvalidInput(f"--demo loads the bundled model, SAEs and corpus; drop {', '.join(given)}, or drop "
                           "--demo to load your own")
    if demo.missing():
        raise InvalidInput(f"this installation lacks the demo's files ({demo.missing()[0]} and "
                           f"{len(demo.missing()) - 1} more): reinstall sae-mcp from a wheel or a source checkout")
    return dict(model=str(demo.MODEL_DIR), saes=tuple(str(d) for d in demo.SAE_DIRS), corpus=str(demo.CORPUS),
                demo=True)


def build_engine(settings: Settings):
    """Load model + SAEs with every byte of library chatter sent to stderr, after the start-up checks (data dir
    writable, local corpus readable), which fail in seconds rather than after the model has loaded."""
    from sae_mcp.engine.runtime import Engine
    from sae_mcp.preflight import check_settings

    check_settings(settings)
    with contextlib.redirect_stdout(sys.stderr):
        return Engine.from_settings(settings)


def services_for(settings: Settings, record: bool = True):
    """The engine's services (built once: services/), the demo's index built first when it is the demo."""
    from sae_mcp.server.tools import tool_map
    from sae_mcp.services import Services

    services = Services(build_engine(settings), settings, tools=tool_map(), record=record)
    if settings.demo:
        index_demo(services)
    return services


def index_demo(services) -> None:
    """--demo: the bundled corpus indexed for every SAE on first use (stderr says so while it runs: ~20-40 s on
    one CPU core, 384k tokens through two SAEs), so top_examples, scoring and the pages answer at once; later starts
    reuse the index in the data dir."""
    from sae_mcp.demo import DEMO_INDEX_TOKENS

    for key in services.engine.saes:
        report = services.examples.build_index(key, DEMO_INDEX_TOKENS)
        if not report.reused:
            print(f"demo: indexed {report.tokens_scanned:,} corpus tokens for {key} in {report.seconds:.0f} s (once; "
                  "kept in the data dir)", file=sys.stderr)


def add_http_flags(p: argparse.ArgumentParser, sessions: bool) -> None:
    """Who may reach an HTTP server (serve --transport http, dashboard); docs/security.md explains each."""
    from sae_mcp.server.security import HttpPolicy

    defaults = HttpPolicy()  # one place for the defaults
    p.add_argument("--token", default=None,
                   help="require Authorization: Bearer TOKEN on every route (pages also take ?token= once, then a "
                   "cookie); default: $SAE_MCP_TOKEN, which other local users cannot read in the process list")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a non-loopback --host without a token (a trusted network only)")
    p.add_argument("--allow-host", action="append", default=None, metavar="NAME[:PORT]",
                   help="also answer to this Host header (any port when none is given); repeatable")
    p.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                   help="accept browser requests from this Origin, e.g. https://app.example; repeatable (none by "
                   "default)")
    p.add_argument("--access-log", action="store_true", help="log each request to stderr (tokens redacted)")
    p.add_argument("--page-cookie-minutes", type=float, default=defaults.page_cookie_minutes,
                   help="a page login (the cookie ?token= sets) ends after this long; /logout or a restart ends it "
                   "sooner (default: %(default)s, at most a day)")
    if sessions:
        p.add_argument("--max-sessions-per-client", type=int, default=defaults.max_sessions_per_client,
                       help="open MCP sessions one client address may hold; more are refused with 429 "
                       "(default: %(default)s)")
        p.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                       help="open MCP sessions all clients together may hold; more are refused with 503 "
                       "(default: %(default)s, at most 10000)")
        p.add_argument("--session-idle-minutes", type=float, default=defaults.session_idle_minutes,
                       help="an MCP session with no request for this long is closed (default: %(default)s)")


def bind_http(args: argparse.Namespace):
    """The checked HttpPolicy and the bound listening socket, from the flags: a bad port, a taken port or a
    non-loopback bind without a token fails here in a second, before the model loads (InvalidInput, exit 2)."""
    from sae_mcp.server.security import HttpPolicy, check_policy, reserve_socket

    optional = ("max_sessions_per_client", "max_sessions", "session_idle_minutes", "page_cookie_minutes")
    given = {k: getattr(args, k) for k in optional if hasattr(args, k)}  # the session flags are serve's only
    policy = HttpPolicy(
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("SAE_MCP_TOKEN") or None,
        allow_hosts=tuple(args.allow_host or ()),
        allow_origins=tuple(args.allow_origin or ()),
        insecure_no_auth=args.insecure_no_auth,
        **given,
    )
    check_policy(policy)
    sock: socket.socket = reserve_socket(policy.host, policy.port)
    return policy, sock


def http_base(policy) -> str:
    """'http://HOST:PORT' for the log line, and what the token means for whoever opens it."""
    host = f"[{policy.host}]" if ":" in policy.host else policy.host
    return f"http://{host}:{policy.port}"


def page_base(policy) -> str:
    """The pages' base URL for links in results: http_base, with a wildcard bind (0.0.0.0, ::) read as loopback,
    a name the Host check always accepts. Never the token."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]"}.get(policy.host, policy.host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{policy.port}"


def dashboard_url(args: argparse.Namespace, policy=None) -> str | None:
    """--dashboard-url (checked now, before the model loads), else the HTTP server's own pages, else None."""
    from sae_mcp.pages.links import check_base

    given = getattr(args, "dashboard_url", None)
    if given:
        return check_base(given)
    return page_base(policy) if policy is not None else None


def auth_note(policy) -> str:
    if policy.token:
        return "token required: MCP clients send Authorization: Bearer TOKEN; open a page once with ?token=TOKEN"
    return "no token"
