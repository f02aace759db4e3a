"""What a recorded run ran against: the environment a ledger entry points to (ledger/store.py, table envs).

    environment(engine, settings, store) -> dict
        model     name, source (official | the folder), architecture, weights (a local folder: SHA-256 of its
                  config.json and *.safetensors; an official model: the Hugging Face snapshot it loaded from the
                  cache), processing (fold_ln, center_writing_weights, ...), dtype, device, n_devices, n_ctx
        saes      per SAE: key, hook, layer, source, release/sae_id, weights_id (SHA-256 prefix of a folder's cfg.json
                  + weights, or RELEASE/SAE_ID), architecture, d_in, d_sae, dtype, prepend_bos, context_size, corpus
        settings  the specs to start the same server again (`sae-mcp ledger replay` reads them)
        versions  python, torch, transformer-lens, sae-lens, transformers, sae-mcp, mcp, numpy, platform

The id of an environment is a SHA-256 prefix of its JSON, so every run of one server shares one row, and a run
after a library upgrade or a re-trained SAE points to another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sae_mcp.engine.corpus import resolve_corpus
from sae_mcp.engine.devices import dtype_name
from sae_mcp.engine.runtime import Engine
from sae_mcp.errors import SaeMcpError
from sae_mcp.ledger.store import LedgerStore
from sae_mcp.settings import Settings

log = logging.getLogger(__name__)

PACKAGES = ("sae-mcp", "torch", "transformer-lens", "sae-lens", "transformers", "mcp", "numpy", "pandas")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": f"{sys.platform}-{platform.machine()}"}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def file_sha256(path: Path, store: LedgerStore | None) -> str:
    """A file's SHA-256, read from the store's cache when its size and mtime are unchanged (a multi-GB model is
    hashed once per version of the file, not at every start)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    cached = store.file_hash(*key) if store is not None else None
    if cached:
        return cached
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if store is not None:
        store.put_file_hash(*key, digest)
    return digest


def folder_weights(folder: Path, store: LedgerStore | None) -> dict:
    """{kind: 'sha256', value, files}: config.json and every *.safetensors of a local model folder, hashed."""
    files = sorted(p for p in folder.glob("*.safetensors")) + [p for p in [folder / "config.json"] if p.exists()]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + file_sha256(p, store).encode())
    return {"kind": "sha256", "value": h.hexdigest()[:16], "files": [p.name for p in files]}


def official_weights(name: str) -> dict:
    """{kind: 'hf-snapshot', value: the cached snapshot (a commit) of the model's Hugging Face repo}, when known."""
    try:
        from huggingface_hub import try_to_load_from_cache

        from sae_mcp.engine.loading import official_model_name

        repo = official_model_name(name) or name
        cached = try_to_load_from_cache(repo, "config.json")
        if isinstance(cached, str) and "/snapshots/" in cached:
            return {"kind": "hf-snapshot", "repo": repo, "value": cached.split("/snapshots/")[1].split("/")[0]}
        return {"kind": "hf-name", "repo": repo, "value": repo}
    except Exception as exc:  # identity is best effort: never a reason for a server not to record
        log.debug("no snapshot for %s: %s", name, exc)
        return {"kind": "hf-name", "value": name}


def _model(engine: Engine, settings: Settings, store: LedgerStore | None) -> dict:
    lm = engine.loaded_model
    cfg = engine.model.cfg
    folder = Path(lm.source)
    weights = folder_weights(folder, store) if lm.source != "official" and folder.is_dir() else \
        official_weights(lm.name)
    return {"name": lm.name, "source": lm.source, "architecture": lm.architecture, "weights": weights,
            "processing": dict(lm.processing), "dtype": dtype_name(cfg.dtype), "device": str(engine.device),
            "n_devices": settings.n_devices, "n_ctx": int(cfg.n_ctx), "d_vocab": int(cfg.d_vocab),
            "default_prepend_bos": bool(getattr(cfg, "default_prepend_bos", True))}


def _corpus(settings: Settings, dataset_path: str | None) -> dict | None:
    try:
        src = resolve_corpus(settings.corpus, dataset_path)
    except SaeMcpError:
        return None
    return {"spec": src.spec, "key": src.key, "kind": src.kind, "fingerprint": src.fingerprint}


def _saes(engine: Engine, settings: Settings) -> list[dict]:
    out = []
    for s in engine.saes.values():
        out.append({
            "key": s.key, "hook_name": s.hook_name, "layer": s.layer, "source": s.source, "release": s.release,
            "sae_id": s.sae_id, "weights_id": s.weights_id, "architecture": s.architecture, "d_in": s.d_in,
            "d_sae": s.d_sae, "dtype": dtype_name(s.sae.dtype) if hasattr(s.sae, "dtype") else None,
            "prepend_bos": s.prepend_bos, "context_size": s.context_size, "corpus": _corpus(settings, s.dataset_path),
            "spec": s.source if s.key == s.hook_name else f"{s.key}={s.source}",
        })
    return out


def environment(engine: Engine, settings: Settings, store: LedgerStore | None) -> dict:
    tok = engine.model.tokenizer
    saes = _saes(engine, settings)
    return {
        "model": _model(engine, settings, store),
        "saes": saes,
        "tokenizer": {"bos_token_id": getattr(tok, "bos_token_id", None), "eos_token_id": getattr(tok, "eos_token_id",
                      None), "pad_token_id": getattr(tok, "pad_token_id", None)} if tok is not None else None,
        "settings": {"model": engine.loaded_model.source if engine.loaded_model.source != "official"
                     else engine.loaded_model.name, "saes": [s["spec"] for s in saes], "device": settings.device,
                     "dtype": settings.dtype, "corpus": settings.corpus, "data_dir": str(settings.data_dir),
                     "n_devices": settings.n_devices},
        "versions": versions(),
    }


def env_id(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
