"""Export a trained run to saved_models/<name>/<version>/ (the TensorFlow Serving layout).

A version folder holds the SavedModel (``saved_model.pb`` + ``variables/``),
``model.keras``, optional ``model.tflite`` / ``model.onnx`` and
``model_card.json``. It is built in a hidden temporary folder next to the
versions and renamed into place, so a reader (TF Serving, ``tl-app serve``)
never sees a half-written version, and a killed export leaves nothing but a
hidden folder that the next export removes.

The SavedModel carries decoding, resizing and the backbone preprocessing in
its graph, so serving cannot drift from training:

* ``serving_default``: ``image_bytes`` (string [N], encoded JPEG/PNG/GIF/BMP)
* ``predict_pixels``: ``images`` (float32 [N, H, W, 3], RGB 0..255, any size)

Both return ``probabilities`` [N, C], ``class_index`` [N], ``class_name`` [N]
and ``class_names`` [N, C] (every output has the batch dimension first, as
TF Serving's row format requires). A run trained with an OOD scorer adds
``ood_score`` [N], ``unknown`` [N] (score above the card's threshold) and
``label`` [N] ("unknown" or the class name); its ``.keras`` has the two named
outputs ``probabilities`` and ``ood_score``; TFLite and ONNX (fixed input size,
no strings) answer ``probabilities``, ``ood_score`` and ``unknown``.

Exported with ``tta`` > 1 (``tl-app export --tta N``), every format averages the
probabilities over N fixed views in its graph (models.tta; ood_score is the
image's own), the parity gate compares them with the Python path's average, and
the card's ``tta`` says so; without it the export is the single pass it always was.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tl_app.core.files import remove_stale_temporaries, temporary_sibling
from tl_app.core.errors import ModelNotFoundError
from tl_app.core.errors import ExportError
from tl_app.export.card import model_card
from tl_app.export.converters import convert_onnx, convert_tflite, onnx_outputs, tflite_outputs
from tl_app.export.parity import golden_set, parity_gate, source_images
from tl_app.export.repository import parse_formats, publish
from tl_app.export.savedmodel import build_serving_module, save_savedmodel
from tl_app.models.embedding_space import BACKBONE_FILE, PROJECTION_FILE
from tl_app.models.artifacts import BYTES_SIGNATURE, CARD_FILE, KERAS_FILE, ONNX_FILE, PIXELS_SIGNATURE, SAVED_MODEL_FILE, TFLITE_FILE, check_model_name
from tl_app.models.artifacts import MODEL_FILE, read_run_info
from tl_app.models.opener import load_run_model, run_background
from tl_app.core.files import slug
from tl_app.models.calibration import recorded_temperature, with_temperature
from tl_app.models.ood import recorded_ood, with_ood, with_verdict
from tl_app.models.tta import check_views, tta_card, view_names, with_tta


# ---- the entry point ---------------------------------------------------------------
def export_run(run_dir: str | Path, root: str | Path = "saved_models", name: str | None = None,
               formats=("savedmodel", "keras"), quantize: bool = False, echo=print, tta: int = 1) -> dict:
    """Export a run directory; returns {name, version, path, files, parity, ...}."""
    started = time.perf_counter()
    say = echo or (lambda *_: None)
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    formats = parse_formats(formats)
    name = check_model_name(name or slug(run_dir.name))
    if not (run_dir / MODEL_FILE).is_file():
        raise ModelNotFoundError(f"{run_dir / MODEL_FILE} does not exist: the run did not finish training.")
    model = load_run_model(run_dir)
    temperature = recorded_temperature(info)
    if temperature is not None:  # calibration in the graph: every format below returns calibrated probabilities
        model = with_temperature(model, temperature)
    ood = recorded_ood(info, run_dir)
    scored = with_ood(model, *ood) if ood is not None else model  # + ood_score in every format
    views = check_views(tta, "--tta")
    served = with_tta(scored, views)  # tta > 1: the views and their average in every format's graph
    if views > 1:
        say(f"[export] test-time augmentation in the graph: {views} views averaged ({', '.join(view_names(views))})")
    classes = list(info["classes"])
    size = int(info["input_size"])
    policy = info.get("resize_policy") or "center_crop"
    if int(model.output_shape[-1]) != len(classes):
        raise ExportError(f"{run_dir}: the model has {model.output_shape[-1]} outputs but run.json lists "
                          f"{len(classes)} classes; the run directory is inconsistent.")

    model_dir = Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(model_dir)  # build folders of exports whose process died
    temp = temporary_sibling(model_dir / "export")
    temp.mkdir()
    try:
        config_file = run_dir / "config.json"
        background = run_background(json.loads(config_file.read_text()) if config_file.is_file() else None,
                                    str(config_file))
        module = build_serving_module(served, classes, size, policy, background)
        sources, image_source = source_images(run_dir)
        golden = golden_set(sources)
        files = []
        runners: dict = {}
        if "savedmodel" in formats:
            say(f"[export] SavedModel (signatures {BYTES_SIGNATURE}, {PIXELS_SIGNATURE})")
            save_savedmodel(module, temp)
            files += [SAVED_MODEL_FILE, "variables/"]
        if "keras" in formats:
            if temperature is None and ood is None and views == 1:
                shutil.copy2(run_dir / MODEL_FILE, temp / KERAS_FILE)
            else:
                served.save(temp / KERAS_FILE)
            files.append(KERAS_FILE)
        if "tflite" in formats:
            say("[export] TFLite" + (" (dynamic-range quantised)" if quantize else " (float32)"))
            convert_tflite(with_verdict(served), temp / TFLITE_FILE, quantize)
            runners["tflite"] = lambda pixels: tflite_outputs(temp / TFLITE_FILE, pixels)
            files.append(TFLITE_FILE)
        if "onnx" in formats:
            say("[export] ONNX")
            convert_onnx(module, temp / ONNX_FILE, size)
            runners["onnx"] = lambda pixels: onnx_outputs(temp / ONNX_FILE, pixels)
            files.append(ONNX_FILE)
        say(f"[export] parity gate: {len(golden)} golden images ({image_source}) through every format")
        parity = parity_gate(scored, golden, size, policy, background,
                             savedmodel_dir=temp if "savedmodel" in formats else None,
                             keras_file=temp / KERAS_FILE if "keras" in formats else None,
                             runners=runners, quantized=("tflite",) if quantize else (), views=views)
        parity["source"] = image_source
        for kept in (PROJECTION_FILE, BACKBONE_FILE):  # a metric run's embedding space, for index/embed on it
            if (run_dir / kept).is_file():
                shutil.copy2(run_dir / kept, temp / kept)
                files.append(kept)
        card = model_card(run_dir, info, name, 0, formats, quantize, background)
        card["parity"] = parity
        card["tta"] = tta_card(views)
        card["files"] = files + [CARD_FILE]
        (temp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        version = publish(temp, model_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    path = model_dir / str(version)
    say(f"[export] {path}  ({', '.join(formats)})")
    return {"name": name, "version": version, "path": path, "root": str(root), "formats": formats,
            "files": card["files"], "parity": parity, "seconds": round(time.perf_counter() - started, 2)}


