"""`sae-mcp explanations import` and `sae-mcp dashboard`.

    sae-mcp explanations import --sae gpt2-small-res-jb/blocks.7.hook_resid_pre --neuronpedia
    sae-mcp explanations import --sae ./my_sae --model ./my_model explanations.json     (JSON, JSONL or CSV)
    sae-mcp dashboard --port 8765                                                        (feature cards as pages)

Importing needs neither the model nor the SAE's weights loaded: only their names, to file the explanations under
the same keys the server uses (the model's name or folder; the SAE's RELEASE/SAE_ID, or its folder plus the hash
of the weights in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sae_mcp.cli_common import add_http_flags
from sae_mcp.errors import InvalidInput, LoadError


def _sae_identity(spec: str) -> tuple[str, str | None, int | None]:
    """An --sae spec -> (store key as the server computes it, neuronpedia id, d_sae when it can be read offline)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae_mcp.engine import saes

    _, spec = saes.split_alias(spec)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "cfg.json").exists():
            raise LoadError(f"--sae {spec}: the folder has no cfg.json; pass a SAELens folder or RELEASE/SAE_ID")
        cfg = json.loads((folder / "cfg.json").read_text())
        np_id = (cfg.get("metadata") or {}).get("neuronpedia_id") or cfg.get("neuronpedia_id")
        key = saes.sae_store_key(str(folder.resolve()), saes.folder_weights_id(folder))
        return key, np_id, cfg.get("d_sae")
    release, sae_id = saes.parse_release_id(spec)
    info = get_pretrained_saes_directory()[release]
    np_id = (getattr(info, "neuronpedia_id", None) or {}).get(sae_id)
    return saes.sae_store_key(f"{release}/{sae_id}"), np_id, None


def cmd_import(args: argparse.Namespace) -> int:
    from sae_mcp.engine.loading import model_identity, model_store_key
    from sae_mcp.settings import DEFAULT_MODEL, DEFAULT_SAE, default_data_dir
    from sae_mcp.store.explanation_files import fetch_neuronpedia_export, normalise_rows, read_explanations_file
    from sae_mcp.store.explanations import ExplanationStore

    if bool(args.neuronpedia) == bool(args.file):
        raise InvalidInput("pass either --neuronpedia or a FILE to import (one of them)")
    saes = args.saes or [DEFAULT_SAE]
    if len(saes) != 1:
        raise InvalidInput("import into one SAE at a time: pass --sae once")
    source, own_np_id, d_sae = _sae_identity(saes[0])
    model_key = model_store_key(*model_identity(args.model or DEFAULT_MODEL))
    # The rows' modelId/layer must name this SAE on Neuronpedia, when its id is known (its config, else the one
    # given): explanations of another SAE's features would be filed under this one's. --force skips the check.
    expect = None if args.force else (own_np_id or args.neuronpedia_id)
    sae_name = f"SAE {saes[0]}"
    if args.neuronpedia:
        np_id = args.neuronpedia_id or own_np_id
        if not np_id:
            raise InvalidInput(
                f"SAE {source} has no Neuronpedia id in its config; pass --neuronpedia-id MODEL/SAE "
                "(e.g. gpt2-small/7-res-jb)"
            )
        print(f"downloading Neuronpedia's explanations for {np_id} ...", file=sys.stderr)
        rows = normalise_rows(fetch_neuronpedia_export(np_id, timeout_s=args.timeout), d_sae, "neuronpedia: ",
                              neuronpedia_id=expect, sae_name=sae_name)
        label = "neuronpedia"
    else:
        rows = read_explanations_file(Path(args.file), d_sae, neuronpedia_id=expect, sae_name=sae_name)
        label = f"file:{Path(args.file).name}"
    store = ExplanationStore.for_model(args.data_dir or default_data_dir(), model_key, embedder=None)
    try:
        added, skipped = store.import_rows(source, rows, label)
        counts = store.counts(source)
    finally:
        store.close()
    print(json.dumps({"sae": source, "source": label, "rows": len(rows), "added": added,
                      "already_present": skipped, "total_imported": counts["imported"], "labels": counts["labels"],
                      "path": str(store.path)}))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from sae_mcp.cli_common import auth_note, bind_http, http_base, services_for, settings_from_args

    settings = settings_from_args(args)
    policy, sock = bind_http(args)  # the address is checked and bound before the model (or torch) loads
    from sae_mcp.server.http import dashboard_app, serve_asgi

    services = services_for(settings)
    base = http_base(policy)
    print(f"feature cards at {base}/features/SAE/FEATURE (index: {base}/; {auth_note(policy)})", file=sys.stderr)
    serve_asgi(dashboard_app(services, policy), sock, access_log=args.access_log)
    return 0


def register(sub: argparse._SubParsersAction, engine_flags) -> None:
    p = sub.add_parser("explanations", help="import feature explanations (Neuronpedia's export or a file)")
    esub = p.add_subparsers(dest="explanations_command", required=True)
    imp = esub.add_parser("import", help="import explanations for one SAE into the local store")
    imp.add_argument("file", nargs="?", help="JSON list, JSONL or CSV of {feature (or index), description}")
    imp.add_argument("--neuronpedia", action="store_true", help="download Neuronpedia's export (needs network once)")
    imp.add_argument("--neuronpedia-id", default=None, help="MODEL/SAE on Neuronpedia, when the SAE's config has none")
    imp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the download")
    imp.add_argument("--force", action="store_true",
                     help="import even when the export's modelId/layer name another Neuronpedia SAE than --sae's")
    imp.add_argument("--model", default=None, help="the model the SAE belongs to (official name or local folder)")
    imp.add_argument("--sae", action="append", dest="saes", metavar="SPEC",
                     help="RELEASE/SAE_ID or a local SAELens folder")
    imp.add_argument("--data-dir", default=None, type=Path, help="where the stores live")
    imp.set_defaults(fn=cmd_import)

    d = sub.add_parser("dashboard", help="serve feature cards as HTML pages on localhost")
    engine_flags(d)
    d.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: localhost only)")
    d.add_argument("--port", type=int, default=8765)
    add_http_flags(d, sessions=False)
    d.set_defaults(fn=cmd_dashboard)
