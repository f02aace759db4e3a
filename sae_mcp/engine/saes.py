"""SAE sources -> LoadedSAE: a SAELens `RELEASE/SAE_ID` from the pretrained directory (ships in the sae-lens
wheel, so names are checked offline), or a local SAELens folder (`cfg.json` + `sae_weights.safetensors`), either
optionally prefixed `ALIAS=`. Offline, the hub call runs inside `Hub.fail_fast()`. Only safetensors weights are
read.
"""

from __future__ import annotations

import difflib
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_mcp.engine.devices import dtype_name
from sae_mcp.engine.hub import Hub, hf_file_cached
from sae_mcp.errors import LoadError

if TYPE_CHECKING:  # sae-lens imports slowly: only the type is needed here
    from sae_lens import SAE


@dataclass
class LoadedSAE:
    sae: SAE[Any]
    """Any architecture's config (sae-lens' SAE is generic in it)."""
    key: str
    """How tools address it: the alias when given, else the hook name."""
    hook_name: str
    layer: int
    """The block index of the hook: a forward with stop_at_layer = layer + 1 reaches it."""
    d_in: int
    d_sae: int
    architecture: str
    """standard | topk | jumprelu | gated | ... (sae-lens' own name)."""
    source: str
    """`RELEASE/SAE_ID` or the local folder's absolute path."""
    release: str | None
    sae_id: str | None
    neuronpedia_id: str | None
    prepend_bos: bool
    context_size: int | None
    dataset_path: str | None
    weights_id: str = ""
    """Identifies the weights: `RELEASE/SAE_ID` for the pretrained directory (fixed by name), else a SHA-256
    prefix of the folder's cfg.json + sae_weights.safetensors, so stores keyed by it notice retrained weights."""
    model_kwargs: dict | None = None
    """metadata.model_from_pretrained_kwargs: the model processing the SAE was trained with."""

    @property
    def store_key(self) -> str:
        """How the stores (index, explanations, labels) file this SAE: sae_store_key(source, weights_id)."""
        return sae_store_key(self.source, self.weights_id)


def sae_store_key(source: str, weights_id: str = "") -> str:
    """The key the stores file an SAE under: its source, plus its weights' id when that is not the source itself.

    Pretrained SAEs (`RELEASE/SAE_ID`) are fixed by name, so their key is the source; a local folder's key carries
    the hash of its cfg.json + weights (folder_weights_id), so an SAE re-trained into the same folder starts with
    an empty index and no labels, and the same weights find theirs again after a restart. The weights are hashed
    at load: a folder retrained while the server runs is noticed after a restart.
    """
    return source if not weights_id or weights_id == source else f"{source}#{weights_id}"


def folder_weights_id(folder: Path) -> str:
    """SHA-256 of cfg.json and the safetensors weights (streamed in 8 MiB chunks), first 16 hex digits."""
    h = hashlib.sha256()
    for name in ("cfg.json", "sae_weights.safetensors"):
        f = folder / name
        if f.exists():
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(8 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def split_alias(spec: str) -> tuple[str | None, str]:
    """`ALIAS=SPEC` -> (ALIAS, SPEC); a spec without `=` (or with `=` after a `/`) has no alias."""
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and not Path(spec).exists():
        return head, tail
    return None, spec


def load_sae(spec: str, device: str, dtype: torch.dtype, hub: Hub | None = None) -> LoadedSAE:
    """Load one SAE spec (without alias). Key is set to the hook name; the caller applies aliases."""
    with warnings.catch_warnings():
        # sae-lens warns that the model should be loaded with the SAE's model_from_pretrained_kwargs: we do
        # (processing_for), so the advice would only mislead whoever reads stderr.
        warnings.filterwarnings("ignore", message=".*non-empty model_from_pretrained_kwargs.*")
        folder = Path(spec).expanduser()
        if folder.is_dir():
            return _describe_sae(_open_sae_folder(folder, device, dtype), spec, str(folder.resolve()), None, None,
                                 folder_weights_id(folder))
        release, sae_id = parse_release_id(spec)
        sae = _open_pretrained_sae(release, sae_id, device, dtype, hub or Hub())
        source = f"{release}/{sae_id}"
        return _describe_sae(sae, spec, source, release, sae_id, source)  # fixed by name: the weights id is it


def _open_sae_folder(folder: Path, device: str, dtype: torch.dtype):
    from sae_lens import SAE

    if not (folder / "cfg.json").exists():
        raise LoadError(
            f"--sae {folder}: the folder has no cfg.json; a SAELens folder holds cfg.json + sae_weights.safetensors"
        )
    try:
        return SAE.load_from_disk(str(folder), device=device, dtype=dtype_name(dtype))
    except Exception as exc:
        raise LoadError(f"could not load the SAE folder {folder}: {type(exc).__name__}: {exc}") from exc


def _open_pretrained_sae(release: str, sae_id: str, device: str, dtype: torch.dtype, hub: Hub):
    from sae_lens import SAE

    if not hub.reachable and not sae_cached(release, sae_id):
        raise LoadError(
            f"SAE {release}/{sae_id} is not in the Hugging Face cache and the hub cannot be reached. With network, "
            "start sae-mcp once online to cache it, or pass --sae /path/to/a/local/saelens/folder "
            "(cfg.json + sae_weights.safetensors)."
        )
    try:
        with hub.fail_fast():
            return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype_name(dtype))
    except Exception as exc:
        raise LoadError(f"could not load SAE {release}/{sae_id}: {type(exc).__name__}: {exc}") from exc


