"""The upload page in a real headless Chromium: pick the model, upload an image, read the top-1 label.

Chromium is driven over the DevTools protocol with a tiny standard-library
WebSocket client (no extra dependency, works offline). Needs Debian's
`chromium` package (`make browser` installs it); skipped when it is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from urllib.parse import urlparse

import pytest

from factories import shared_export
from test_server import start

import httpx  # noqa: E402  (the test extra)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(autouse=True)
def chromium_is_installed():
    assert CHROMIUM, "Chromium is missing: make test installs it (make browser, apt-get install chromium)"


class DevTools:
    """Just enough of RFC 6455 to send DevTools commands and read their replies."""

    def __init__(self, ws_url: str, timeout: float = 60):
        url = urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _message(self) -> dict:
        payload = b""
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            data = self._read(length)
            opcode = first & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            if opcode in (0x9, 0xA):  # ping/pong: nothing to do for a short session
                continue
            payload += data
            if first & 0x80:
                return json.loads(payload)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        body = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(body) < 126:
            header += bytes([0x80 | len(body)])
        elif len(body) < 65536:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(body))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(body))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample_dir):
    exported = shared_export(tmp_path_factory, sample_dir)
    base = tmp_path_factory.mktemp("browser")
    server = start(exported["root"], log=base / "server.log")
    yield server
    server.stop()


@pytest.fixture
def chromium(tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking", "--disable-component-update", "--no-first-run",
                             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail("chromium exited at start-up")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_upload_page_shows_the_top1_label_for_a_sample_image(server, chromium, sample_dir):
    image = sorted(sample_dir.glob("circles/*.png"))[0]
    expected = httpx.post(f"{server.url}/api/models/shapes/predict?top_k=3",
                          files={"file": (image.name, image.read_bytes())}).json()["results"][0]["top_k"]

    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=server.url + "/")
    chromium.wait_for("document.body && document.body.dataset.models === '1'")
    assert chromium.evaluate("document.getElementById('model').value") == "shapes"
    root = chromium.call("DOM.getDocument")["root"]["nodeId"]
    node = chromium.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    chromium.call("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
    chromium.evaluate("document.getElementById('topk').value = '3'; document.getElementById('submit').click(); 1")
    state = chromium.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
    assert state == "done", chromium.evaluate("document.getElementById('status').textContent")

    top1 = chromium.evaluate("document.getElementById('top1').textContent")
    labels = chromium.evaluate("[...document.querySelectorAll('#results .label')].map(e => e.textContent)")
    widths = chromium.evaluate("[...document.querySelectorAll('#results .bar')].map(e => e.style.width)")
    assert top1 == expected[0]["label"]
    assert labels == [p["label"] for p in expected]
    assert all(w.endswith("%") and abs(float(w[:-1]) - 100 * p["probability"]) <= 0.051
               for w, p in zip(widths, expected))


def test_upload_page_before_an_upload_shows_no_empty_top1_fits_top_k_and_previews_the_image(server, chromium,
                                                                                             sample_dir):
    """Issue 21: no empty 'Top-1:' before any upload, top-k at most the class count, a preview of the image."""
    chromium.call("Page.enable")
    chromium.call("Page.navigate", url=server.url + "/")
    chromium.wait_for("document.body && document.body.dataset.models === '1'")
    visible = "(id) => { const e = document.getElementById(id); return !!e && e.getClientRects().length > 0; }"
    assert chromium.evaluate(f"({visible})('top1row')") is False
    assert chromium.evaluate("document.body.innerText").count("Top-1") == 0
    assert chromium.evaluate("[document.getElementById('topk').value, document.getElementById('topk').max]") == \
        ["3", "3"]  # the model has 3 classes: the default of 5 is cut to 3
    assert chromium.evaluate(f"({visible})('preview')") is False
    image = sorted(sample_dir.glob("squares/*.png"))[0]
    root = chromium.call("DOM.getDocument")["root"]["nodeId"]
    node = chromium.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    chromium.call("DOM.setFileInputFiles", files=[str(image)], nodeId=node)
    size = chromium.wait_for("(() => { const p = document.getElementById('preview');"
                             " return p.complete && p.naturalWidth > 0 && [p.naturalWidth, p.naturalHeight]; })()")
    from PIL import Image

    assert tuple(size) == Image.open(image).size  # the chosen file itself, decoded by the browser
    assert chromium.evaluate(f"({visible})('preview')") is True
    assert chromium.evaluate(f"({visible})('top1row')") is False  # still nothing classified
