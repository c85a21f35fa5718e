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
    from tl_app.export.converters import run_onnx, run_tflite
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
    keras_probs = np.asarray(load_model_file(version / "model.keras").predict(images, verbose=0))
    assert keras_probs.shape == (12, 3)
    spread = float(np.max(np.std(keras_probs, axis=0)))
    assert spread > 1e-3, f"outputs barely vary between images ({spread:.2e}): parity would prove nothing"

    _, signatures = open_savedmodel(version)
    pixels = signatures["predict_pixels"](images=images.astype(np.float32))["probabilities"].numpy()
    np.testing.assert_allclose(pixels, keras_probs, atol=1e-4)
    np.testing.assert_allclose(run_tflite(version / "model.tflite", images), keras_probs, atol=1e-4)
    np.testing.assert_allclose(run_onnx(version / "model.onnx", images), keras_probs, atol=1e-4)
    for fmt in ("savedmodel", "tflite", "onnx"):
        assert result["parity"][fmt]["max_abs_diff"] <= 1e-4, (fmt, result["parity"][fmt])

    # The card records the gate: every format, the byte signature included, within tolerance
    # on the golden images, and the inputs the graph cannot decode like Pillow refused by name.
    card = json.loads((version / "model_card.json").read_text())
    for fmt in ("savedmodel_bytes", "savedmodel", "keras", "tflite", "onnx"):
        assert card["parity"][fmt]["max_abs_diff"] <= 1e-4, (fmt, card["parity"][fmt])
    assert card["parity"]["refused_inputs"] == ["0-jpeg-cmyk", "0-gif-transparent", "1-jpeg-cmyk",
                                                "1-gif-transparent"]
