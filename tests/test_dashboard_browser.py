"""The feature card as an HTML page, rendered by a real headless Chromium (Debian packages chromium,
chromium-driver). Skipped with the reason when no chromium binary is installed."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from sae_mcp.services import Services
from sae_mcp.settings import Settings

from conftest import free_port, only_sae

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary: apt-get install -y chromium chromium-driver to run the browser test"
)


@pytest.fixture
def dashboard(tiny_engine, tmp_path):
    """The dashboard app on a localhost port, served by uvicorn on a thread for the length of one test."""
    import uvicorn

    from sae_mcp.server.http import dashboard_app

    services = Services(tiny_engine, Settings(data_dir=tmp_path / "data"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(dashboard_app(services), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield services, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def dump_dom(url: str, profile) -> str:
    """The page's DOM after Chromium rendered it (headless, sandbox-less as root, no network besides localhost)."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--dump-dom", url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_feature_page_renders_in_chromium_with_labels_and_logit_lens(dashboard, tiny_engine, tmp_path):
    services, base = dashboard
    s = only_sae(tiny_engine)
    services.explanations.add_label(s.store_key, 6, "cats & dogs <pets>", evidence="top examples")
    dom = dump_dom(f"{base}/features/{s.key}/6", tmp_path / "profile")
    assert f"Feature 6 · {s.key}" in dom  # the dotted hook name routes as one path segment
    assert "label: cats &amp; dogs &lt;pets&gt;" in dom  # escaped: a label cannot inject markup
    assert "<table id=\"logits\">" in dom and "promotes" in dom
    assert "not indexed: call build_index" in dom
    assert "kurtosis" in dom


def test_front_page_lists_labelled_features_and_unknown_sae_is_a_404_page(dashboard, tiny_engine, tmp_path):
    services, base = dashboard
    s = only_sae(tiny_engine)
    services.explanations.add_label(s.store_key, 11, "the word park")
    dom = dump_dom(f"{base}/", tmp_path / "profile")
    assert f"/features/{s.key}/11" in dom and "the word park" in dom
    dom = dump_dom(f"{base}/features/nope/1", tmp_path / "profile2")
    assert "unknown SAE 'nope'" in dom