def _describe_sae(sae, spec: str, source: str, release: str | None, sae_id: str | None, weights_id: str
                  ) -> LoadedSAE:
    """A loaded sae-lens SAE -> LoadedSAE, read from its config (hook, layer, widths, training metadata)."""
    from sae_lens.util import extract_layer_from_tlens_hook_name

    sae.eval()
    meta = sae.cfg.metadata
    hook_name = getattr(meta, "hook_name", None)
    if not hook_name:
        raise LoadError(f"SAE {spec}: its config names no hook (metadata.hook_name); cannot attach it to a model")
    layer = extract_layer_from_tlens_hook_name(hook_name)
    if layer is None:
        raise LoadError(f"SAE {spec}: hook {hook_name!r} is not inside a transformer block; sae-mcp needs blocks.L.*")
    arch = getattr(sae.cfg, "architecture", None)
    prepend_bos = getattr(meta, "prepend_bos", None)
    return LoadedSAE(
        sae=sae,
        key=hook_name,
        hook_name=hook_name,
        layer=int(layer),
        d_in=int(sae.cfg.d_in),
        d_sae=int(sae.cfg.d_sae),
        architecture=str(arch()) if callable(arch) else type(sae).__name__,
        source=source,
        release=release,
        sae_id=sae_id,
        neuronpedia_id=getattr(meta, "neuronpedia_id", None) or None,
        prepend_bos=True if prepend_bos is None else bool(prepend_bos),
        context_size=getattr(meta, "context_size", None),
        dataset_path=getattr(meta, "dataset_path", None) or None,
        weights_id=weights_id,
        model_kwargs=dict(getattr(meta, "model_from_pretrained_kwargs", None) or {}),
    )


def parse_release_id(spec: str) -> tuple[str, str]:
    """`RELEASE/SAE_ID` checked against SAELens' pretrained directory (ships in the wheel; works offline)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    release, sep, sae_id = spec.partition("/")
    if release not in directory:
        # Releases may contain '/' in principle: try the longest known prefix.
        for name in sorted(directory, key=len, reverse=True):
            if spec.startswith(name + "/"):
                release, sae_id, sep = name, spec[len(name) + 1 :], "/"
                break
    if release not in directory:
        near = difflib.get_close_matches(release, list(directory), n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise LoadError(
            f"--sae {spec!r} is neither a local SAELens folder nor a known SAELens release.{hint} "
            "Use RELEASE/SAE_ID, e.g. gpt2-small-res-jb/blocks.7.hook_resid_pre."
        )
    ids = directory[release].saes_map
    if not sep or sae_id not in ids:
        near = difflib.get_close_matches(sae_id, list(ids), n=3) if sep else list(ids)[:3]
        raise LoadError(
            f"--sae {spec!r}: release {release} has no SAE id {sae_id!r}. Some of its ids: {', '.join(near)}."
        )
    return release, sae_id


def sae_cached(release: str, sae_id: str) -> bool:
    """Whether the SAE's cfg.json is in the HF cache (the weights may still be missing; the loader then says so)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    info = get_pretrained_saes_directory()[release]
    path = info.saes_map[sae_id]
    return hf_file_cached(info.repo_id, f"{path}/cfg.json".lstrip("/"))
