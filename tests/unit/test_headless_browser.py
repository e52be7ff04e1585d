"""scripts/headless_browser.py drives a real headless Chromium over its DevTools pipe (no port):
page text after scripts ran, a JavaScript value, a screenshot. Skipped where Chromium is not
installed (CI); scripts/install_browser_tools.sh installs it."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from headless_browser import Browser, BrowserError

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="needs chromium: scripts/install_browser_tools.sh")

PAGE = "data:text/html,<h1>raylhf</h1><script>setTimeout(() => document.body.append('rendered later'), 300)</script>"


def test_page_text_script_value_and_screenshot(tmp_path):
    with Browser(timeout_s=30) as browser:
        page = browser.new_page(width=640, height=360)
        page.goto(PAGE)
        text = page.wait_for_text(lambda t: "rendered later" in t, timeout_s=20)
        assert text.startswith("raylhf")
        assert page.evaluate("Promise.resolve(6 * 7)") == 42
        shot = page.screenshot(tmp_path / "page.png").read_bytes()
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(shot[16:20], "big") == 640  # the PNG's width: the viewport asked for
        with pytest.raises(BrowserError, match="not ready within"):
            page.wait_for_text(lambda t: "never" in t, timeout_s=1)
    assert browser.proc.poll() is not None and not Path(browser.profile).exists()  # closed, profile removed
