"""Export parity on a fine-tuned ResNet50 (BatchNorm in inference mode) at a realistic input size.

The shared export fixture is an untrained VGG head at 32 px: a model that ignored
its input would pass its parity checks. Here the model has been fine-tuned (so its
BatchNorm statistics and weights differ from initialisation), runs at 128 px, and
the test asserts that its outputs differ from image to image before trusting that
every exported format agrees with Keras. It is also the gate's test on a network with
BatchNorm: the card must record parity for every format and the refused golden inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from factories import reference_pixels


@pytest.mark.slow
def test_a_fine_tuned_resnet_exports_with_parity_in_every_format(tiny_config, tmp_path):
    from tl_app.export.converters import onnx_outputs, tflite_outputs
    from tl_app.export.exporter import export_run
    from tl_app.models.opener import load_model_file, open_savedmodel
    from tl_app.training.finetune import train_finetune

    config = tiny_config.with_overrides({
        "backbone.name": "resnet50", "backbone.input_size": 128, "train.name": "resnet-bn", "train.epochs": 1,
        "train.finetune_epochs": 1, "train.unfreeze_blocks": 1, "train.strategy": "finetune"})
    run_dir = Path(train_finetune(config, echo=None)["run_dir"])
    result = export_run(run_dir, root=tmp_path / "models", name="resnet", formats="savedmodel,keras,tflite,onnx",
                        echo=None)
    version = result["path"]

    images, _ = reference_pixels(run_dir)  # the training pipeline's own pixels of every sample image
    images = images[:12]
    # The .keras export answers a dict (issue 16): the probabilities and the unknown-scorer's
    # ood_score, which must also be defined on a fine-tuned BatchNorm network.
    keras_out = load_model_file(version / "model.keras").predict(images, verbose=0)
    assert set(keras_out) == {"probabilities", "ood_score"}, sorted(keras_out)
    keras_probs = np.asarray(keras_out["probabilities"])
    assert keras_probs.shape == (12, 3)
    assert np.all(np.isfinite(keras_out["ood_score"])) and keras_out["ood_score"].shape[0] == 12
    spread = float(np.max(np.std(keras_probs, axis=0)))
    assert spread > 1e-3, f"outputs barely vary between images ({spread:.2e}): parity would prove nothing"

    _, signatures = open_savedmodel(version)
    pixels = signatures["predict_pixels"](images=images.astype(np.float32))["probabilities"].numpy()
    np.testing.assert_allclose(pixels, keras_probs, atol=1e-4)
    # TFLite and ONNX answer the unknown-scorer too: the same score, and the verdict at the card's threshold
    threshold = json.loads((run_dir / "run.json").read_text())["ood"]["threshold"]
    for converted in (tflite_outputs(version / "model.tflite", images), onnx_outputs(version / "model.onnx", images)):
        assert set(converted) == {"probabilities", "ood_score", "unknown"}, sorted(converted)
        np.testing.assert_allclose(converted["probabilities"], keras_probs, atol=1e-4)
        np.testing.assert_allclose(converted["ood_score"], keras_out["ood_score"], atol=1e-4)
        # every verdict agrees, except where the Keras score lies within the score tolerance of the threshold
        borderline = np.abs(keras_out["ood_score"] - threshold) <= 1e-4 * np.maximum(1.0, keras_out["ood_score"])
        agree = converted["unknown"] == (keras_out["ood_score"] > threshold)
        assert np.all(agree | borderline), (converted["ood_score"], keras_out["ood_score"], threshold)
    for fmt in ("savedmodel", "tflite", "onnx"):
        assert result["parity"][fmt]["max_abs_diff"] <= 1e-4, (fmt, result["parity"][fmt])
        assert result["parity"][f"{fmt}_ood_score"]["max_rel_diff"] <= 1e-4, (fmt, result["parity"])
    assert result["parity"]["tflite_unknown"]["agreement"] == result["parity"]["onnx_unknown"]["agreement"] == 1.0

    # The card records the gate: every format, the byte signature included, within tolerance
    # on the golden images, and the inputs the graph cannot decode like Pillow refused by name.
    card = json.loads((version / "model_card.json").read_text())
    for fmt in ("savedmodel_bytes", "savedmodel", "keras", "tflite", "onnx"):
        assert card["parity"][fmt]["max_abs_diff"] <= 1e-4, (fmt, card["parity"][fmt])
    assert card["parity"]["refused_inputs"] == ["0-jpeg-cmyk", "0-gif-transparent", "1-jpeg-cmyk",
                                                "1-gif-transparent"]
