import socket

import numpy as np
import pytest

from tl_app.models.backbones import build_base, build_feature_model, get_spec
from tl_app.core.errors import TlAppError, WeightsUnavailableError
from tl_app.models.weights import cache_path, fingerprint, resolve_weights, weights_status
from tl_app.models.backbones import import_weights


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "keras"


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection fails, as on an air-gapped machine."""

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_offline_imagenet_gives_one_clear_paragraph(keras_home, no_network):
    spec = get_spec("vgg16")
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(spec, "imagenet")
    message = str(err.value)
    assert spec.weights_file in message
    assert str(keras_home / "models") in message
    assert "tl-app weights import" in message
    assert "--weights none" in message
    assert not cache_path(spec).exists()  # no half-downloaded file is left behind


def test_offline_imagenet_from_the_cli_exits_nonzero_without_traceback(cli, keras_home, no_network, sample_dir, tmp_path):
    result = cli("train", sample_dir, "--backbone", "resnet50", "--weights", "imagenet",
                 "--runs-dir", tmp_path / "runs")
    assert result.exit_code != 0
    assert "tl-app weights import" in result.output
    assert "Traceback" not in result.output


def test_import_checks_shapes_then_imagenet_loads_the_imported_file(keras_home, tmp_path):
    spec = get_spec("resnet50")
    donor = build_base(spec, spec.default_size, "none", seed=11)
    source = tmp_path / "my_resnet50.weights.h5"
    donor.save_weights(source)

    result = import_weights(source, spec)
    assert result["file"] == str(cache_path(spec))
    assert result["official"] is False  # random weights are not Keras' file
    status = {row["backbone"]: row for row in weights_status([spec])}
    assert status["resnet50"]["present"] is True

    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    from_cache = build_feature_model(spec, 32, "imagenet").predict(x, verbose=0)
    from_path = build_feature_model(spec, 32, str(source)).predict(x, verbose=0)
    np.testing.assert_allclose(from_cache, from_path, atol=1e-6)
    assert fingerprint(spec, "imagenet").startswith("sha256:")


def test_import_rejects_a_file_of_another_backbone(keras_home, tmp_path):
    vgg = build_base(get_spec("vgg16"), 32, "none")
    source = tmp_path / "vgg.weights.h5"
    vgg.save_weights(source)
    with pytest.raises(TlAppError, match="does not fit the resnet50 backbone"):
        import_weights(source, get_spec("resnet50"))
    assert not cache_path(get_spec("resnet50")).exists()


def test_missing_weight_file_is_a_clear_error():
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        resolve_weights(get_spec("vgg16"), "/nope/weights.h5")


def test_random_weights_are_fingerprinted_by_seed():
    spec = get_spec("vgg16")
    assert fingerprint(spec, "none", 1) != fingerprint(spec, "none", 2)


def test_a_weight_file_is_fingerprinted_by_content_and_hashed_once(tmp_path, monkeypatch):
    import time

    from tl_app.models import weights as weights_mod

    spec = get_spec("vgg16")
    base = build_base(spec, 32, "none")
    path = tmp_path / "vgg.weights.h5"
    base.save_weights(path)
    hashed = []
    real_digest = weights_mod.file_digest
    monkeypatch.setattr(weights_mod, "file_digest", lambda *a, **k: hashed.append(a[0]) or real_digest(*a, **k))
    first = fingerprint(spec, str(path), 0, memo_dir=tmp_path / "memo")
    assert first.startswith("sha256:") and len(hashed) == 1
    assert fingerprint(spec, str(path), 0, memo_dir=tmp_path / "memo") == first and len(hashed) == 1  # remembered
    assert fingerprint(spec, str(path), 0) == first and len(hashed) == 2  # no memo: hashed
    base.layers[1].kernel.assign(base.layers[1].kernel + 1.0)
    time.sleep(0.01)
    base.save_weights(path)
    assert fingerprint(spec, str(path), 0, memo_dir=tmp_path / "memo") != first and len(hashed) == 3  # changed file
