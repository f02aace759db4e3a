"""Headless Chromium (Debian packages chromium, chromium-driver) on the pages the tests serve: None where no binary
is installed, and the tests that need it skip with the reason."""

from __future__ import annotations

import shutil
import subprocess

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
NO_CHROMIUM = "no chromium binary: apt-get install -y chromium chromium-driver to run the browser test"


def chromium(url: str, profile, *args: str, wait_ms: int = 0) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` (sandbox-less as root, no network besides localhost); `wait_ms` of virtual time
    lets the page's script fetch and render before the DOM is dumped or the screenshot taken."""
    assert CHROMIUM is not None, NO_CHROMIUM
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
    ]
    if wait_ms:
        cmd.append(f"--virtual-time-budget={wait_ms}")
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def dump_dom(url: str, profile, wait_ms: int = 0) -> str:
    """The page's DOM after Chromium rendered it (and ran its script for `wait_ms` of virtual time)."""
    return chromium(url, profile, "--dump-dom", wait_ms=wait_ms).stdout
