"""Headless Chromium driven over its DevTools pipe: open a page, read its text, take a screenshot.

Chromium's `--remote-debugging-pipe` speaks the DevTools protocol over two file descriptors (3:
commands in, 4: events and answers out, messages separated by NUL bytes), so nothing listens on a
port and nothing beyond the standard library and Debian's `chromium` package is needed (Playwright
and Selenium do the same over the same pipe). Used by scripts/dashboard_check.py.

    with Browser() as browser:
        page = browser.new_page(width=1600, height=1000)
        page.goto("http://127.0.0.1:8265/#/actors")
        text = page.wait_for_text(lambda t: "ALIVE" in t, timeout_s=60)
        page.screenshot("actors.png")
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("no Chromium found: scripts/install_browser_tools.sh installs Debian's `chromium`")


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process with a throwaway profile, closed (and its profile removed) on exit."""

    def __init__(self, executable: str | None = None, timeout_s: float = 30):
        self.timeout_s = timeout_s
        self.profile = tempfile.mkdtemp(prefix="raylhf-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            executable or find_chromium(),
            "--headless=new",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--hide-scrollbars",
            "about:blank",
        ]
        if os.geteuid() == 0:
            # Chromium refuses to start as root with its sandbox on. The pages opened here are our own
            # dashboard on 127.0.0.1; run the check as a non-root user to keep the sandbox.
            args.insert(1, "--no-sandbox")

        def pipe_fds():  # in the child: the protocol wants the pipe ends on fds 3 and 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pipe_fds,
            pass_fds=(3, 4),  # kept open after pipe_fds (every other fd is closed)
            start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []

    # ---------------------------------------------------------------- protocol
    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            for reply in self._read(deadline):
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise BrowserError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
                self.events.append(reply)

    def _read(self, deadline: float) -> list[dict]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"Chromium did not answer within {self.timeout_s:.0f} s")
        ready, _, _ = select.select([self._from_browser], [], [], left)
        if not ready:
            return []
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
            err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.stderr else ""
            raise BrowserError(f"Chromium exited (status {self.proc.poll()}): {err}")
        self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        return [json.loads(m) for m in messages if m]

    def new_page(self, width: int = 1600, height: int = 1000) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.call("Page.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close")
                except (BrowserError, OSError):
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._to_browser, self._from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session)

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def reload(self) -> None:
        self.call("Page.reload", {"ignoreCache": True})

    def text(self) -> str:
        """The page's visible text ('' while a navigation replaces the document)."""
        try:
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        except BrowserError:  # e.g. "Execution context was destroyed" mid-navigation
            return ""

    def wait_for_text(self, ready: Callable[[str], bool], timeout_s: float = 60, poll_s: float = 1) -> str:
        """The page's visible text once `ready(text)` holds; raises with the last text otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text()
            if ready(text):
                return text
            if time.monotonic() > deadline:
                raise BrowserError(f"page not ready within {timeout_s:.0f} s; its text:\n{text[:3000]}")
            time.sleep(poll_s)

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out
