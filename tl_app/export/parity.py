"""The export parity gate: every format written must give the Keras model's outputs on a golden set.

The golden set is the run's own images (or a drawn one when the data has
moved) encoded the ways users' files come: EXIF orientations 1-8, RGBA, LA
and palette transparency, grayscale, 16-bit PNG, GIF, BMP; plus the kinds the
byte signature must refuse (CMYK JPEG, transparent GIF). The reference is the
Keras model on the pixels training decodes (``images.decode_pil`` + the shared
resize). Float formats must agree to ``FLOAT_TOLERANCE``; quantised ones in
top-1 on ``QUANTIZED_AGREEMENT`` of the images, with the largest gap reported.
A format that disagrees, or a byte signature that accepts what it must refuse,
fails the export with one report naming each image.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from tl_app.core.errors import ExportError
from tl_app.data.images import decode_pil
from tl_app.data.pipeline import resize_images
from tl_app.models.artifacts import BYTES_SIGNATURE, PIXELS_SIGNATURE
from tl_app.models.ood import LAYER_NAME as OOD_SCORE, VERDICT, ood_layer_of, split_outputs
from tl_app.models.tta import average_views

FLOAT_TOLERANCE = 1e-4  # max |probability difference| for SavedModel, .keras, TFLite and ONNX float32
SCORE_TOLERANCE = 1e-4  # ood_score: max |difference| / max(1, |reference|) (a distance, not a probability)
QUANTIZED_AGREEMENT = 0.99  # top-1 agreement a dynamic-range quantised model must reach
GOLDEN_SIDE = (72, 56)  # width, height: small, and not square so crops and rotations matter


@dataclass
class Golden:
    """One encoded image of the golden set; ``refused`` ones must make the byte signature fail."""

    name: str
    data: bytes
    refused: bool = False


# ---- the golden set -----------------------------------------------------------------
def source_images(run_dir: Path, count: int = 2) -> tuple[list, str]:
    """Up to ``count`` RGB Pillow images from the run's dataset (validation first), or drawn ones."""
    import numpy as np
    from PIL import Image

    images = []
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        try:
            records = json.loads(manifest.read_text()).get("records", [])
            records.sort(key=lambda r: (r.get("split") != "val", r.get("relpath", "")))
            for record in records:
                if len(images) == count:
                    break
                try:
                    images.append(Image.fromarray(decode_pil(record["path"])).resize(GOLDEN_SIDE, Image.BILINEAR))
                except Exception:  # a file gone or changed since training: use the next one
                    continue
        except (ValueError, KeyError, TypeError, AttributeError):
            images = []
    if images:
        return images, "dataset images"
    rng = np.random.default_rng(0)
    width, height = GOLDEN_SIDE
    yy, xx = np.mgrid[0:height, 0:width]
    drawn = []
    for k in range(count):
        base = np.stack([xx * (3 + k) % 256, yy * 4 % 256, (xx + yy) * 2 % 256], -1).astype(np.float64)
        drawn.append(Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)))
    return drawn, "drawn images"


