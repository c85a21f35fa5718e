"""The model card: what a served model is, how it was trained and what input it expects."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from tl_app.models.artifacts import BYTES_SIGNATURE, PIXELS_SIGNATURE
from tl_app.training.runs import versions


# ---- the model card -------------------------------------------------------------
PREPROCESS_TEXT = {
    "caffe": "RGB->BGR, minus the ImageNet channel means (103.939, 116.779, 123.68); inside the model",
    "tf": "pixels scaled from 0..255 to -1..1; inside the model",
}


def model_card(run_dir: Path, info: dict, name: str, version: int, formats: list[str], quantize: bool) -> dict:

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
        "resize_policy": info.get("resize_policy"),
        "preprocessing": {"mode": preprocess, "description": PREPROCESS_TEXT.get(preprocess, preprocess)},
        "strategy": info.get("strategy"),
        "metrics": info.get("metrics", {}),
        "dataset_fingerprint": info.get("dataset_fingerprint"),
        "data_root": info.get("data_root"),
        "run_dir": str(run_dir.resolve()),
        "trained": info.get("created"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "formats": formats,
        "quantized": bool(quantize),
        "signatures": {
            BYTES_SIGNATURE: {"inputs": {"image_bytes": "string [N] (encoded JPEG/PNG/GIF/BMP)"}},
            PIXELS_SIGNATURE: {"inputs": {"images": "float32 [N, H, W, 3], RGB 0..255, resized in the graph"}},
            "outputs": {"probabilities": "float32 [N, C]", "class_index": "int64 [N]",
                        "class_name": "string [N]", "class_names": "string [N, C]"},
        },
        "config": config,
    }
