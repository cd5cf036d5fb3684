"""Headless Chromium driven over the Chrome DevTools Protocol: open a page, wait for what it shows, read its DOM,
record its network requests, take a screenshot. Debian's `chromium` package (installed by .ci/run)."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import requests
import websocket

SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"  # git-ignored


def chromium() -> str:
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    assert found, "no Chromium: install Debian's `chromium` package (.ci/run does)"
    return found


class Browser:
    def __init__(self, width: int = 1280, height: int = 900):
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        self.process = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             # A sandboxed frame in this process, where evaluate_in_frame reaches it (rendering is the same).
             "--disable-features=IsolateSandboxedIframes",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile.name, "DevToolsActivePort")
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert self.process.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        page = next(t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                    if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        sent = next(self.ids)
        self.socket.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == sent:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})
            self.events.append(message)

    def open(self, url: str, timeout: float = 60) -> None:
        """Load `url` as a new document: from a blank page, so that nothing of the page before (a single-page app
        still fetching) is counted as this one's."""
        for target in ("about:blank", url):
            self.events.clear()
            self.call("Page.navigate", url=target)
            self._until(lambda: any(e.get("method") == "Page.loadEventFired" for e in self.events), timeout, target)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def evaluate_in_frame(self, expression: str):
        """Evaluate in the page's first child frame, whatever its origin (a sandboxed frame's is opaque)."""
        frame = self.call("Page.getFrameTree")["frameTree"]["childFrames"][0]["frame"]["id"]
        context = self.call("Page.createIsolatedWorld", frameId=frame)["executionContextId"]
        result = self.call("Runtime.evaluate", expression=expression, contextId=context, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        """Poll a JavaScript expression until it is truthy (a single-page app renders after the load event)."""
        found = []
        self._until(lambda: found.append(self.evaluate(expression)) or found[-1], timeout, expression)
        return found[-1]

    def _until(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
            self.socket.settimeout(0.2)
            try:
                self.events.append(json.loads(self.socket.recv()))
            except websocket.WebSocketTimeoutException:
                pass
            finally:
                self.socket.settimeout(60)

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def failures(self) -> list[str]:
        """Requests that failed or got a server error, and errors the page's scripts raised."""
        found = [f"{e['params'].get('errorText')}: request {e['params'].get('requestId')}" for e in self.events
                 if e.get("method") == "Network.loadingFailed" and not e["params"].get("canceled")]
        found += [f"{e['params']['response']['status']} {e['params']['response']['url']}" for e in self.events
                  if e.get("method") == "Network.responseReceived" and e["params"]["response"]["status"] >= 500]
        found += [e["params"]["exceptionDetails"].get("text", "") for e in self.events
                  if e.get("method") == "Runtime.exceptionThrown"]
        return found

    def screenshot(self, name: str, full_page: bool = True) -> Path:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"] if full_page else None
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 8000), "scale": 1} if size else None
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page,
                         **({"clip": clip} if clip else {}))
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.kill()
            self.process.wait()
            self.profile.cleanup()
