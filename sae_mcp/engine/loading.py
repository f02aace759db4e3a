"""Model and SAE sources -> LoadedModel, LoadedSAE.

Models: a transformer-lens official name (fetched/cached by Hugging Face) or a local Hugging Face folder,
converted with transformer-lens' own config and weight converters. SAEs: a SAELens `RELEASE/SAE_ID` from the
pretrained directory, or a local SAELens folder (`cfg.json` + `sae_weights.safetensors`).

Offline, every hub call runs inside `Hub.fail_fast()` (engine/hub.py): a populated cache still works and a missing
file fails at once with a message naming what to download. Only safetensors weights are read; remote code is
never trusted.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_mcp.engine.hub import Hub, hf_file_cached
from sae_mcp.errors import LoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {device} was asked for but CUDA is not available here; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LoadError("--device mps was asked for but MPS is not available here; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise LoadError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> 'float32' (how settings, results and sae-lens name dtypes)."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Models


@dataclass
class LoadedModel:
    model: "object"  # sae_lens.HookedSAETransformer (kept loose so this module imports fast)
    name: str
    """The official name, or the folder's name for a local model."""
    source: str
    """'official' or the absolute path of the local folder."""
    architecture: str
    """The Hugging Face architecture transformer-lens converted (e.g. GPT2LMHeadModel, LlamaForCausalLM)."""
    processing: dict = field(default_factory=dict)
    """The weight processing applied (fold_ln, center_writing_weights, ...): SAEs read activations that depend on it."""

    @property
    def store_key(self) -> str:
        """How the stores (index, explanations) file this model: model_store_key(name, source)."""
        return model_store_key(self.name, self.source)


# transformer-lens' weight processing and its defaults. center_writing_weights changes the residual stream itself,
# fold_value_biases changes hook_z, so an SAE must see the model processed as it was during its training; sae-lens
# records that in metadata.model_from_pretrained_kwargs.
DEFAULT_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}


def processing_for(saes: list["LoadedSAE"]) -> dict:
    """The model processing every SAE asks for (defaults elsewhere); LoadError when two SAEs disagree."""
    chosen: dict = {}
    who: dict = {}
    for s in saes:
        for key, value in (s.model_kwargs or {}).items():
            if key not in DEFAULT_PROCESSING:
                log.info("SAE %s: ignoring model_from_pretrained_kwargs[%r] (not weight processing)", s.source, key)
                continue
            if key in chosen and chosen[key] != bool(value):
                raise LoadError(
                    f"SAE {s.source} was trained on the model loaded with {key}={value}, but SAE {who[key]} with "
                    f"{key}={chosen[key]}; their activations differ, so serve them from separate servers"
                )
            chosen[key], who[key] = bool(value), s.source
    return {**DEFAULT_PROCESSING, **chosen}


def is_local_model_dir(spec: str) -> bool:
    p = Path(spec).expanduser()
    return p.is_dir() and (p / "config.json").exists()


def model_store_key(name: str, source: str) -> str:
    """The key stores file a model under: its official name, or the local folder's absolute path."""
    return name if source == "official" else source


def model_identity(spec: str) -> tuple[str, str]:
    """A --model spec -> (name, source) as LoadedModel has them, without loading: a local folder is its absolute
    path ('official' otherwise)."""
    if is_local_model_dir(spec):
        folder = Path(spec).expanduser().resolve()
        return folder.name, str(folder)
    return spec, "official"


