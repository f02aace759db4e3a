"""Engine: owns the device, the loaded model and SAEs, one worker lock, cancellation and hook hygiene.

The MCP SDK runs plain `def` tools on worker threads, possibly concurrently, so every piece of device work goes
through `Engine.device_work()`: a fair queue for the device (admission.py: first come first served, `Busy` at once
beyond `Limits.max_queued` waiters or after `Limits.busy_timeout_s`, leaving the queue when its call is
abandoned), and on the way out, whatever happened, the model is left with no hooks and no SAEs attached.

What needs the device lock: anything that runs the model, because hooks and spliced SAEs are attached to the one
shared model and a concurrent forward would run through them. Weight-only reads (W_dec @ W_U: the logit lens,
logit-weight moments) attach nothing and run no forward, so they need no lock (see logits.project_to_vocab).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sae_mcp.engine import fast_encode, fast_forward
from sae_mcp.engine.admission import (
    DeviceQueue,
    QueueStatus,
    call_abandoned,
    cap_malloc_arenas,
    is_continuation,
    mark_admitted,
)
from sae_mcp.engine.corpus import private_tokenizer
from sae_mcp.engine.devices import check_n_devices, dtype_name, resolve_device, resolve_dtype
from sae_mcp.engine.hub import Hub
from sae_mcp.engine.loading import (
    LoadedModel,
    Placement,
    check_compatible,
    load_model,
    preflight_offline,
    processing_for,
)
from sae_mcp.engine.pieces import shown_piece
from sae_mcp.engine.saes import LoadedSAE, load_sae, split_alias
from sae_mcp.errors import Cancelled, InvalidInput, LoadError, NotFound
from sae_mcp.results import ModelInfo, SaeInfo
from sae_mcp.settings import Limits, Settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
"""Forward hooks as transformer-lens' HookedRootModule.hooks takes them: (a hook's name, or a filter on names;
fn(value, hook) -> the value that flows on, or None to keep it). Its own element type: a list is invariant."""


def position_index(position: int, seq_len: int, what: str = "the prompt") -> int:
    """One token position (negative counts from the end) -> its index in 0..seq_len-1, or a clear error."""
    if not -seq_len <= int(position) < seq_len:
        raise InvalidInput(
            f"position {position} is out of range: {what} has {seq_len} tokens (use 0..{seq_len - 1}, or "
            f"-{seq_len}..-1 counting from the end)"
        )
    return int(position) % seq_len


def resolve_positions(position: int | Sequence[int] | None, seq_len: int, what: str = "the prompt") -> list[int]:
    """None = every position; an int or a list of ints (negative counts from the end) -> sorted unique indices."""
    if position is None:
        return list(range(seq_len))
    items = [position] if isinstance(position, int) else list(position)
    if not items:
        raise InvalidInput("position is an empty list; omit it for every position, or list some")
    return sorted({position_index(p, seq_len, what) for p in items})


def context_warning(sae: LoadedSAE, n_tokens: int) -> str | None:
    """A warning when a prompt is longer than the contexts the SAE was trained on (still answered)."""
    if not sae.context_size or n_tokens <= sae.context_size:
        return None
    return (f"the prompt is {n_tokens} tokens but SAE {sae.key} was trained on {sae.context_size}-token contexts: "
            f"its activations from position {sae.context_size} on are out of its training distribution; shorten "
            "the prompt to trust them")


@dataclass
class CancelToken:
    """Checked by long work between batches/steps; `cancel()` from any thread."""

    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("the operation was cancelled; nothing was stored from the unfinished batch")


class Engine:
    """The loaded model + SAEs on one device. Engine functions (features.py, logits.py, ...) take it first."""

    def __init__(self, model: LoadedModel, saes: list[LoadedSAE], device: str, limits: Limits | None = None,
                 hub: Hub | None = None):
        self.loaded_model = model
        self.hub = hub or Hub()
        """The hub as this engine's loads saw it; corpus scans that stream a dataset ask it too."""
        self.model = model.model
        self.corpus_tokenizer = private_tokenizer(self.model.tokenizer)
        """The tokenizer's copy that corpus reading uses: tools' calls on the shared one change its padding."""
        self.device = device
        self.limits = limits or Limits()
        self.saes: dict[str, LoadedSAE] = {}
        for s in saes:
            if s.key in self.saes:
                raise LoadError(
                    f"two SAEs are addressed as {s.key!r}; give one an alias: --sae ALIAS={s.source}"
                )
            self.saes[s.key] = s
        self._lock = DeviceQueue()  # Lock-compatible acquire()/release(); device_work() admits fairly
        for p in self.model.parameters():
            p.requires_grad_(False)
        for s in self.saes.values():
            for p in s.sae.parameters():
                p.requires_grad_(False)

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_settings(cls, settings: Settings) -> "Engine":
        cap_malloc_arenas()  # a server's many worker threads would otherwise grow its RSS (admission.py)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype)
        hub = Hub()
        preflight_offline(settings.model, list(settings.saes), hub)
        # SAEs first: they say how the model's weights must be processed for their activations to match training.
        saes = []
        for spec in settings.saes:
            alias, source = split_alias(spec)
            s = load_sae(source, device, dtype, hub)
            if alias:
                s.key = alias
            saes.append(s)
        placement = Placement(device, check_n_devices(device, settings.n_devices),
                              tuple((s.d_in, s.d_sae) for s in saes))
        model = load_model(settings.model, device, dtype, processing_for(saes), hub, placement)
        for s in saes:
            check_compatible(model, s)
        return cls(model, saes, device, settings.limits, hub)

    # -- addressing ---------------------------------------------------------------------------------------------

    def sae(self, key: str | None) -> LoadedSAE:
        """Resolve `sae` as a tool gives it: hook name or alias; optional when exactly one SAE is loaded."""
        if key is None or key == "":
            if len(self.saes) == 1:
                return next(iter(self.saes.values()))
            if not self.saes:
                raise NotFound("no SAE is loaded; start the server with --sae RELEASE/SAE_ID or a local SAE folder")
            raise InvalidInput(f"several SAEs are loaded; pass sae= one of: {', '.join(self.saes)}")
        if key in self.saes:
            return self.saes[key]
        by_hook = [s for s in self.saes.values() if s.hook_name == key]
        if len(by_hook) == 1:
            return by_hook[0]
        raise NotFound(f"unknown SAE {key!r}; loaded SAEs: {', '.join(self.saes) or '(none)'}")

    def check_feature(self, sae: LoadedSAE, feature: int) -> int:
        if not 0 <= feature < sae.d_sae:
            raise InvalidInput(
                f"feature {feature} is out of range: SAE {sae.key} has {sae.d_sae} features (0..{sae.d_sae - 1})"
            )
        return feature

    def check_features(
        self, sae: LoadedSAE, features: Sequence[int] | None, most: int | None = None, *, required: bool = False,
        unique: bool = False,
    ) -> list[int]:
        """Validate a list of feature indices for `sae`: count (at most `most`, default the per-call limit),
        optionally non-empty and without repeats, each in range. Returns them as ints."""
        features = [int(f) for f in (features or [])]
        most = self.limits.max_features_per_call if most is None else most
        if required and not features:
            raise InvalidInput("no features given; pass at least one feature index")
        if len(features) > most:
            raise InvalidInput(f"{len(features)} features given; at most {most} per call")
        if unique and len(set(features)) != len(features):
            raise InvalidInput(f"features {features} repeat an index; list each feature once")
        for f in features:
            self.check_feature(sae, f)
        return features

    # -- tokens -------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (transformer-lens leaves it None only for a model built without one, which no
        load_model source is)."""
        tok = self.model.tokenizer
        if tok is None:
            raise LoadError("the model has no tokenizer")
        return tok

    def decode(self, ids: list[int]) -> str:
        """Token ids -> their text, as the tokenizer writes it."""
        text = self.tokenizer.decode(ids)
        assert isinstance(text, str)  # a list only for a batch of sequences
        return text

    def to_tokens(self, prompt: str, prepend_bos: bool = True) -> torch.Tensor:
        """prompt -> [1, seq] token ids on the device, BOS prepended when asked; bad prompts get clear errors."""
        if not isinstance(prompt, str) or prompt.strip() == "":
            raise InvalidInput("the prompt is empty; pass some text")
        tokens = self.model.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
        n_ctx = self.model.cfg.n_ctx
        if tokens.shape[1] > n_ctx:
            raise InvalidInput(
                f"the prompt is {tokens.shape[1]} tokens long but the model's context is {n_ctx}; shorten it"
            )
        if tokens.shape[1] == 0:
            raise InvalidInput("the prompt tokenizes to nothing; pass some text")
        return tokens

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        """[seq] or [1, seq] ids -> one string per token, as the tokenizer writes it: each token decoded alone, put
        right where that loses what the token is (a SentencePiece leading space, part of a multi-byte character,
        an ASCII byte piece: pieces.shown_piece)."""
        ids = [int(i) for i in tokens.reshape(-1).tolist()]
        pieces = self.tokenizer.convert_ids_to_tokens(ids)
        return [shown_piece(self.decode([i]), piece) for i, piece in zip(ids, pieces)]

    # -- device work --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def device_work(self, timeout_s: float | None = None) -> Iterator[None]:
        """Serialise device work; after it (success or failure) no hooks and no SAEs stay attached.

        A call's first device work queues under the limits (Busy at once beyond max_queued waiters, or after the
        timeout). Its later device work (a scan takes the device per batch, so other calls run in between) is a
        continuation: it queues again at the back, fairly, but is never refused, so a scan admitted once is not
        broken off half-way by Busy. Any wait ends with Cancelled when the call is abandoned."""
        if is_continuation():
            self._lock.admit(None, None, call_abandoned)
        else:
            timeout = self.limits.busy_timeout_s if timeout_s is None else timeout_s
            self._lock.admit(timeout, self.limits.max_queued, call_abandoned)
            mark_admitted()
        try:
            yield
        finally:
            try:
                self.clean_model()
            finally:
                self._lock.release()

    def device_status(self) -> QueueStatus:
        """Whether the device is held and for how long, and how many calls wait for it."""
        return self._lock.status()

    def clean_model(self) -> None:
        """Detach everything. Order matters: sae-lens' reset_saes() before reset_hooks() leaves a hook on the SAE's
        own hook point (a later standalone encode would still be ablated), so hooks first, then SAEs, then the
        SAEs' own hooks."""
        self.model.reset_hooks(including_permanent=False)
        if getattr(self.model, "acts_to_saes", None):
            self.model.reset_saes()
            self.model.reset_hooks(including_permanent=False)
        for s in self.saes.values():
            s.sae.reset_hooks()

    def is_clean(self) -> bool:
        """No hooks on any hook point of the model or the SAEs, and no SAE spliced in."""
        if getattr(self.model, "acts_to_saes", None):
            return False
        modules = list(self.model.hook_dict.values())
        for s in self.saes.values():
            modules += list(s.sae.hook_dict.values())
        return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in modules)

    def forward_to_hook(self, tokens: torch.Tensor, sae: LoadedSAE) -> torch.Tensor:
        """[batch, seq] -> the model's activations at the SAE's hook [batch, seq, d_in]; stops after its layer."""
        # An explicit all-ones mask: with a left-padding tokenizer whose pad id is EOS (Llama-style),
        # transformer-lens would otherwise mask every literal EOS token of the prompt.
        mask = torch.ones_like(tokens)
        n_blocks = fast_forward.blocks_to_run(sae.hook_name)  # None: not a residual-stream hook
        with torch.inference_mode():
            if n_blocks is not None and fast_forward.supported(self.model, sae.hook_name):
                # Residual-stream hooks of pre-norm decoders: transformer-lens' modules with fused attention
                # (fast_forward.py; equal up to float rounding, tests/test_fast_forward.py).
                return fast_forward.resid(self.model, tokens, n_blocks)
            if sae.hook_name == f"blocks.{sae.layer}.hook_resid_pre":
                # The residual stream before block L is what the forward returns when it stops there (blocks
                # 0..L-1 run); reaching the hook point through the cache runs block L too. The same operations, so
                # equal to the cached value (bit-equal on this CPU; tests/test_forward_to_hook.py); measured
                # 1.7-1.9x faster on stories260K (CPU, 48 windows of 128, layers 1 and 3).
                return self.model(tokens, stop_at_layer=sae.layer, attention_mask=mask)
            _, cache = self.model.run_with_cache(
                tokens, names_filter=[sae.hook_name], stop_at_layer=sae.layer + 1, attention_mask=mask,
            )
        act = cache[sae.hook_name]
        if act.ndim == 4:  # hook_z: [batch, seq, n_heads, d_head] -> flattened, as sae-lens trains on it
            act = act.flatten(-2)
        return act

    def encode(self, sae: LoadedSAE, acts: torch.Tensor, out: torch.Tensor | None = None,
               on_block: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
        """[..., d_in] -> SAE post-activation feature values [..., d_sae] (the hook_sae_acts_post values): sae-lens'
        encode, computed in place for ReLU / JumpReLU / TopK SAEs (fast_encode.py; `out`: a buffer to reuse;
        `on_block(rows, first_row)`: handed each finished block of rows, as fast_encode.encode says)."""
        with torch.inference_mode():
            return fast_encode.encode(sae.sae, acts.to(sae.sae.dtype), out, on_block)


def model_info(engine: Engine) -> ModelInfo:
    """The loaded model and every SAE, as model_info serves them."""
    cfg = engine.model.cfg
    return ModelInfo(
        model=engine.loaded_model.name,
        source=engine.loaded_model.source,
        architecture=engine.loaded_model.architecture,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
        n_ctx=cfg.n_ctx,
        d_vocab=cfg.d_vocab,
        device=str(engine.device),
        dtype=dtype_name(cfg.dtype),
        processing=dict(engine.loaded_model.processing),
        saes=[
            SaeInfo(
                key=s.key,
                hook_name=s.hook_name,
                layer=s.layer,
                d_in=s.d_in,
                d_sae=s.d_sae,
                architecture=s.architecture,
                source=s.source,
                release=s.release,
                sae_id=s.sae_id,
                neuronpedia_id=s.neuronpedia_id,
                prepend_bos=s.prepend_bos,
                context_size=s.context_size,
                dataset_path=s.dataset_path,
            )
            for s in engine.saes.values()
        ],
    )
