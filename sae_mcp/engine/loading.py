"""Model sources -> LoadedModel, and the checks that a model and its SAEs belong together.

A model is a transformer-lens official name (fetched and cached by Hugging Face) or a local Hugging Face folder,
converted with transformer-lens' own config and weight converters. It is processed as its SAEs were trained
(processing_for). Offline, every hub call runs inside `Hub.fail_fast()` (engine/hub.py): a populated cache still
works and a missing file fails at once with a message naming what to download (preflight_offline names all of
them in one error). Only safetensors weights are read; remote code is never trusted.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sae_mcp.engine import memory
from sae_mcp.engine.hub import Hub, hf_file_cached
from sae_mcp.engine.saes import LoadedSAE, parse_release_id, sae_cached, split_alias
from sae_mcp.errors import LoadError

if TYPE_CHECKING:  # sae-lens imports slowly: only the type is needed here
    from sae_lens import HookedSAETransformer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: HookedSAETransformer
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
DEFAULT_PROCESSING = {
    "fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True,
}


def processing_for(saes: list[LoadedSAE]) -> dict:
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


@dataclass(frozen=True)
class Placement:
    """Where the model goes: the device, how many GPUs its blocks are split over (transformer-lens' n_devices),
    and the SAEs' (d_in, d_sae), to check before loading that everything fits (engine/memory.py)."""

    device: str
    n_devices: int = 1
    sae_shapes: tuple[tuple[int, int], ...] = ()


def load_model(spec: str, device: str, dtype: torch.dtype, processing: dict | None = None,
               hub: Hub | None = None, placement: Placement | None = None) -> LoadedModel:
    """Load `spec` (official name or local HF folder) as a HookedSAETransformer on `device`, with the weight
    `processing` (default: transformer-lens' own, DEFAULT_PROCESSING). With `placement`, the model's memory (with
    its SAEs and a scan's state) is checked against the device's free memory first, and split over n_devices."""
    processing = {**DEFAULT_PROCESSING, **(processing or {})}
    placement = placement or Placement(device)
    if is_local_model_dir(spec):
        return _load_local_model(Path(spec).expanduser().resolve(), dtype, processing, placement)
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
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    with hub.fail_fast():
        cfg = get_pretrained_model_config(official, device=device, n_devices=placement.n_devices, dtype=dtype)
    memory.check_fits(memory.estimate(cfg, list(placement.sae_shapes), dtype), device, placement.n_devices, spec,
                      dtype)
    try:
        with hub.fail_fast():
            model = HookedSAETransformer.from_pretrained(spec, device=device, dtype=dtype,
                                                         n_devices=placement.n_devices, **processing)
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
            + ". To try sae-mcp offline now, run the bundled demo: sae-mcp serve --demo"
        )


def _load_local_model(folder: Path, dtype: torch.dtype, processing: dict, placement: Placement) -> LoadedModel:
    """Local HF folder -> transformer-lens: its own config builder and weight converter, safetensors only."""
    from sae_lens import HookedSAETransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")):
        raise LoadError(f"--model {folder}: no *.safetensors weights found; sae-mcp never unpickles .bin weights")
    device = placement.device
    try:
        cfg = get_pretrained_model_config(str(folder), fold_ln=processing["fold_ln"], device=device, dtype=dtype,
                                          n_devices=placement.n_devices)
    except Exception as exc:
        raise LoadError(f"could not read the config of the local model {folder}: {type(exc).__name__}: {exc}") from exc
    memory.check_fits(memory.estimate(cfg, list(placement.sae_shapes), dtype), device, placement.n_devices,
                      folder.name, dtype)
    try:
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
    if placement.n_devices > 1:
        model.move_model_modules_to_device()  # blocks split over cuda:0..n-1, as cfg.n_devices says
    else:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, name=folder.name, source=str(folder), architecture=cfg.original_architecture or "",
                       processing=processing)


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
