"""The model card: what a served model is, how it was trained and what input it expects."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from tl_app.models.artifacts import BYTES_SIGNATURE, PIXELS_SIGNATURE
from tl_app.training.runs import versions


# ---- the model card -------------------------------------------------------------
SCORE_TEXT = {"knn": "1 - cosine similarity of the backbone features to the k-th nearest training image's",
              "mahalanobis": "smallest squared Mahalanobis distance of the backbone features to a class mean"}


def ood_outputs(method: str) -> dict:
    """The card's description of the scorer's outputs, in the words of the method that computes them."""
    return {"ood_score": f"float32 [N] ({SCORE_TEXT.get(method, method)}; higher = less like the training images)",
            "unknown": "bool [N] (ood_score > ood.threshold)",
            "label": "string [N] ('unknown' when unknown, else class_name)"}


def ood_card(info: dict) -> dict:
    """run.json's ``ood`` as the card states it: method, threshold and acceptance (not the file name)."""
    record = dict(info.get("ood") or {"method": "none"})
    record.pop("file", None)
    return record


PREPROCESS_TEXT = {
    "caffe": "RGB->BGR, minus the ImageNet channel means (103.939, 116.779, 123.68); inside the model",
    "tf": "pixels scaled from 0..255 to -1..1; inside the model",
    "raw": "0..255 RGB pixels go to the backbone, which normalises them with its own built-in layers "
           "(keras.applications include_preprocessing); inside the model",
}


REFUSED_BY_BYTES = [
    "CMYK/YCCK JPEG (convert to RGB first)",
    "GIF with a transparent colour (send PNG)",
    "32-bit BMP with alpha (send PNG)",
    "WebP, TIFF and other formats (send JPEG or PNG)",
]


def input_contract(input_size: int, policy: str, background) -> dict:
    """What a client must send: the exact range, channel order, resize and the byte signature's decoding."""
    return {
        "pixels": ("float32 RGB (not BGR), values 0..255 (not 0..1, not already preprocessed); "
                   "the backbone preprocessing runs inside the model"),
        "pixel_range": [0.0, 255.0],
        "channel_order": "RGB",
        "resize": {"policy": policy, "size": [int(input_size), int(input_size)], "method": "bilinear",
                   "antialias": True,
                   "description": {"center_crop": "central square crop of side min(H, W), then resize",
                                   "letterbox": "resize keeping the aspect ratio, padded with 0",
                                   "stretch": "resize both sides, aspect ratio not kept"}.get(policy, policy),
                   "skipped_when": "the pixels are already input_size x input_size"},
        "bytes_decoding": ("JPEG with the accurate integer IDCT and EXIF orientation 1-8; PNG 8/16-bit, gray, "
                           "palette; transparency composited onto the background; 16-bit gray scaled by "
                           "round(v*255/65535), 16-bit colour by its high byte; GIF first frame; BMP"),
        "background": [int(v) for v in background],
        "bytes_refused": REFUSED_BY_BYTES,
    }


def model_card(run_dir: Path, info: dict, name: str, version: int, formats: list[str], quantize: bool,
               background=(255, 255, 255)) -> dict:

    config = {}
    if (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
    preprocess = info.get("preprocess", "")
    return {
        "name": name,
        "version": version,
        "classes": list(info["classes"]),
        "num_classes": len(info["classes"]),
        "backbone": info.get("backbone"),
        "weights": info.get("weights"),
        "weights_fingerprint": info.get("weights_fingerprint"),
        "input_size": int(info["input_size"]),
        "input": "RGB pixels 0..255 (float) at input_size x input_size, or encoded image bytes",
        "input_contract": input_contract(int(info["input_size"]), info.get("resize_policy") or "center_crop",
                                         background),
        "resize_policy": info.get("resize_policy"),
        "preprocessing": {"mode": preprocess, "description": PREPROCESS_TEXT.get(preprocess, preprocess)},
        "strategy": info.get("strategy"),
        "metrics": info.get("metrics", {}),
        "calibration": info.get("calibration") or {"method": "none"},
        "ood": ood_card(info),
        "dataset_fingerprint": info.get("dataset_fingerprint"),
        "data_root": info.get("data_root"),
        "run_dir": str(run_dir.resolve()),
        "trained": info.get("created"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "formats": formats,
        "quantized": bool(quantize),
        "signatures": {
            BYTES_SIGNATURE: {"inputs": {"image_bytes": "string [N] (encoded JPEG/PNG/GIF/BMP)"},
                              "refuses": REFUSED_BY_BYTES},
            PIXELS_SIGNATURE: {"inputs": {"images": "float32 [N, H, W, 3], RGB 0..255, resized in the graph"}},
            "outputs": {"probabilities": "float32 [N, C]", "class_index": "int64 [N]",
                        "class_name": "string [N]", "class_names": "string [N, C]",
                        **(ood_outputs(ood_card(info)["method"]) if ood_card(info)["method"] != "none" else {})},
            "converted": {"formats": "tflite, onnx: images float32 [N, size, size, 3] RGB 0..255 (resized already)",
                          "outputs": ["probabilities"] + (["ood_score", "unknown"]
                                                          if ood_card(info)["method"] != "none" else [])},
        },
        "config": config,
    }