def encode(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def golden_set(images) -> list[Golden]:
    """Each source image in every encoding the byte signature must decode as training does (or refuse)."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    out: list[Golden] = []
    for k, image in enumerate(images):
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        ramp = np.linspace(0, 255, w * h).reshape(h, w, 1).astype(np.uint8)
        rgba = Image.fromarray(np.concatenate([rgb, ramp], -1), "RGBA")
        palette = image.convert("RGB").convert("P", palette=Image.ADAPTIVE, colors=32)
        clear = palette.getpixel((w // 2, h // 2))  # a colour the image uses: some pixels are transparent
        wide = (rgb.astype(np.uint16) * 257 + np.arange(w, dtype=np.uint16)[None, :, None] % 257).astype(np.uint16)
        dark = (rgb[..., 0].astype(np.uint16) * 4)  # a dark 16-bit image: must stay dark
        for orientation in range(1, 9):
            exif = Image.Exif()
            exif[0x0112] = orientation
            out.append(Golden(f"{k}-jpeg-exif{orientation}", encode(image, "JPEG", quality=90, exif=exif.tobytes())))
        out += [
            Golden(f"{k}-jpeg-gray", encode(image.convert("L"), "JPEG", quality=90)),
            Golden(f"{k}-png-rgb", encode(image, "PNG")),
            Golden(f"{k}-png-rgba", encode(rgba, "PNG")),
            Golden(f"{k}-png-la", encode(rgba.convert("LA"), "PNG")),
            Golden(f"{k}-png-palette-transparent", encode(palette, "PNG", transparency=clear)),
            Golden(f"{k}-png-gray", encode(image.convert("L"), "PNG")),
            Golden(f"{k}-png-gray16-dark", encode(Image.fromarray(dark), "PNG")),
            Golden(f"{k}-png-rgb16", tf.io.encode_png(tf.constant(wide)).numpy()),
            Golden(f"{k}-gif", encode(palette, "GIF")),
            Golden(f"{k}-bmp", encode(image.convert("RGB"), "BMP")),
            Golden(f"{k}-jpeg-cmyk", encode(image.convert("CMYK"), "JPEG", quality=90), refused=True),
            Golden(f"{k}-gif-transparent", encode(palette, "GIF", transparency=clear), refused=True),
        ]
    return out


def reference_pixels(golden: list[Golden], input_size: int, policy: str, background) -> "object":
    """Training's pixels for every accepted golden image: decode_pil, then the shared resize."""
    import numpy as np

    pixels = [resize_images(decode_pil(g.data, background), input_size, policy).numpy() for g in golden if not g.refused]
    return np.stack(pixels).astype(np.float32)


# ---- comparing ------------------------------------------------------------------------
def max_abs_diff(a, b) -> float:
    import numpy as np

    if not len(a):
        return 0.0
    diff = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return float("inf") if diff != diff else diff  # NaN never passes


def compare(label: str, out, reference, names: list[str], quantized: bool = False) -> tuple[dict, list[str]]:
    """Figures for one format, and the problems that fail the gate."""
    import numpy as np

    out = np.asarray(out, np.float64)
    reference = np.asarray(reference, np.float64)
    if out.shape != reference.shape:
        return ({"max_abs_diff": float("inf"), "tolerance": FLOAT_TOLERANCE, "top1_agreement": 0.0},
                [f"{label}: output shape {out.shape}, expected {reference.shape}"])
    gaps = np.max(np.abs(out - reference), axis=1) if len(out) else np.zeros(0)
    gaps = np.where(np.isnan(gaps), np.inf, gaps)
    agree = np.argmax(out, axis=1) == np.argmax(reference, axis=1)
    figures = {"max_abs_diff": float(gaps.max()) if len(gaps) else 0.0,
               "top1_agreement": float(agree.mean()) if len(agree) else 1.0, "images": int(len(out))}
    problems = []
    if quantized:
        figures.update(tolerance=QUANTIZED_AGREEMENT, kind="quantized: top-1 agreement")
        if figures["top1_agreement"] < QUANTIZED_AGREEMENT:
            worst = [n for n, ok in zip(names, agree) if not ok][:5]
            problems.append(f"{label}: top-1 agreement {figures['top1_agreement']:.1%} < {QUANTIZED_AGREEMENT:.0%} "
                            f"(largest gap {figures['max_abs_diff']:.2e}; disagreeing: {', '.join(worst)})")
    else:
        figures.update(tolerance=FLOAT_TOLERANCE, kind="float: max |probability difference|")
        bad = [f"{n} ({g:.2e})" for n, g in zip(names, gaps) if not g <= FLOAT_TOLERANCE]
        if bad:
            problems.append(f"{label}: max |difference| {figures['max_abs_diff']:.2e} > {FLOAT_TOLERANCE:g} on "
                            f"{len(bad)} image(s): {', '.join(bad)}")
    return figures, problems


def compare_scores(label: str, out, reference, names: list[str]) -> tuple[dict, list[str]]:
    """ood_score of one format against the Keras model's: relative to the score's size."""
    import numpy as np

    if out is None or any(v is None for v in np.atleast_1d(np.asarray(out, object))):
        return {"max_rel_diff": float("inf")}, [f"{label}: no ood_score output, expected one"]
    out, reference = np.asarray(out, np.float64).reshape(-1), np.asarray(reference, np.float64).reshape(-1)
    if out.shape != reference.shape:
        return {"max_rel_diff": float("inf")}, [f"{label}: ood_score shape {out.shape}, expected {reference.shape}"]
    gaps = np.abs(out - reference) / np.maximum(1.0, np.abs(reference))
    gaps = np.where(np.isnan(gaps), np.inf, gaps)
    figures = {"max_rel_diff": float(gaps.max()) if len(gaps) else 0.0, "tolerance": SCORE_TOLERANCE}
    bad = [f"{n} ({g:.2e})" for n, g in zip(names, gaps) if not g <= SCORE_TOLERANCE]
    return figures, ([f"{label}: ood_score relative difference {figures['max_rel_diff']:.2e} > "
                      f"{SCORE_TOLERANCE:g} on {len(bad)} image(s): {', '.join(bad)}"] if bad else [])


def compare_verdicts(label: str, flags, reference_scores, threshold: float, names: list[str],
                     quantized: bool = False) -> tuple[dict, list[str]]:
    """``unknown`` of one format against the Keras score at the threshold.

    Full precision: every verdict must agree, except on images whose reference score lies
    within the score tolerance of the threshold (either side is then right). Quantised:
    the share that agrees must reach the top-1 agreement a quantised model must reach.
    """
    import numpy as np

    if flags is None:
        return {"agreement": 0.0}, [f"{label}: no {VERDICT} output, expected one"]
    flags = np.asarray(flags).reshape(-1).astype(bool)
    reference = np.asarray(reference_scores, np.float64).reshape(-1)
    expected = reference > threshold
    if flags.shape != expected.shape:
        return {"agreement": 0.0}, [f"{label}: {VERDICT} shape {flags.shape}, expected {expected.shape}"]
    agree = flags == expected
    borderline = np.abs(reference - threshold) <= SCORE_TOLERANCE * np.maximum(1.0, np.abs(reference))
    figures = {"agreement": float(agree.mean()) if len(agree) else 1.0, "unknown": int(flags.sum()),
               "expected_unknown": int(expected.sum())}
    if quantized:
        figures["tolerance"] = QUANTIZED_AGREEMENT
        ok = figures["agreement"] >= QUANTIZED_AGREEMENT
    else:
        ok = bool(np.all(agree | borderline))
    wrong = [n for n, a in zip(names, agree) if not a][:5]
    return figures, ([] if ok else [f"{label}: {VERDICT} disagrees with the Keras score at the threshold "
                                     f"{threshold:.6g} on {int((~agree).sum())} image(s): {', '.join(wrong)}"])


def savedmodel_bytes_outputs(loaded, golden: list[Golden], scores_wanted: list | None = None):
    """serving_default on each golden image: (probabilities of accepted ones, problems with refusals)."""
    import numpy as np
    import tensorflow as tf

    signature = loaded.signatures[BYTES_SIGNATURE]
    rows, scores, problems = [], [], []
    for g in golden:
        try:
            outputs = signature(image_bytes=tf.constant([g.data]))
            out = outputs["probabilities"].numpy()[0]
            score = outputs[OOD_SCORE].numpy()[0] if OOD_SCORE in outputs else None
        except tf.errors.InvalidArgumentError:
            if not g.refused:
                problems.append(f"{BYTES_SIGNATURE}: refused {g.name}, which training decodes")
            continue
        if g.refused:
            problems.append(f"{BYTES_SIGNATURE}: accepted {g.name}, which it cannot decode as training does "
                            f"(it must fail loudly)")
        else:
            rows.append(out)
            scores.append(score)
    if scores_wanted is not None:
        scores_wanted.extend(scores)
    return np.stack(rows) if rows else np.zeros((0, 0)), problems


# ---- the gate ---------------------------------------------------------------------------
def parity_gate(model, golden: list[Golden], input_size: int, policy: str, background, *,
                savedmodel_dir: Path | None = None, keras_file: Path | None = None,
                runners: dict | None = None, quantized: tuple = (), views: int = 1) -> dict:
    """Check every written format against ``model`` on ``golden``; raise ExportError listing every disagreement.

    ``runners`` maps a format name to a function of float32 pixels [N, size, size, 3]
    (TFLite, ONNX) that returns probabilities, or a dict of named outputs; a scored
    model's runners must also answer ``ood_score`` and ``unknown``. Names in
    ``quantized`` are held to top-1 (and verdict) agreement. ``views`` > 1 (export --tta): the formats carry
    test-time augmentation in their graph, and the reference is the Python path's average of ``model`` (the
    single-pass classifier) over the same views (models.tta.average_views), as predict --tta computes it.
    """
    import numpy as np
    import tensorflow as tf

    accepted = [g for g in golden if not g.refused]
    names = [g.name for g in accepted]
    pixels = reference_pixels(golden, input_size, policy, background)
    reference, reference_scores = split_outputs(average_views(
        lambda x: model.predict(x, verbose=0, batch_size=32), pixels, views) if views > 1
        else model.predict(pixels, verbose=0, batch_size=32))
    report: dict = {"images": len(accepted), "refused_inputs": [g.name for g in golden if g.refused]}
    problems: list[str] = []
    if savedmodel_dir is not None:
        loaded = tf.saved_model.load(str(savedmodel_dir))
        byte_scores: list = []
        out, refusals = savedmodel_bytes_outputs(loaded, golden, byte_scores)
        report[f"savedmodel_bytes"], found = compare(f"SavedModel {BYTES_SIGNATURE} (encoded bytes)", out,
                                                     reference, names)
        problems += refusals + found
        if reference_scores is not None:
            report["savedmodel_bytes_ood_score"], found = compare_scores(
                f"SavedModel {BYTES_SIGNATURE} (encoded bytes)", byte_scores, reference_scores, names)
            problems += found
        # pixels: at the input size, and one full-size image resized in the graph
        outputs = loaded.signatures[PIXELS_SIGNATURE](images=tf.constant(pixels))
        out = outputs["probabilities"].numpy()
        full = decode_pil(accepted[0].data, background).astype(np.float32)[None]
        outputs_full = loaded.signatures[PIXELS_SIGNATURE](images=tf.constant(full))
        out_full = outputs_full["probabilities"].numpy()
        report["savedmodel"], found = compare(f"SavedModel {PIXELS_SIGNATURE}", np.concatenate([out, out_full]),
                                              np.concatenate([reference, reference[:1]]),
                                              names + [accepted[0].name + " (full size)"])
        problems += found
        if reference_scores is not None:
            got = (np.concatenate([outputs[OOD_SCORE].numpy(), outputs_full[OOD_SCORE].numpy()])
                   if OOD_SCORE in outputs else None)
            report["savedmodel_ood_score"], found = compare_scores(
                f"SavedModel {PIXELS_SIGNATURE}", got, np.concatenate([reference_scores, reference_scores[:1]]),
                names + [accepted[0].name + " (full size)"])
            problems += found
    if keras_file is not None:
        import keras

        reloaded = keras.models.load_model(str(keras_file), compile=False)
        out, scores = split_outputs(reloaded.predict(pixels, verbose=0, batch_size=32))
        report["keras"], found = compare(".keras", out, reference, names)
        problems += found
        if reference_scores is not None:
            report["keras_ood_score"], found = compare_scores(".keras", scores, reference_scores, names)
            problems += found
    layer = ood_layer_of(model)
    threshold = None if layer is None else layer.threshold
    for label, run in (runners or {}).items():
        outputs = run(pixels)
        outputs = outputs if isinstance(outputs, dict) else {"probabilities": outputs}
        probabilities = outputs.get("probabilities", next(iter(outputs.values())))
        report[label], found = compare(label, probabilities, reference, names, quantized=label in quantized)
        problems += found
        if reference_scores is None or threshold is None:
            continue
        report[f"{label}_ood_score"], found = compare_scores(label, outputs.get(OOD_SCORE), reference_scores, names)
        if label in quantized:  # int8 weights move the score: reported, and the verdicts gated instead
            report[f"{label}_ood_score"]["kind"] = "quantized: reported, not gated"
            found = [] if outputs.get(OOD_SCORE) is not None else found
        problems += found
        report[f"{label}_unknown"], found = compare_verdicts(label, outputs.get(VERDICT), reference_scores,
                                                             float(threshold), names, quantized=label in quantized)
        problems += found
    if problems:
        raise ExportError("Export parity gate failed; nothing was published:\n  " + "\n  ".join(problems))
    return report
