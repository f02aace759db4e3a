"""A minimal W3C WebDriver client (plain HTTP through httpx) for the browser tests that must act on a page, such
as clicking a token of the test box: chromedriver drives the same headless Chromium the other browser tests run.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from helpers.servers import free_port

CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class WebDriver:
    def __init__(self, chromium: str, profile: Path, width: int = 1280, height: int = 2000):
        assert CHROMEDRIVER is not None
        port = free_port()
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        try:
            self._wait_ready()
            args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", f"--user-data-dir={profile}", f"--window-size={width},{height}"]
            caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": chromium, "args": args}}
            self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except BaseException:
            self._stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("chromedriver did not start")

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        r = self.http.request(method, path, json=body)
        value = r.json()["value"]
        assert r.status_code == 200, f"{method} {path}: {value}"
        return value

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def script(self, js: str, *args: Any) -> Any:
        return self._call("POST", self._s("/execute/sync"), {"script": js, "args": list(args)})

    def wait_for(self, js: str, timeout_s: float = 30) -> Any:
        """Poll `js` (a script body that returns a value) until it returns something truthy."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = self.script(js)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {js}")

    def click(self, css: str) -> None:
        found = self._call("POST", self._s("/element"), {"using": "css selector", "value": css})
        self._call("POST", self._s(f"/element/{found[ELEMENT]}/click"), {})

    def close(self) -> None:
        try:
            self._call("DELETE", self._s(""))
        finally:
            self._stop()

    def _stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
