"""tl-app serve under hostile or unlucky clients, over real HTTP on loopback (a server in a subprocess).

Pixel budgets (a small PNG that decodes to gigabytes), client disconnects,
a latest version deleted under load, a half-copied version that completes,
a version symlink out of the root, slow headers and bodies, the shape of
every error, the Host check and the pixel limit of the model card.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from test_server import Server, raw_request  # noqa: E402

NO_AUTH: dict = {}


def image_bytes(width: int, height: int, fmt: str = "PNG", noise: bool = False) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    if noise:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    else:
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[: height // 2, : width // 2] = (200, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def predict_body(*images: bytes, **extra) -> dict:
    return {"instances": [b64(d) for d in images], **extra}


def copy_version(exported, target: Path, without=()) -> Path:
    shutil.copytree(exported["version_dir"], target, ignore=shutil.ignore_patterns("*.tflite", *without))
    return target


@pytest.fixture(scope="module")
def limited(exported, tmp_path_factory):
    """shapes/1, shapes/2 and 'tiny' (whose card caps images at 10,000 pixels), with small budgets and timeouts."""
    base = tmp_path_factory.mktemp("limits")
    root = base / "models"
    for version in ("1", "2"):
        copy_version(exported, root / "shapes" / version)
    card_file = copy_version(exported, root / "tiny" / "1") / "model_card.json"
    card = json.loads(card_file.read_text())
    card.setdefault("config", {}).setdefault("data", {})["max_pixels"] = 10_000
    card_file.write_text(json.dumps(card))
    server = Server(root, "--grpc-port", "0", "--image-pixels", "1000000", "--inflight-pixels", "2000000",
                    "--header-timeout", "1", "--body-timeout", "1", "--poll-seconds", "0.3", log=base / "server.log")
    server.root, server.base = root, base
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(limited):
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        yield c


def metric(client, pattern: str) -> float:
    text = client.get("/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(r"(?m)^" + pattern + r"[^\n]* ([0-9.e+]+)$", text))


# ---- 1. pixel budget ---------------------------------------------------------------------------
def test_an_image_over_the_decode_budget_is_a_413_unless_jpeg_can_shrink_while_decoding(client):
    big_png = image_bytes(2000, 1000)  # 2 MP > --image-pixels 1 MP; a few KB on the wire
    response = client.post("/v1/models/shapes:predict", json=predict_body(big_png))
    assert response.status_code == 413, response.text
    assert "--image-pixels" in response.json()["error"] and "2000x1000" in response.json()["error"]
    big_jpeg = image_bytes(2000, 1000, "JPEG")  # draft mode decodes it at 1/2 scale: 1000x500
    response = client.post("/v1/models/shapes:predict", json=predict_body(big_jpeg))
    assert response.status_code == 200, response.text
    small = image_bytes(1000, 500, "JPEG")
    expected = client.post("/v1/models/shapes:predict", json=predict_body(small)).json()["predictions"][0]
    got = response.json()["predictions"][0]
    assert np.allclose(got["probabilities"], expected["probabilities"], atol=0.05)


def test_a_request_whose_images_together_exceed_the_inflight_budget_is_a_413(client):
    images = [image_bytes(1000, 900)] * 3  # 0.9 MP each, 2.7 MP together > --inflight-pixels 2 MP
    response = client.post("/v1/models/shapes:predict", json=predict_body(*images))
    assert response.status_code == 413 and "--inflight-pixels" in response.json()["error"]
    assert client.post("/v1/models/shapes:predict", json=predict_body(*images[:2])).status_code == 200


@pytest.mark.slow
def test_memory_after_a_burst_of_large_images_returns_near_the_baseline(exported, tmp_path):
    """16 concurrent 15-megapixel PNGs (a few KB each): peak and after-burst memory stay bounded."""
    import psutil

    root = tmp_path / "models"
    copy_version(exported, root / "shapes" / "1")
    server = Server(root, "--grpc-port", "0", "--image-pixels", "16000000", "--inflight-pixels", "32000000",
                    log=tmp_path / "server.log")
    try:
        process = psutil.Process(server.proc.pid)
        big = image_bytes(3900, 3900)
        url = server.url + "/v1/models/shapes:predict"
        assert httpx.post(url, json=predict_body(big), timeout=120).status_code == 200  # warm: graph, allocator
        time.sleep(0.5)
        baseline = process.memory_info().rss
        peak = [baseline]

        def post(_):
            return httpx.post(url, json=predict_body(big), timeout=300).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(post, i) for i in range(16)]
            while not all(f.done() for f in futures):
                peak.append(process.memory_info().rss)
                time.sleep(0.05)
            codes = [f.result() for f in futures]
        assert codes == [200] * 16
        time.sleep(1.0)
        after = process.memory_info().rss
        mb = 1024 * 1024
        print(f"baseline {baseline / mb:.0f} MB, peak {max(peak) / mb:.0f} MB, after {after / mb:.0f} MB")
        # --inflight-pixels 32 MP: two such images decode at a time (~0.65 GB each in the graph), not sixteen
        assert (max(peak) - baseline) < 1700 * mb, "the pixel budget must bound the peak"
        assert (after - baseline) < 300 * mb, "memory must be given back after the burst"
    finally:
        server.stop()


# ---- 2. disconnects ------------------------------------------------------------------------------
def test_a_client_that_disconnects_is_a_499_not_a_500(limited, client):
    before = metric(client, r'tlapp_http_requests_total[^\n]*status="499"')
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/models/shapes:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"instances\": [")
            time.sleep(0.2)
    deadline = time.time() + 10
    while metric(client, r'tlapp_http_requests_total[^\n]*status="499"') < before + 3 and time.time() < deadline:
        time.sleep(0.2)
    assert metric(client, r'tlapp_http_requests_total[^\n]*status="499"') == before + 3
    assert metric(client, r'tlapp_http_requests_total[^\n]*status="500"') == 0
    assert "Traceback" not in limited.log.read_text()


# ---- 3. deleting the latest version --------------------------------------------------------------
def test_deleting_the_latest_version_under_load_falls_back_to_the_previous_one(exported, tmp_path):
    root = tmp_path / "models"
    for version in ("1", "2"):
        copy_version(exported, root / "shapes" / version)
    server = Server(root, "--grpc-port", "0", "--poll-seconds", "0.1", log=tmp_path / "server.log")
    try:
        image = image_bytes(64, 64, "JPEG")
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.post("/v1/models/shapes/versions/1:predict", json=predict_body(image)).status_code == 200
            assert c.get("/v1/models/shapes/metadata").json()["model_spec"]["version"] == "2"

            def post(_):
                return c.post("/v1/models/shapes:predict", json=predict_body(image)).status_code

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(post, i) for i in range(150)]
                time.sleep(0.5)
                shutil.rmtree(root / "shapes" / "2")
                codes = [f.result() for f in futures]
            assert codes == [200] * len(codes), {code: codes.count(code) for code in set(codes)}
            assert c.get("/v1/models/shapes/metadata").json()["model_spec"]["version"] == "1"
            assert c.post("/v1/models/shapes/versions/2:predict", json=predict_body(image)).status_code == 404
    finally:
        server.stop()


# ---- 4. a half-copied version ---------------------------------------------------------------------
def test_a_version_that_failed_to_load_is_retried_when_its_copy_completes(limited, client, exported):
    target = limited.root / "shapes" / "3"
    copy_version(exported, target, without=("variables",))  # half copied: no variables/
    deadline = time.time() + 20
    entry = None
    while time.time() < deadline:
        entries = client.get("/v1/models/shapes").json()["model_version_status"]
        entry = next((e for e in entries if e["version"] == "3"), None)
        if entry:
            break
        time.sleep(0.2)
    assert entry and entry["state"] == "END", entry
    message = entry["status"]["error_message"]
    assert message and str(limited.base) not in message and str(limited.base.resolve()) not in message
    assert "/tmp" not in message, message
    shutil.copytree(Path(exported["version_dir"]) / "variables", target / "variables")
    deadline = time.time() + 30
    while time.time() < deadline:
        entries = client.get("/v1/models/shapes").json()["model_version_status"]
        if any(e["version"] == "3" and e["state"] == "AVAILABLE" for e in entries):
            break
        time.sleep(0.3)
    assert any(e["version"] == "3" and e["state"] == "AVAILABLE" for e in entries), entries
    assert client.get("/v1/models/shapes/metadata").json()["model_spec"]["version"] == "3"
    shutil.rmtree(target)


# ---- 5. symlinks out of the root ------------------------------------------------------------------
def test_a_version_symlink_out_of_the_root_is_never_served(limited, client, exported):
    outside = limited.base / "elsewhere"
    copy_version(exported, outside / "1")
    (outside / "1" / "model_card.json").write_text(json.dumps({"classes": ["stolen-a", "stolen-b", "stolen-c"]}))
    (limited.root / "shapes" / "9").symlink_to(outside / "1", target_is_directory=True)
    (limited.root / "escape").symlink_to(outside, target_is_directory=True)
    try:
        time.sleep(1.5)  # several polls
        assert client.get("/v1/models/shapes/versions/9").status_code == 404
        assert all(e["version"] != "9" for e in client.get("/v1/models/shapes").json()["model_version_status"])
        assert client.get("/v1/models/shapes/metadata").json()["model_spec"]["version"] != "9"
        assert client.get("/v1/models/escape").status_code == 404
        assert "stolen" not in client.get("/api/models").text
    finally:
        (limited.root / "shapes" / "9").unlink()
        (limited.root / "escape").unlink()


# ---- 6. timeouts -------------------------------------------------------------------------------
def test_a_body_that_stops_short_gets_a_408_and_the_connection_closes(limited):
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        started = time.time()
        sock.sendall(b"POST /v1/models/shapes:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inst")  # declares 100 bytes, sends 7
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert time.time() - started < 8
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"error"' in reply and b"--body-timeout" in reply


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_a_connection_that_sends_no_complete_headers_is_closed(limited, sent):
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        started = time.time()
        sock.sendall(sent)
        assert sock.recv(65536) == b""  # the server hung up
        assert time.time() - started < 8


# ---- 7. the shape of errors -----------------------------------------------------------------
@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/models/m%0Ax", 400), ("TRACE", "/", 405), ("GET", "/nowhere", 404),
    ("GET", "/v1/models/", 400), ("GET", "/v1/models", 400), ("GET", "/v1/models/shapes:predict", 400),
    ("DELETE", "/v1/models/shapes", 400), ("POST", "/v1/models/shapes:regress", 400), ("PUT", "/healthz", 405),
])
def test_every_error_is_json_with_its_status(limited, method, path, status):
    code, body = raw_request(limited, method, path, headers={"Host": "127.0.0.1"})
    assert code == status, body
    assert set(json.loads(body)) == {"error"}


def test_head_works_where_get_does(limited):
    for path in ("/healthz", "/v1/models/shapes", "/v1/models/shapes/metadata", "/"):
        code, body = raw_request(limited, "HEAD", path)
        assert code == 200 and body == b"", path


def test_an_unknown_model_error_lists_the_models_served_and_how_to_fix_it(client, sample_dir):
    """REST status, metadata, :predict and the upload endpoint; an unknown version lists the versions."""
    image = sorted(sample_dir.glob("*/*.jpg"))[0].read_bytes()
    replies = [client.get("/v1/models/shapez"), client.get("/v1/models/shapez/metadata"),
               client.post("/v1/models/shapez:predict", json=predict_body(image)),
               client.post("/api/models/shapez/predict", files={"file": ("a.jpg", image)})]
    for response in replies:
        error = response.json()["error"]
        assert response.status_code == 404, error
        assert error.startswith("Servable not found for request: Latest(shapez)"), error  # TF Serving's words
        assert "Models served: shapes, tiny;" in error and "/v1/models/NAME" in error, error
    error = client.get("/v1/models/shapes/versions/7").json()["error"]
    assert "Specific(shapes, 7)" in error and "Versions of shapes served: 1, 2" in error, error


def test_echoed_names_are_cut_to_a_sane_length(client):
    long = "x" * 100_000
    response = client.post("/v1/models/shapes:predict", json={"signature_name": long, "instances": []})
    assert response.status_code == 400 and len(response.text) < 1000
    response = client.get("/v1/models/" + "y" * 5000)
    assert response.status_code == 404 and len(response.text) < 1000


# ---- 8. Host check and headers --------------------------------------------------------------
def test_a_foreign_host_header_is_refused_and_security_headers_are_set(limited, client):
    code, body = raw_request(limited, "GET", "/v1/models/shapes", headers={"Host": "evil.example:8501"})
    assert code == 403 and "--allowed-host" in json.loads(body)["error"]
    for host in (f"127.0.0.1:{limited.port}", f"localhost:{limited.port}"):
        assert raw_request(limited, "GET", "/healthz", headers={"Host": host})[0] == 200
    page = client.get("/")
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp
    assert client.get("/v1/models/shapes").headers["x-content-type-options"] == "nosniff"


# ---- 9. the pixel limit of the model card ------------------------------------------------------
def test_the_pixel_limit_comes_from_the_model_card(client):
    image = image_bytes(200, 200, "JPEG")  # 40,000 pixels: over tiny's data.max_pixels of 10,000
    response = client.post("/v1/models/tiny:predict", json=predict_body(image))
    assert response.status_code == 400 and "10000" in response.json()["error"]
    assert client.post("/v1/models/shapes:predict", json=predict_body(image)).status_code == 200
