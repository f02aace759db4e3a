"""sae-mcp serve | call | doctor | train-sae | index | explanations import | dashboard | ledger.

stdout belongs to JSON-RPC under `serve`: logs, progress bars and any library chatter go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from sae_mcp import cli_explain, cli_index, cli_ledger
from sae_mcp.cli_common import (
    add_engine_flags,
    add_http_flags,
    auth_note,
    bind_http,
    dashboard_url,
    http_base,
    services_for,
    settings_from_args,
)
from sae_mcp.settings import Settings

log = logging.getLogger("sae_mcp")


def build_app(settings: Settings, record: bool = True):
    """Engine + MCP server for serve/call; every call recorded in the ledger unless `record` is False."""
    from sae_mcp.server.app import build_server

    services = services_for(settings, record=record)
    return services.engine, build_server(services.engine, settings, services=services, record=record)


# --------------------------------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.transport == "http":
        policy, sock = bind_http(args)  # the address is checked and bound before the model (or torch) loads
        from sae_mcp.server.http import mcp_http_app, serve_asgi

        settings = settings.model_copy(update={"dashboard_url": dashboard_url(args, policy)})
        _, server = build_app(settings, record=not args.no_ledger)
        # Streamable HTTP at /mcp, and the feature-card pages at /features/{sae}/{feature} beside it.
        log.info("sae-mcp serving on %s/mcp, cards at /features/SAE/FEATURE (%s)", http_base(policy),
                 auth_note(policy))
        serve_asgi(mcp_http_app(server, policy), sock, access_log=args.access_log)
        return 0
    settings = settings.model_copy(update={"dashboard_url": dashboard_url(args)})
    _, server = build_app(settings, record=not args.no_ledger)
    log.info("sae-mcp serving on stdio")
    from sae_mcp.server.stdio import run_stdio

    run_stdio(server)  # the SDK's stdio transport, answering malformed lines instead of dropping them
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    import anyio
    from mcp import Client

    try:
        arguments = json.loads(args.json) if args.json else {}
    except json.JSONDecodeError as exc:
        print(f"error: --json is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(arguments, dict):
        print("error: --json must be a JSON object of tool arguments", file=sys.stderr)
        return 2
    settings = settings_from_args(args)
    _, server = build_app(settings, record=not args.no_ledger)

    async def run() -> int:
        async with Client(server) as client:
            result = await client.call_tool(args.tool, arguments)
        if result.is_error:
            text = " ".join(getattr(c, "text", "") for c in result.content)
            print(f"error: {text}", file=sys.stderr)
            return 1
        payload = result.structured_content
        if payload is None:
            payload = [c.model_dump(mode="json", exclude_none=True) for c in result.content]
        print(json.dumps(payload, indent=None if args.compact else 2, ensure_ascii=False))
        return 0

    return anyio.run(run)


def cmd_doctor(args: argparse.Namespace) -> int:
    """What is installed, the device, and whether the default model and SAE are cached."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from sae_mcp.engine import loading, saes
    from sae_mcp.engine.devices import resolve_device
    from sae_mcp.engine.hub import Hub, hf_file_cached

    def line(name: str, value: object) -> None:
        print(f"{name:18s} {value}", file=sys.stdout)

    for pkg in ("sae-mcp", "torch", "transformer-lens", "sae-lens", "mcp", "transformers", "pydantic", "pandas"):
        try:
            line(pkg, version(pkg))
        except PackageNotFoundError:
            line(pkg, "NOT INSTALLED")
    cuda = torch.cuda.is_available()
    line("cuda", f"{cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    line("mps", getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    line("device (auto)", resolve_device("auto"))
    line("hub reachable", Hub().reachable)
    settings = settings_from_args(args)
    line("data dir", settings.data_dir)
    if settings.demo:
        from sae_mcp import demo

        line("demo", f"{demo.HERE}: model, {len(demo.SAE_DIRS)} SAEs and corpus present (offline)")
    model = settings.model
    if loading.is_local_model_dir(model):
        line("model", f"{model}: local folder")
    elif (official := loading.official_model_name(model)) is not None:
        cached = hf_file_cached(official, "config.json")
        line("model", f"{model} ({official}): {'cached' if cached else 'NOT cached'}")
    else:
        line("model", f"{model}: not an official transformer-lens name")
    for spec in settings.saes:
        _, source = saes.split_alias(spec)
        if Path(source).is_dir():
            line("sae", f"{source}: local folder")
            continue
        try:
            release, sae_id = saes.parse_release_id(source)
            line("sae", f"{release}/{sae_id}: {'cached' if saes.sae_cached(release, sae_id) else 'NOT cached'}")
        except Exception as exc:
            line("sae", f"{source}: {exc}")
    if settings.corpus:
        line("corpus", settings.corpus)
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    """Train a small SAE on a local corpus with sae-lens' runner and save it as a SAELens folder."""
    from sae_mcp.engine.corpus import resolve_corpus
    from sae_mcp.engine.devices import resolve_device, resolve_dtype
    from sae_mcp.engine.loading import load_model
    from sae_mcp.engine.training import train_sae

    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_model(args.model, resolve_device(args.device), resolve_dtype("float32"))
        out = train_sae(
            loaded.model,
            resolve_corpus(args.texts),
            hook_name=args.hook,
            out_dir=Path(args.out),
            d_sae=args.d_sae,
            training_tokens=args.tokens,
            context_size=args.context_size,
            l1_coefficient=args.l1,
            model_name=loaded.name,
            model_processing=loaded.processing,
            max_documents=args.max_docs,
            dataset_path=args.dataset_path,
            seed=args.seed,
        )
    print(str(out))
    return 0


# ------------------------------------------------------------------------------------------------------- main


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-mcp", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the MCP server (stdio, or streamable HTTP with the card pages)")
    add_engine_flags(p)
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="http only; keep it on localhost unless you mean it")
    p.add_argument("--port", type=int, default=8765, help="http only")
    add_http_flags(p, sessions=True)
    p.add_argument("--dashboard-url", default=None, metavar="URL",
                   help="where the feature pages are served (e.g. a `sae-mcp dashboard` at http://127.0.0.1:8766): "
                   "results naming one feature carry its page URL; over --transport http the server's own address "
                   "is the default")
    cli_ledger.add_no_ledger_flag(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("call", help="run one tool in-process and print its structured result as JSON")
    p.add_argument("tool", help="tool name, e.g. get_feature_acts")
    p.add_argument("--json", default="{}", help="tool arguments as a JSON object")
    p.add_argument("--compact", action="store_true", help="one-line JSON")
    add_engine_flags(p)
    cli_ledger.add_no_ledger_flag(p)
    p.set_defaults(fn=cmd_call)

    p = sub.add_parser("doctor", help="installed versions, device, and whether the model/SAE are cached")
    add_engine_flags(p)
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("train-sae", help="train a small SAE offline on a local corpus (a SAELens folder)")
    p.add_argument("--model", required=True, help="official name or local HF model folder")
    p.add_argument("--hook", required=True, help="hook name, e.g. blocks.2.hook_resid_pre")
    p.add_argument("--texts", required=True, help="a local .txt/.jsonl/.parquet corpus, read as --corpus is")
    p.add_argument("--out", required=True, help="output folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--tokens", type=int, default=300_000, help="training tokens")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--l1", type=float, default=2.0, help="L1 coefficient")
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--dataset-path", default=None,
                   help="the training dataset recorded in the SAE's metadata, where scans look when no --corpus is "
                   "given (default: the --texts file's absolute path)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_train_sae)

    cli_index.register(sub, add_engine_flags)
    cli_explain.register(sub, add_engine_flags)
    cli_ledger.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sae_mcp.errors import SaeMcpError

    try:
        return args.fn(args)
    except SaeMcpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
