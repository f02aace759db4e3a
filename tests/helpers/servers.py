"""Settings, services and MCP servers over an engine, each with a data dir of the test's own (a server built on
Settings() defaults would write into the environment's SAE_MCP_DATA_DIR), and a stand-in example source; the
environment of a `sae-mcp` subprocess, the CLI in this process, and a free localhost port."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from sae_mcp.engine.runtime import Engine
from sae_mcp.index.view import View
from sae_mcp.results.corpus import Example, FeatureSummary, Histogram, TopExamples
from sae_mcp.server.tools import tool_map
from sae_mcp.services import Services
from sae_mcp.settings import Settings

from helpers.models import STORIES_CORPUS, STORIES_HF, STORIES_SAE_L3

# A `sae-mcp` subprocess: offline, one thread (a busy 2-core box stalls 50x with two).
CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stories_settings_at(data_dir: Path, *sae_dirs: Path, **fields) -> Settings:
    """Settings of a server over stories260K (its layer-3 SAE unless `sae_dirs` are given) and its TinyStories
    corpus, stores in `data_dir`; `fields` set or override the others."""
    saes = tuple(str(d) for d in sae_dirs or (STORIES_SAE_L3,))
    return Settings(**{"model": str(STORIES_HF), "saes": saes, "corpus": str(STORIES_CORPUS), "data_dir": data_dir,
                       **fields})


def services_at(engine: Engine, data_dir: Path, **services_kwargs) -> Services:
    """Services over the engine with no corpus, stores in `data_dir` (services_kwargs: examples=..., ...)."""
    return Services(engine, Settings(data_dir=data_dir), tools=tool_map(), **services_kwargs)


def server_at(engine: Engine, data_dir: Path, **build_kwargs):
    """The MCP server over the engine with no corpus, stores in `data_dir` (build_kwargs: record=False, ...)."""
    from sae_mcp.server.app import build_server

    return build_server(engine, Settings(data_dir=data_dir), **build_kwargs)


def indexed_stories_services(engine: Engine, sae_dir: Path, data_dir: Path, tokens: int = 30_000) -> Services:
    """Services over stories260K whose corpus is indexed (`tokens` of it, ~2 s), stores in `data_dir`: what the
    feature pages show from."""
    services = Services(engine, stories_settings_at(data_dir, sae_dir), tools=tool_map())
    services.examples.build_index(None, tokens)
    return services


class FakeIndex:
    """Stands in for the example source (services.examples) with its real result models: an index that exists,
    recording what was asked of it."""

    def __init__(self, key: str):
        self.key = key
        self.calls: list[str] = []

    def _summary(self, feature: int) -> dict:
        return dict(sae=self.key, feature=feature, max_activation=4.2, density=0.0123, n_fired=123,
                    tokens_scanned=10_000, histogram=Histogram(edges=[0.1, 1.0, 2.0, 4.2], counts=[100, 20, 3]))

    def feature_summary(self, sae, feature):
        self.calls.append("summary")
        return FeatureSummary(**self._summary(feature))

    def top_examples(self, sae, feature, view, *args, **kw):
        self.calls.append(f"top_examples k={view.k}")
        ex = Example(activation=4.2, token=" cat", tokens=["<s>", "the", " cat", " sat", " on"], position=2, document=0,
                     offset=1)
        return TopExamples(**self._summary(feature), source="index", corpus="fake", context_size=8, examples=[ex])

    def cached_top_examples(self, sae, feature, k=10, **kw):
        self.calls.append(f"cached_top_examples k={k}")
        return self.top_examples(sae, feature, View(k, 10))

    def densities(self, sae):
        self.calls.append("densities")
        return torch.linspace(0, 0.5, 128)

    def max_activation(self, sae, feature, max_scan_tokens=None):
        self.calls.append(f"max_activation {feature}")
        return 4.2, "index"


def volatile(tool: str) -> tuple[str, ...]:
    """The result fields a registered tool's ledger rule leaves out of the digest (none for a name not registered)."""
    from sae_mcp.ledger.rule import rule_of

    return rule_of(tool_map(), tool).volatile


def cli(*argv: str) -> tuple[int, str]:
    """`sae-mcp <argv>` run in this process -> (exit code, what it printed)."""
    from sae_mcp.cli import main as cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(list(argv))
    return rc, out.getvalue()


@contextlib.contextmanager
def serving_pages(services: Services, token: str | None = None) -> Iterator[str]:
    """The dashboard app served by uvicorn on a thread, on a loopback socket bound here (no other process can take
    the port before uvicorn listens on it); yields the base URL, and stops it afterwards. Without a token: Host/Origin
    checks and CSP on, no login."""
    import uvicorn

    from sae_mcp.server.http import dashboard_app
    from sae_mcp.server.security import HttpPolicy

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    policy = HttpPolicy(port=sock.getsockname()[1], token=token)
    server = uvicorn.Server(uvicorn.Config(dashboard_app(services, policy), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20  # a hang guard
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{policy.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
