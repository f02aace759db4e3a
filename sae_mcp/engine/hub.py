"""The Hugging Face hub as one explicit object: is it reachable, and make hub calls fail fast when it is not.

Measured offline: `HookedSAETransformer.from_pretrained` and `SAE.from_pretrained` retry for ~23 s before failing,
~1.5 s with huggingface_hub's offline mode on. So a Hub probes the hub once (a 2 s TCP connect), and
`fail_fast()` turns the libraries' offline mode on for the calls inside it when the probe failed: a populated
cache still works, a missing file fails at once with a message naming what to download. The switch is scoped to
the block (the libraries read module globals, so it is process-wide while the block runs), never left behind.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import sys
import threading
from collections.abc import Iterator

TRUE = ("1", "true", "True", "YES", "yes", "ON", "on")


class Hub:
    """Reachability of huggingface.co, probed at most once per object; HF_HUB_OFFLINE=1 means unreachable."""

    def __init__(self, timeout_s: float = 2.0, host: str = "huggingface.co"):
        self.timeout_s = timeout_s
        self.host = host
        self._reachable: bool | None = None
        self._lock = threading.Lock()
        self._depth = 0  # nested or concurrent fail_fast blocks: the first in switches offline mode on
        self._saved: tuple[str | None, dict[str, bool]] | None = None

    @property
    def reachable(self) -> bool:
        if os.environ.get("HF_HUB_OFFLINE", "") in TRUE:  # the user's choice (or our own fail_fast block)
            return False
        with self._lock:
            if self._reachable is None:
                try:
                    with socket.create_connection((self.host, 443), timeout=self.timeout_s):
                        self._reachable = True
                except OSError:
                    self._reachable = False
            return self._reachable

    @contextlib.contextmanager
    def fail_fast(self) -> Iterator[None]:
        """Hub calls inside fail at once (or read the cache) when the hub is unreachable, instead of retrying."""
        if self.reachable:
            yield
            return
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._saved = (os.environ.get("HF_HUB_OFFLINE"), _offline_flags())
                os.environ["HF_HUB_OFFLINE"] = "1"
                _set_offline_flags({name: True for name in self._saved[1]})
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._saved is not None:
                    env, flags = self._saved
                    if env is None:
                        os.environ.pop("HF_HUB_OFFLINE", None)
                    else:
                        os.environ["HF_HUB_OFFLINE"] = env
                    _set_offline_flags(flags)
                    self._saved = None


# Module globals the libraries read their offline mode from (huggingface_hub's is_offline_mode() returns the
# first; transformers asks huggingface_hub; datasets keeps its own copy, read from the environment at import).
_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"))


def _offline_flags() -> dict[str, bool]:
    importlib.import_module("huggingface_hub.constants")  # always installed: transformers and sae-lens need it
    return {mod: bool(getattr(sys.modules[mod], attr)) for mod, attr in _FLAGS if mod in sys.modules}


def _set_offline_flags(flags: dict[str, bool]) -> None:
    for mod, attr in _FLAGS:
        if mod in flags and mod in sys.modules:
            setattr(sys.modules[mod], attr, flags[mod])


def hf_file_cached(repo_id: str, filename: str) -> bool:
    """Whether `filename` of the hub repo `repo_id` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:
        return False
