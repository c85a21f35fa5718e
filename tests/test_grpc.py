"""TF Serving fidelity: its own gRPC client stubs (tensorflow-serving-api, unmodified) and its REST details.

One server in a subprocess, started from a TF Serving models config file
(two versions, labels), with a token, its REST and gRPC ports on loopback.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from test_server import AUTH, TOKEN, Server, free_port, raw_request  # noqa: E402

CLASSES = ["circles", "squares", "triangles"]


MODELS_CONFIG = """
model_config_list {
  config {
    name: "shapes"
    base_path: "elsewhere/shapes"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
}
"""


@pytest.fixture(scope="module")
def tfs(exported, tmp_path_factory):
    base = tmp_path_factory.mktemp("tfs")
    models = base / "elsewhere" / "shapes"
    for version in ("1", "2", "3"):
        shutil.copytree(exported["version_dir"], models / version, ignore=shutil.ignore_patterns("*.tflite"))
    config = base / "models.config"
    config.write_text(MODELS_CONFIG)
    grpc_port = free_port()
    server = Server(base / "unused", "--model-config-file", str(config), "--grpc-port", str(grpc_port),
                    "--token", TOKEN, "--poll-seconds", "0.3", log=base / "server.log")
    server.grpc_port, server.config = grpc_port, config
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rest(tfs):
    with httpx.Client(base_url=tfs.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(tfs):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{tfs.grpc_port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


METADATA = (("authorization", f"Bearer {TOKEN}"),)


def images(sample_dir, n=3) -> list[bytes]:
    return [p.read_bytes() for p in sorted(sample_dir.glob("*/*.jpg"))[:n]]


def rest_probabilities(rest, datas, path="/v1/models/shapes:predict") -> np.ndarray:
    body = {"instances": [{"b64": base64.b64encode(d).decode()} for d in datas]}
    response = rest.post(path, json=body)
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


# ---- gRPC with TF Serving's own stubs ------------------------------------------------------
def test_grpc_predict_with_tf_serving_stubs_equals_rest(stub, rest, sample_dir):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    datas = images(sample_dir)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "shapes"
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(datas, shape=[len(datas)]))
    response = stub.Predict(request, 30, metadata=METADATA)
    got = tf.make_ndarray(response.outputs["probabilities"])
    assert response.model_spec.name == "shapes" and response.model_spec.version.value == 2
    assert np.allclose(got, rest_probabilities(rest, datas), atol=1e-6, rtol=0)
    assert got.shape == (3, len(CLASSES))


def test_grpc_predict_by_label_and_version(stub, sample_dir):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    datas = images(sample_dir, 1)
    for field, value, expected in (("version_label", "stable", 1), ("version", 2, 2)):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "shapes"
        if field == "version":
            request.model_spec.version.value = value
        else:
            request.model_spec.version_label = value
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(datas, shape=[1]))
        request.output_filter.append("probabilities")
        response = stub.Predict(request, 30, metadata=METADATA)
        assert response.model_spec.version.value == expected and list(response.outputs) == ["probabilities"]


def test_grpc_get_model_metadata_gives_the_signature_defs(stub):
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "shapes"
    request.metadata_field.append("signature_def")
    response = stub.GetModelMetadata(request, 30, metadata=METADATA)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    default = signatures.signature_def["serving_default"]
    assert "image_bytes" in default.inputs and "probabilities" in default.outputs
    assert default.inputs["image_bytes"].dtype == 7  # DT_STRING
    assert "predict_pixels" in signatures.signature_def


def test_grpc_classify_gives_class_names_and_the_predict_scores(stub, rest, sample_dir):
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2

    datas = images(sample_dir, 2)
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "shapes"
    for data in datas:
        example = request.input.example_list.examples.add()
        example.features.feature["image_bytes"].bytes_list.value.append(data)
    response = stub.Classify(request, 30, metadata=METADATA)
    expected = rest_probabilities(rest, datas)
    for row, classification in zip(expected, response.result.classifications):
        assert [c.label for c in classification.classes] == CLASSES
        assert np.allclose([c.score for c in classification.classes], row, atol=1e-6)
    _ = tf


def test_grpc_model_status_and_errors(tfs, stub):
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2

    with grpc.insecure_channel(f"127.0.0.1:{tfs.grpc_port}") as channel:
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "shapes"
        response = models.GetModelStatus(request, 30, metadata=METADATA)
        states = {s.version: s.state for s in response.model_version_status}
        assert states == {2: get_model_status_pb2.ModelVersionStatus.AVAILABLE,
                          1: get_model_status_pb2.ModelVersionStatus.AVAILABLE}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "shapes"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, 30)  # no token
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    request.model_spec.name = "nothere"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, 30, metadata=METADATA)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # and says what is served, how to fix the request
    assert "Models served: shapes;" in caught.value.details() and "model_spec.name" in caught.value.details()
    request.model_spec.name = "shapes"
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, 30, metadata=METADATA)  # no inputs
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_bytes" in caught.value.details()


# ---- REST details --------------------------------------------------------------------
def test_the_config_file_serves_its_version_policy_and_labels(rest, sample_dir):
    versions = {e["version"] for e in rest.get("/v1/models/shapes").json()["model_version_status"]}
    assert versions == {"1", "2"}  # version 3 is on disk but outside the policy
    assert rest.get("/v1/models/shapes/versions/3").status_code == 404
    assert rest.get("/v1/models/shapes/labels/stable").json()["model_version_status"][0]["version"] == "1"
    assert rest.get("/v1/models/shapes/labels/canary/metadata").json()["model_spec"]["version"] == "2"
    assert rest.get("/v1/models/shapes/labels/nope").status_code == 404
    datas = images(sample_dir, 1)
    assert np.allclose(rest_probabilities(rest, datas, "/v1/models/shapes/labels/stable:predict"),
                       rest_probabilities(rest, datas, "/v1/models/shapes/versions/1:predict"), atol=1e-6)


def test_rest_classify_returns_class_names_and_scores(rest, sample_dir):
    datas = images(sample_dir, 2)
    body = {"examples": [{"image_bytes": {"b64": base64.b64encode(d).decode()}} for d in datas]}
    response = rest.post("/v1/models/shapes:classify", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = rest_probabilities(rest, datas)
    for row, result in zip(expected, results):
        assert [label for label, _ in result] == CLASSES
        assert np.allclose([score for _, score in result], row, atol=1e-6)


def test_rest_leading_zeros_unknown_keys_and_float_digits(rest, sample_dir):
    datas = images(sample_dir, 1)
    body = {"instances": [{"b64": base64.b64encode(datas[0]).decode()}], "extra_key": {"ignored": True}}
    response = rest.post("/v1/models/shapes/versions/0001:predict", json=body)
    assert response.status_code == 200, response.text
    numbers = re.findall(r"-?\d+\.\d+(?:e-?\d+)?", response.text)
    assert numbers and all(len(n.split("e")[0].lstrip("-0.").replace(".", "")) <= 9 for n in numbers), numbers
    assert rest.get("/v1/models/shapes/versions/02").json()["model_version_status"][0]["version"] == "2"


def test_rest_malformed_urls_and_wrong_methods_are_400_as_in_tf_serving(tfs):
    for method, path in (("GET", "/v1/models/shapes:predict"), ("POST", "/v1/models/shapes"),
                         ("GET", "/v1/models/"), ("GET", "/v1/models/shapes/versions/x"),
                         ("GET", "/v1/models/shapes/bogus"), ("GET", "/v1/oops")):
        status, body = raw_request(tfs, method, path)
        assert status == 400 and "error" in json.loads(body), (method, path, body)


def write_config(path: Path, text: str) -> None:
    """As an editor or a deployment would: the new file replaces the old one whole."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def wait_until(check, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def test_the_models_config_is_reloaded_without_a_restart_and_a_broken_one_keeps_the_last(tfs, rest, sample_dir):
    """Added models appear, removed ones go, a file that does not parse is reported and the old config kept;
    requests to the models that stay never fail meanwhile."""
    body = {"instances": [{"b64": base64.b64encode(images(sample_dir, 1)[0]).decode()}]}
    statuses, stop = [], threading.Event()

    def load():
        with httpx.Client(base_url=tfs.url, headers=AUTH, timeout=60) as client:
            while not stop.is_set():
                for path in ("/v1/models/shapes:predict", "/v1/models/shapes/labels/stable:predict"):
                    statuses.append(client.post(path, json=body).status_code)

    def status(name):
        return rest.get(f"/v1/models/{name}").status_code

    def health():
        return httpx.get(tfs.url + "/healthz", timeout=30).json()

    more = '  config { name: "more" base_path: "elsewhere/shapes" model_version_policy { latest { } } }\n}\n'
    added = MODELS_CONFIG.rstrip()[:-1] + more
    worker = threading.Thread(target=load)
    worker.start()
    try:
        write_config(tfs.config, added)
        wait_until(lambda: status("more") == 200, "the added model is served")
        assert rest.post("/v1/models/more:predict", json=body).status_code == 200
        assert rest.get("/v1/models/more").json()["model_version_status"][0]["version"] == "3"

        write_config(tfs.config, added.replace("model_config_list {", "model_config_list {{", 1))
        wait_until(lambda: health().get("model_config", "ok") != "ok", "the broken config is reported")
        assert "previous models config is still served" in health()["model_config"]
        assert "models config not reloaded" in Path(tfs.log).read_text()
        assert re.search(r"(?m)^tlapp_model_config_ok 0$", rest.get("/metrics").text)
        assert status("more") == 200 and status("shapes") == 200  # the last good config still served

        write_config(tfs.config, MODELS_CONFIG)
        wait_until(lambda: status("more") == 404, "the removed model goes away")
        assert health()["model_config"] == "ok" and health()["models"] == ["shapes"]
        assert "Models served: shapes;" in rest.get("/v1/models/more").json()["error"]
    finally:
        stop.set()
        worker.join(60)
        write_config(tfs.config, MODELS_CONFIG)
    assert len(statuses) >= 4 and set(statuses) == {200}, collections.Counter(statuses)
