"""tl-app serve: a real server in a subprocess on a loopback port, real HTTP requests.

Covers every endpoint, every error class, token auth, path traversal, new-version
pickup, a fuzz pass of malformed bodies, parity with the model and `tl-app predict`,
and (slow) a bounded load test.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factories import reference_pixels  # noqa: E402

import httpx  # noqa: E402  (the test extra)
REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLASSES = ["circles", "squares", "triangles"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m tl_app serve ROOT ...` on a free loopback port; stopped by the fixture."""

    def __init__(self, root: Path, *args: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop("TL_APP_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "tl_app", "serve", str(root), "--port", str(self.port),
                                      *args], cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc.poll() is None and httpx.get(self.url + "/healthz", timeout=5).status_code == 200


def loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def start(root: Path, *args: str, log: Path) -> Server:
    return Server(root, *args, log=log)


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """A root of our own (versions get added to it), served with a token and small limits."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "models"
    shutil.copytree(exported["version_dir"], root / "shapes" / "1", ignore=shutil.ignore_patterns("*.tflite"))
    server = start(root, "--token", TOKEN, "--max-body-bytes", "1000000", "--max-images", "8",
                   "--max-batch-size", "8", "--batch-timeout-ms", "5", "--poll-seconds", "0.3",
                   "--allowed-batch-sizes", "2,4,8", log=base / "server.log")
    server.root = root
    server.base = base
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as c:
        yield c


def b64(path: Path) -> dict:
    return {"b64": base64.b64encode(Path(path).read_bytes()).decode()}


def raw_request(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """http.client sends the path exactly as written (no normalisation of '..' or %2F)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={**AUTH, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ---- endpoints -----------------------------------------------------------------------
def test_healthz_is_public_and_the_server_binds_loopback_only(served):
    import psutil

    response = httpx.get(served.url + "/healthz")
    assert response.status_code == 200 and response.json()["models"] == ["shapes"]
    addresses = {c.laddr.ip for c in psutil.Process(served.proc.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert addresses and all(loopback(a) for a in addresses)  # REST and gRPC: this machine only


def test_every_protected_endpoint_needs_the_bearer_token(served, sample_dir):
    image = next(sample_dir.glob("*/*.png"))
    calls = [("GET", "/v1/models/shapes", None), ("GET", "/v1/models/shapes/metadata", None),
             ("POST", "/v1/models/shapes:predict", {"instances": [b64(image)]}),
             ("GET", "/api/models", None), ("GET", "/metrics", None)]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method, path, body in calls:
            response = httpx.request(method, served.url + path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert "bearer token" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
    upload = httpx.post(served.url + "/api/models/shapes/predict", files={"file": image.open("rb")})
    assert upload.status_code == 401
    assert httpx.get(served.url + "/").status_code == 200  # the page itself holds no data


def test_model_and_version_status_as_tf_serving_reports_them(client):
    status = client.get("/v1/models/shapes").json()
    assert status == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert client.get("/v1/models/shapes/versions/1").json()["model_version_status"][0]["version"] == "1"
    for path in ("/v1/models/shapes/versions/99", "/v1/models/nope",
                 "/v1/models/nope/versions/1", "/v1/models/nope/metadata"):
        response = client.get(path)
        assert response.status_code == 404 and "error" in response.json(), path
    response = client.get("/v1/models/shapes/versions/one")  # a malformed URL: 400, as TF Serving answers
    assert response.status_code == 400 and "not a version number" in response.json()["error"]


def test_metadata_describes_both_signatures(client):
    body = client.get("/v1/models/shapes/metadata").json()
    assert body["model_spec"] == {"name": "shapes", "signature_name": "", "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "predict_pixels"}
    image_input = defs["serving_default"]["inputs"]["image_bytes"]
    assert image_input["dtype"] == "DT_STRING" and image_input["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert defs["predict_pixels"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert set(defs["serving_default"]["outputs"]) == {"probabilities", "class_index", "class_name", "class_names"}
    assert body["model_card"]["classes"] == CLASSES
    assert client.get("/v1/models/shapes/versions/1/metadata").status_code == 200


def test_predict_rows_and_columns_agree_with_the_model_and_tl_app_predict(client, exported, tmp_path):
    """Parity: in-memory model, SavedModel, `tl-app predict` and the server, same images, 1e-5."""
    from tl_app.inference import predict_paths
    from tl_app.models.opener import load_run_model

    pixels, records = reference_pixels(exported["run_dir"])
    expected = load_run_model(exported["run_dir"]).predict(pixels, verbose=0)
    records, expected = records[:8], expected[:8]
    rows = client.post("/v1/models/shapes:predict", json={"instances": [b64(r.path) for r in records]})
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    served = np.array([p["probabilities"] for p in predictions])
    assert np.max(np.abs(served - expected)) <= 1e-5
    assert [p["class_name"] for p in predictions] == [CLASSES[i] for i in expected.argmax(1)]
    assert all(p["class_names"] == CLASSES for p in predictions)
    named = client.post("/v1/models/shapes/versions/1:predict",
                        json={"signature_name": "serving_default",
                              "instances": [{"image_bytes": b64(r.path)} for r in records]})
    assert np.max(np.abs(np.array([p["probabilities"] for p in named.json()["predictions"]]) - expected)) <= 1e-5
    columns = client.post("/v1/models/shapes:predict",
                          json={"inputs": {"image_bytes": [b64(r.path) for r in records]}}).json()["outputs"]
    assert np.max(np.abs(np.array(columns["probabilities"]) - expected)) <= 1e-5
    assert columns["class_index"] == expected.argmax(1).tolist()
    out = tmp_path / "preds.jsonl"
    predict_paths(exported["root"] / "shapes", [r.path for r in records], out=out, top_k=3, echo=None)
    for line, want in zip(out.read_text().splitlines(), served):
        got = {p["label"]: p["probability"] for p in json.loads(line)["predictions"]}
        assert np.max(np.abs(np.array([got[c] for c in CLASSES]) - want)) <= 1e-5


def test_predict_pixels_signature_takes_float_tensors(client, exported):
    from tl_app.models.opener import load_run_model

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    response = client.post("/v1/models/shapes:predict",
                           json={"signature_name": "predict_pixels", "instances": x.tolist()})
    assert response.status_code == 200, response.text
    got = np.array([p["probabilities"] for p in response.json()["predictions"]])
    assert np.max(np.abs(got - load_run_model(exported["run_dir"]).predict(x, verbose=0))) <= 1e-5
    other = client.post("/v1/models/shapes:predict",
                        json={"signature_name": "predict_pixels",
                              "inputs": {"images": np.zeros((1, 20, 30, 3)).tolist()}})
    assert other.status_code == 200 and len(other.json()["outputs"]["probabilities"]) == 1


def test_upload_endpoint_returns_top_k(client, sample_dir):
    image = sorted(sample_dir.glob("squares/*.jpg"))[0]
    response = client.post("/api/models/shapes/predict?top_k=2", files={"file": (image.name, image.read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "shapes" and body["version"] == 1
    top = body["results"][0]["top_k"]
    assert body["results"][0]["filename"] == image.name and len(top) == 2
    assert top[0]["probability"] >= top[1]["probability"] and top[0]["label"] in CLASSES
    direct = client.post("/v1/models/shapes:predict", json={"instances": [b64(image)]}).json()["predictions"][0]
    assert top[0]["label"] == direct["class_name"]
    assert abs(top[0]["probability"] - max(direct["probabilities"])) <= 1e-6
    models = client.get("/api/models").json()["models"]
    assert models[0]["name"] == "shapes" and models[0]["classes"] == CLASSES
    assert "<form" in httpx.get(client.base_url.join("/")).text


def test_metrics_are_prometheus_text(client):
    client.get("/v1/models/shapes")
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert 'tlapp_http_requests_total{method="GET",route="/v1/models/{name}",status="200"}' in text
    assert "# TYPE tlapp_http_request_duration_seconds histogram" in text
    assert 'tlapp_http_request_duration_seconds_bucket{route="/v1/models/{name}",le="+Inf"}' in text
    assert "# TYPE tlapp_batch_size histogram" in text and "tlapp_batch_size_count" in text
    assert "tlapp_models_loaded 1" in text


def test_metrics_break_serving_time_into_stages_and_count_batch_padding(client, sample_dir):
    """decode and queue per request, handoff and model per call, encode per response; a 1-image batch is padded
    to 2 (--allowed-batch-sizes 2,4,8)."""
    import re

    image = sorted(sample_dir.glob("*/*.jpg"))[0]
    assert client.post("/v1/models/shapes:predict", json={"instances": [b64(image)]}).status_code == 200
    text = client.get("/metrics").text
    for stage in ("decode", "queue", "handoff", "model", "encode"):
        count = re.search(rf'(?m)^tlapp_stage_seconds_count{{model="shapes",stage="{stage}"}} (\d+)$', text)
        assert count and int(count[1]) >= 1, stage
    padded = re.search(r'(?m)^tlapp_batch_padding_images_total{model="shapes"} (\d+)$', text)
    assert padded and int(padded[1]) >= 1


# ---- errors -----------------------------------------------------------------------------
def test_every_error_class_gets_json_with_the_right_status(client, served, sample_dir):
    image = next(sample_dir.glob("*/*.png"))
    post = lambda body, path="/v1/models/shapes:predict", **kw: client.post(path, content=body, **kw)  # noqa: E731
    cases = [
        (post(b"{not json"), 400, "not valid JSON"),
        (post(b""), 400, "Empty request body"),
        (post(json.dumps([1, 2]).encode()), 400, "JSON object"),
        (post(json.dumps({"instances": []}).encode()), 400, "No instances"),
        (post(json.dumps({"instances": [1], "inputs": [1]}).encode()), 400, "Exactly one"),
        (post(json.dumps({"instances": [{"b64": "!!!"}]}).encode()), 400, "not valid base64"),
        (post(json.dumps({"instances": [{"b64": base64.b64encode(b'hello').decode()}]}).encode()), 400,
         "not a decodable image"),
        (post(json.dumps({"signature_name": "nope", "instances": [b64(image)]}).encode()), 400, "not found"),
        (post(json.dumps({"signature_name": "predict_pixels", "instances": [[1, 2]]}).encode()), 400, "rank"),
        (post(json.dumps({"instances": [b64(image)]}).encode(), path="/v1/models/ghost:predict"), 404, "ghost"),
        (post(json.dumps({"instances": [b64(image)]}).encode(), path="/v1/models/shapes/versions/7:predict"), 404,
         "Specific(shapes, 7)"),
        (post(json.dumps({"instances": [b64(image)]}).encode(), path="/v1/models/shapes:classify"), 400,
         "examples"),
        (post(json.dumps({"instances": [b64(image)]}).encode(), path="/v1/models/shapes:regress"), 400,
         ":predict and :classify"),
        (client.get("/v1/models/shapes:predict"), 400, "POST"),
        (client.get("/no/such/route"), 404, "Not found"),
        (post(b"x" * 1_000_001), 413, "over the limit"),
        (post(json.dumps({"instances": [b64(image)] * 9}).encode()), 413, "limit is 8"),
        (client.post("/api/models/shapes/predict", content=b"raw"), 400, "multipart"),
        (client.post("/api/models/shapes/predict", files={"file": ("x.png", b"not an image")}), 400,
         "not a decodable image"),
        (client.post("/api/models/shapes/predict?top_k=zero", files={"file": image.open("rb")}), 400, "top_k"),
        (client.post("/api/models/shapes/predict", files=[("file", image.open("rb"))] * 9), 413, "limit"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        assert words in response.json()["error"], (words, response.text)
    assert served.alive()


def test_a_model_name_never_reaches_outside_the_root(served):
    outside = served.base / "secret"
    shutil.copytree(served.root / "shapes", outside)  # a real, loadable model just outside the root
    (served.root / "link").symlink_to(outside, target_is_directory=True)
    time.sleep(1.0)  # a few polls
    paths = ["/v1/models/../secret", "/v1/models/..%2Fsecret", "/v1/models/%2e%2e%2fsecret/metadata",
             "/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/link", "/v1/models/link:predict",
             "/v1/models/shapes/..%2F..%2Fsecret", "/v1/models/shapes%2F..%2F..%2Fsecret/versions/1",
             "/api/models/..%2Fsecret/predict", "/v1/models/.%2e/versions/1/metadata"]
    for path in paths:
        method = "POST" if path.endswith("predict") else "GET"
        status, body = raw_request(served, method, path, b'{"instances": []}')
        assert status in (404, 400), (path, status, body)
        assert b"circles" not in body
    assert httpx.get(served.url + "/healthz").json()["models"] == ["shapes"]


def test_fuzzed_bodies_never_crash_the_server(served, sample_dir):
    rng = random.Random(0)
    image = next(sample_dir.glob("*/*.jpg")).read_bytes()
    bodies = [
        b"\x00\xff" * 50, b"null", b"true", b"[]", b"{}", b'{"instances": null}', b'{"instances": {}}',
        b'{"instances": [null]}', b'{"instances": [[[[[[[[[[1]]]]]]]]]]}', b'{"instances": [1e999]}',
        b'{"inputs": {"image_bytes": "abc"}}', b'{"inputs": {"wrong": []}}', b'{"instances": ["\\u0000"]}',
        b'{"signature_name": 5, "instances": [1]}', b'{"instances": [{"b64": 5}]}',
        b'{"instances": [{"b64": ""}]}', b'{"instances": [{"image_bytes": 1, "x": 2}]}',
        b'{"signature_name": "predict_pixels", "instances": [[[[1,2,3]]], [[[1,2]]]]}',
        b'{"signature_name": "predict_pixels", "instances": [[[["a","b","c"]]]]}',
        b'{"signature_name": "predict_pixels", "inputs": {"images": [[[[NaN, 1, 2]]]]}}',
        b'{"signature_name": "predict_pixels", "instances": [[[[1, 2, 3]]]] , "extra": 1}',
        json.dumps({"instances": [{"b64": base64.b64encode(image[: len(image) // 2]).decode()}]}).encode(),
        json.dumps({"instances": [{"b64": base64.b64encode(image[:40] + os.urandom(200)).decode()}]}).encode(),
        b"[" * 5000 + b"]" * 5000, b'{"instances": "' + b"A" * 10000 + b'"}',
    ]
    bodies += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))) for _ in range(40)]
    bodies += [json.dumps({"instances": [{"b64": base64.b64encode(bytearray(
        b ^ (rng.getrandbits(8) if rng.random() < 0.02 else 0) for b in image)).decode()}]}).encode()
        for _ in range(10)]
    paths = ["/v1/models/shapes:predict", "/v1/models/shapes/versions/1:predict"]
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as c:
        for i, body in enumerate(bodies):
            response = c.post(paths[i % 2], content=body)
            assert response.status_code in (200, 400, 413), (body[:80], response.status_code, response.text)
            assert "error" in response.json() or "predictions" in response.json()
        for garbage in (b"--x\r\nnot multipart", os.urandom(500)):
            r = c.post("/api/models/shapes/predict", content=garbage,
                       headers={"Content-Type": "multipart/form-data; boundary=x"})
            assert r.status_code == 400, r.text
    assert served.alive()


def test_a_new_version_is_picked_up_without_a_restart(served, client, sample_dir):
    shapes = served.root / "shapes"
    (shapes / "5").mkdir()  # half-written by some other tool: no saved_model.pb, never served
    temp = shapes / ".incoming"
    shutil.copytree(shapes / "1", temp)
    os.rename(temp, shapes / "2")  # published atomically, as tl-app export does
    deadline = time.time() + 30
    while time.time() < deadline:
        versions = [s["version"] for s in client.get("/v1/models/shapes").json()["model_version_status"]]
        if "2" in versions:
            break
        time.sleep(0.2)
    assert "2" in versions and "5" not in versions
    image = next(sample_dir.glob("*/*.png"))
    latest = client.post("/v1/models/shapes:predict", json={"instances": [b64(image)]})
    assert latest.status_code == 200
    assert client.get("/v1/models/shapes/metadata").json()["model_spec"]["version"] == "2"
    old = client.post("/v1/models/shapes/versions/1:predict", json={"instances": [b64(image)]})
    assert old.status_code == 200
    assert old.json()["predictions"][0]["class_name"] == latest.json()["predictions"][0]["class_name"]
    assert np.allclose(old.json()["predictions"][0]["probabilities"], latest.json()["predictions"][0]["probabilities"],
                       atol=1e-6)
    assert client.post("/v1/models/shapes/versions/5:predict", json={"instances": [b64(image)]}).status_code == 404


@pytest.mark.slow
def test_load_500_requests_at_concurrency_16_no_errors_bounded_memory(served, sample_dir):
    """500 requests, 16 at a time: zero errors, batches formed, server RSS grows < 200 MB."""
    import psutil

    images = [b64(p) for p in sorted(sample_dir.glob("*/*"))[:16]]
    process = psutil.Process(served.proc.pid)

    def one(i):
        with httpx.Client(base_url=served.url, headers=AUTH, timeout=120) as c:
            return c.post("/v1/models/shapes:predict", json={"instances": [images[i % 16]]}).status_code

    list(concurrent.futures.ThreadPoolExecutor(16).map(one, range(64)))  # warm-up (first batches trace)
    before = process.memory_info().rss
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(500)))
    growth = (process.memory_info().rss - before) / 1e6
    print(f"load test: 500 requests at concurrency 16, RSS growth {growth:.1f} MB")
    assert codes.count(200) == 500, {c: codes.count(c) for c in set(codes)}
    assert growth < 200, f"RSS grew by {growth:.0f} MB"
    metrics = httpx.get(served.url + "/metrics", headers=AUTH).text
    batched = [line for line in metrics.splitlines() if line.startswith("tlapp_batch_size_bucket")
               and 'le="1"' in line and 'signature="serving_default"' in line]
    count = [line for line in metrics.splitlines() if line.startswith("tlapp_batch_size_count")
             and 'signature="serving_default"' in line]
    assert int(batched[0].split()[-1]) < int(count[0].split()[-1])  # some batches held more than one image


def test_serve_refuses_a_missing_root_with_a_clear_message(cli, tmp_path):
    result = cli("serve", tmp_path / "nowhere")
    assert result.exit_code != 0 and "is not a folder" in result.output and "tl-app export" in result.output
    assert "--batch-timeout-ms" in cli("serve", "--help").output


# ---- in-process server (review fixes) ------------------------------------------------------
def png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def transparent_shape() -> np.ndarray:
    """32x32 RGBA: a red disc, opaque, on a fully transparent rest (no partial alpha: no rounding)."""
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 100
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[disc] = (220, 30, 30, 255)
    return rgba


def on_background(rgba: np.ndarray, colour) -> np.ndarray:
    rgb = np.empty((32, 32, 3), np.uint8)
    rgb[:] = colour
    opaque = rgba[..., 3] == 255
    rgb[opaque] = rgba[opaque][:, :3]
    return rgb


@pytest.fixture(scope="module")
def local_root(exported, tmp_path_factory):
    """shapes/1: a card without its run config (white); shapes/2: trained on a black background.

    Beside them, folders that are not versions: '²' (str.isdigit() says yes, int() says no), '01', 19 digits.
    """
    root = tmp_path_factory.mktemp("serve-local") / "models"
    for version in ("1", "2"):
        shutil.copytree(exported["version_dir"], root / "shapes" / version, ignore=shutil.ignore_patterns("*.tflite"))
    for version, edit in (("1", lambda card: card.pop("config", None)),
                          ("2", lambda card: card["config"].setdefault("data", {}).update(background=[0, 0, 0]))):
        card_file = root / "shapes" / version / "model_card.json"
        card = json.loads(card_file.read_text())
        edit(card)
        card_file.write_text(json.dumps(card))
    for name in ("²", "01", "1" * 19):
        shutil.copytree(root / "shapes" / "1", root / "shapes" / name)
    return root


@pytest.fixture(scope="module")
def local(local_root):
    """The app in this process (starlette's TestClient): its registry and models can be inspected."""
    from tl_app.core.config import ServeConfig
    from tl_app.serve.app import create_app

    app = create_app(local_root, ServeConfig(max_batch_size=8, poll_seconds=0.3))
    with in_process(app) as client:  # startup scans the root: a bad version folder must not stop it
        yield client


def in_process(app):
    """starlette's TestClient; its import warns that it prefers httpx2 to the httpx installed here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient(app)


def probabilities(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def test_version_folders_and_numbers_are_ascii_digits_only(local, local_root):
    from tl_app.models.artifacts import list_versions, parse_version

    assert list_versions(local_root / "shapes") == [1, 2]
    assert [parse_version(t) for t in ("1", "42", "9" * 18, "²", "01", "0", "1" * 19, "", " 1", "1\n", None)] == \
        [1, 42, int("9" * 18), None, None, None, None, None, None, None, None]
    assert [s["version"] for s in local.get("/v1/models/shapes").json()["model_version_status"]] == ["2"]
    image = {"file": ("a.png", png_bytes(on_background(transparent_shape(), (255, 255, 255))))}
    for path in ("/v1/models/shapes/versions/%C2%B2", "/v1/models/shapes/versions/%C2%B2/metadata",
                 "/v1/models/shapes/versions/" + "1" * 19):
        response = local.get(path)  # a malformed URL: 400, as TF Serving answers
        assert response.status_code == 400 and "not a version number" in response.json()["error"], path
    response = local.post("/v1/models/shapes/versions/%C2%B2:predict", json={"instances": []})
    assert response.status_code == 400 and "not a version number" in response.json()["error"]
    # In URLs, leading zeros are accepted as TF Serving accepts them; the folder '01' is still no version.
    assert local.get("/v1/models/shapes/versions/01").json()["model_version_status"][0]["version"] == "1"
    for query, words in (("version=%C2%B2", "version must be a positive integer"),
                         ("version=0", "version must be a positive integer"),
                         ("top_k=%C2%B2", "top_k must be a positive integer"),
                         ("top_k=" + "9" * 5000, "top_k must be a positive integer")):
        response = local.post(f"/api/models/shapes/predict?{query}", files=image)
        assert response.status_code == 400 and words in response.json()["error"], (query, response.text)
    assert local.post("/api/models/shapes/predict?version=1&top_k=2", files=image).status_code == 200


def test_transparent_images_are_composited_on_the_runs_background(local):
    rgba = transparent_shape()
    transparent = {"b64": base64.b64encode(png_bytes(rgba)).decode()}
    on_black = {"b64": base64.b64encode(png_bytes(on_background(rgba, (0, 0, 0)))).decode()}
    on_white = {"b64": base64.b64encode(png_bytes(on_background(rgba, (255, 255, 255)))).decode()}
    black, white = probabilities(local.post("/v1/models/shapes:predict", json={"instances": [on_black, on_white]}))
    assert np.max(np.abs(black - white)) > 1e-4  # the background matters to this model: the test can tell
    served = probabilities(local.post("/v1/models/shapes:predict", json={"instances": [transparent]}))[0]
    assert np.max(np.abs(served - black)) <= 1e-5  # version 2 trained on black
    upload = local.post("/api/models/shapes/predict?top_k=3", files={"file": ("t.png", png_bytes(rgba))}).json()
    got = {p["label"]: p["probability"] for p in upload["results"][0]["top_k"]}
    assert upload["version"] == 2 and np.max(np.abs(np.array([got[c] for c in CLASSES]) - black)) <= 1e-5
    old = probabilities(local.post("/v1/models/shapes/versions/1:predict", json={"instances": [transparent]}))[0]
    assert np.max(np.abs(old - white)) <= 1e-5  # no run config in its card: white, as training's default


def test_each_request_image_is_opened_once(local, sample_dir, monkeypatch):
    from PIL import Image

    import tl_app.serve.codec as codec

    assert not hasattr(codec, "needs_conversion")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **kw: opened.append(1) or real_open(*a, **kw))
    images = sorted(sample_dir.glob("*/*.jpg"))[:2]
    assert local.post("/v1/models/shapes:predict", json={"instances": [b64(p) for p in images]}).status_code == 200
    assert len(opened) == 2
    opened.clear()
    assert local.post("/api/models/shapes/predict", files={"file": images[0].open("rb")}).status_code == 200
    assert len(opened) == 1


def test_batchers_stay_bounded_however_many_input_shapes_clients_send(local):
    from tl_app.serve.registry import MAX_BATCHERS

    async def collectors() -> int:
        import asyncio

        return sum(1 for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "DynamicBatcher._collect")

    model = local.app.state.registry.get_loaded("shapes")
    elsewhere = local.portal.call(collectors) - len(model.runners)  # other versions' batchers
    for side in range(4, 4 + 2 * MAX_BATCHERS):
        response = local.post("/v1/models/shapes:predict", json={
            "signature_name": "predict_pixels", "inputs": {"images": np.zeros((1, side, 5, 3)).tolist()}})
        assert response.status_code == 200, response.text
    assert len(model.runners) <= MAX_BATCHERS
    deadline = time.time() + 10  # evicted batchers' collectors are cancelled on the next loop turn
    while local.portal.call(collectors) > elsewhere + MAX_BATCHERS and time.time() < deadline:
        time.sleep(0.05)
    assert local.portal.call(collectors) <= elsewhere + MAX_BATCHERS


def test_a_closed_version_gives_out_no_runner(local_root):
    from tl_app.core.config import ServeConfig
    from tl_app.serve.batching import Unavailable
    from tl_app.serve.metrics import Metrics
    from tl_app.serve.registry import load_version

    model = load_version("shapes", 2, local_root / "shapes" / "2")
    assert model.classes == CLASSES and model.background == (0, 0, 0)
    signature = model.signature(None)
    inputs = {"image_bytes": np.array([b"x"], dtype=object)}
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        runner = model.runner(signature, inputs, ServeConfig(), executor, Metrics())
        assert model.runner(signature, inputs, ServeConfig(), executor, Metrics()) is runner  # one per shape, kept
        assert not runner.closed
        model.close()
        assert runner.closed  # closing the version closes the batcher it gave out
        with pytest.raises(Unavailable, match="unloaded; retry"):
            model.runner(signature, inputs, ServeConfig(), executor, Metrics())
    assert not model.runners


def run_batch(runner, requests: list[dict]) -> list:
    import asyncio

    async def all_of():
        return await asyncio.gather(*(runner.submit(r) for r in requests), return_exceptions=True)

    return asyncio.run(all_of())


def test_a_failed_batch_counts_only_the_model_calls_that_succeed(local_root, sample_dir):
    """One bad image in a batch of two: the batch fails, each is retried alone; one image is counted, once."""
    from tl_app.serve.batching import DirectRunner, DynamicBatcher, InferenceError
    from tl_app.serve.registry import load_version

    signature = load_version("shapes", 2, local_root / "shapes" / "2").signature(None)
    good = {"image_bytes": np.array([next(sample_dir.glob("*/*.jpg")).read_bytes()], dtype=object)}
    bad = {"image_bytes": np.array([b"not an image at all"], dtype=object)}  # only the graph's decoder sees it
    counted = []
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        ok, failed = run_batch(DynamicBatcher(signature, executor, 8, 50, counted.append), [good, bad])
        assert isinstance(ok, dict) and ok["probabilities"].shape == (1, 3)
        assert isinstance(failed, InferenceError) and "could not process the input" in str(failed)
        assert counted == [1]
        counted.clear()
        ok, failed = run_batch(DirectRunner(signature, executor, counted.append), [good, bad])
        assert isinstance(ok, dict) and isinstance(failed, InferenceError) and counted == [1]


def test_batches_are_padded_to_allowed_sizes_and_the_padding_is_cut_from_the_outputs(local_root, sample_dir):
    """Three 1-image requests become one call of 4 rows (allowed sizes 4, 8); each gets its own row back,
    equal to the model on that image alone; batching off or not, one image alone is padded to 4 as well."""
    from tl_app.serve.batching import DirectRunner, DynamicBatcher
    from tl_app.serve.registry import load_version

    signature = load_version("shapes", 2, local_root / "shapes" / "2").signature(None)
    rows_seen, counted, stages = [], [], []

    def recording(inputs):
        rows_seen.append(len(inputs["image_bytes"]))
        return signature(inputs)

    requests = [{"image_bytes": np.array([path.read_bytes()], dtype=object)}
                for path in sorted(sample_dir.glob("*/*.jpg"))[:3]]
    alone = [signature(r)["probabilities"] for r in requests]
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        batcher = DynamicBatcher(recording, executor, 8, 50, counted.append, allowed_sizes=(4, 8),
                                 on_stage=lambda stage, value: stages.append((stage, value)))
        results = run_batch(batcher, requests)
        assert rows_seen == [4] and counted == [3] and ("padding", 1) in stages
        for result, expected in zip(results, alone):
            assert result["probabilities"].shape == (1, 3)
            assert np.allclose(result["probabilities"], expected, atol=1e-6)
        assert sorted(stage for stage, _ in stages if stage != "padding") == ["handoff", "model"] + ["queue"] * 3
        rows_seen.clear()
        (result,) = run_batch(DirectRunner(recording, executor, counted.append, (4, 8)), requests[:1])
        assert rows_seen == [4] and np.allclose(result["probabilities"], alone[0], atol=1e-6)


def test_a_server_fault_in_the_model_call_is_not_blamed_on_the_request():
    """Out of memory (or any error that is not about the inputs) reaches the app as itself: a logged 500."""
    import tensorflow as tf

    from tl_app.serve.batching import DirectRunner, DynamicBatcher, InferenceError

    def out_of_memory(inputs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,224,224,3]")

    def bad_input(inputs):
        raise tf.errors.InvalidArgumentError(None, None, "Unknown image file format.")

    requests = [{"x": np.zeros((1, 2), np.float32)}, {"x": np.zeros((2, 2), np.float32)}]
    counted = []
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        for runner in (DynamicBatcher(out_of_memory, executor, 8, 50, counted.append),
                       DirectRunner(out_of_memory, executor, counted.append)):
            results = run_batch(runner, requests)
            assert all(isinstance(r, tf.errors.ResourceExhaustedError) for r in results), results
        for runner in (DynamicBatcher(bad_input, executor, 8, 50, counted.append),
                       DirectRunner(bad_input, executor, counted.append)):
            results = run_batch(runner, requests)
            assert all(isinstance(r, InferenceError) and "Unknown image file format" in str(r) for r in results)
    assert counted == []



def test_a_version_closed_under_a_request_is_a_503_to_retry(local_root, sample_dir):
    from tl_app.core.config import ServeConfig
    from tl_app.serve.app import create_app

    app = create_app(local_root, ServeConfig())
    with in_process(app) as client:
        app.state.registry.get_loaded("shapes").close()  # as an unload does, between lookup and submit
        image = b64(next(sample_dir.glob("*/*.jpg")))
        response = client.post("/v1/models/shapes:predict", json={"instances": [image]})
        assert response.status_code == 503 and "retry" in response.json()["error"]


@pytest.mark.parametrize("option", ["--max-batch-size", "--max-images", "--max-body-bytes"])
def test_serve_refuses_a_zero_limit_in_one_line(cli, tmp_path, option):
    result = cli("serve", tmp_path / "nowhere", option, "0")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip() == f"error: {option} must be at least 1, got 0; leave it out for the default."