def official_model_name(spec: str) -> str | None:
    """transformer-lens' official name (the hub repo) for `spec`, or None when it is not one."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(spec)
    except ValueError:
        return None


def load_model(spec: str, device: str, dtype: torch.dtype, processing: dict | None = None,
               hub: Hub | None = None) -> LoadedModel:
    """Load `spec` (official name or local HF folder) as a HookedSAETransformer on `device`, with the weight
    `processing` (default: transformer-lens' own, DEFAULT_PROCESSING)."""
    processing = {**DEFAULT_PROCESSING, **(processing or {})}
    if is_local_model_dir(spec):
        return _load_local_model(Path(spec).expanduser().resolve(), device, dtype, processing)
    if Path(spec).expanduser().exists():
        raise LoadError(f"--model {spec}: the folder exists but has no config.json; pass a Hugging Face model folder")
    official = official_model_name(spec)
    if official is None:
        raise LoadError(
            f"--model {spec!r} is neither a transformer-lens official model name nor a local Hugging Face folder "
            "(a folder with config.json). Examples: gpt2-small, gemma-2-2b, meta-llama/Llama-3.1-8B."
        )
    hub = hub or Hub()
    if not hub.reachable and not hf_file_cached(official, "config.json"):
        raise LoadError(
            f"model {spec!r} ({official}) is not in the Hugging Face cache and the hub cannot be reached. "
            f"With network, run `huggingface-cli download {official}` once (or just start sae-mcp online), "
            "or pass --model /path/to/a/local/hf/model/folder."
        )
    from sae_lens import HookedSAETransformer

    try:
        with hub.fail_fast():
            model = HookedSAETransformer.from_pretrained(spec, device=device, dtype=dtype, **processing)
    except Exception as exc:  # the hub stack raises many types; all mean "could not load"
        raise LoadError(
            f"could not load model {spec!r}: {type(exc).__name__}: {exc}. "
            + ("" if hub.reachable else "The hub is unreachable, so the cache must hold the full model. ")
            + "Pass --model /path/to/a/local/hf/model/folder to load from disk."
        ) from exc
    model.eval()
    return LoadedModel(model=model, name=spec, source="official", architecture=model.cfg.original_architecture or "",
                       processing=processing)


def preflight_offline(model_spec: str, sae_specs: list[str], hub: Hub) -> None:
    """Offline: name everything missing from the cache in one error, before loading anything."""
    if hub.reachable:
        return
    missing = []
    if not Path(model_spec).expanduser().exists():
        official = official_model_name(model_spec)  # None: load_model explains unknown names
        if official and not hf_file_cached(official, "config.json"):
            missing.append(f"model {model_spec!r} ({official}): `huggingface-cli download {official}`, "
                           "or pass --model /path/to/a/local/hf/model/folder")
    for spec in sae_specs:
        _, source = split_alias(spec)
        if Path(source).expanduser().is_dir():
            continue
        try:
            release, sae_id = parse_release_id(source)
        except LoadError:
            continue  # load_sae explains unknown names
        if not sae_cached(release, sae_id):
            missing.append(f"SAE {release}/{sae_id}: start once online to cache it, or pass "
                           "--sae /path/to/a/local/saelens/folder (cfg.json + sae_weights.safetensors)")
    if missing:
        raise LoadError(
            "the hub cannot be reached and these are not in the Hugging Face cache: " + "; ".join(missing)
        )


def _load_local_model(folder: Path, device: str, dtype: torch.dtype, processing: dict) -> LoadedModel:
    """Local HF folder -> transformer-lens: its own config builder and weight converter, safetensors only."""
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")):
        raise LoadError(f"--model {folder}: no *.safetensors weights found; sae-mcp never unpickles .bin weights")
    try:
        cfg = get_pretrained_model_config(str(folder), fold_ln=processing["fold_ln"], device=device, dtype=dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        state_dict = get_pretrained_state_dict(str(folder), cfg, hf_model=hf_model, dtype=dtype)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(
            f"could not convert the local model {folder}: {type(exc).__name__}: {exc}. transformer-lens converts "
            "GPT-2, GPT-Neo(X), Llama, Mistral, Gemma 1-3, Qwen 2-3, Phi, OLMo and a few more architectures."
        ) from exc
    del hf_model
    model = HookedSAETransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, name=folder.name, source=str(folder), architecture=cfg.original_architecture or "",
                       processing=processing)


# ---------------------------------------------------------------------------------------------------------------
# SAEs


@dataclass
class LoadedSAE:
    sae: "object"  # sae_lens.SAE
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


def hook_width(model, hook_name: str, layer: int) -> int:
    """The width of the activation at `hook_name`, measured by a 1-token forward (hook_z is flattened)."""
    if hook_name not in model.hook_dict:
        raise LoadError(f"hook {hook_name!r} does not exist in this model")
    tokens = torch.zeros((1, 1), dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name], stop_at_layer=layer + 1)
    act = cache[hook_name]
    # [batch, pos, d] or [batch, pos, n_heads, d_head] for hook_z/q/k/v
    return int(act.shape[2] * act.shape[3]) if act.ndim == 4 else int(act.shape[-1])


def check_compatible(loaded: LoadedModel, sae: LoadedSAE) -> None:
    """Refuse an SAE whose hook or d_in does not fit the model, saying why."""
    model = loaded.model
    if sae.hook_name not in model.hook_dict:
        near = difflib.get_close_matches(sae.hook_name, list(model.hook_dict), n=3)
        raise LoadError(
            f"SAE {sae.source} reads hook {sae.hook_name!r}, which model {loaded.name} does not have "
            f"({model.cfg.n_layers} layers).{' Nearest hooks: ' + ', '.join(near) if near else ''}"
        )
    width = hook_width(model, sae.hook_name, sae.layer)
    if width != sae.d_in:
        raise LoadError(
            f"SAE {sae.source} has d_in={sae.d_in} but model {loaded.name} gives width {width} at {sae.hook_name}: "
            "this SAE was trained on a different model."
        )
    trained_on = getattr(sae.sae.cfg.metadata, "model_name", None)
    names = (loaded.name, getattr(model.cfg, "model_name", ""))
    if trained_on and loaded.source == "official" and trained_on not in names:
        log.warning("SAE %s was trained on %s, loaded on %s (shapes fit; check this is intended)", sae.source,
                    trained_on, loaded.name)
