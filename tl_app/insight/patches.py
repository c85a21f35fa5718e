"""Maximal-activation patches: the regions of the user's own images that make a feature fire hardest.

One streaming pass over the folder keeps, for every channel of one convolutional
layer, the K images whose strongest activation is highest (one position per
image) and a running variance of that strongest activation; beyond the list of
files, memory does not grow with the folder. Each winner's receptive field (models.receptive_field) is
mapped back through the resize policy the model was fed with and cropped from
the decoded original (EXIF-oriented, transparency on the run's background).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tl_app.core.files import atomic_write_bytes
from tl_app.core.errors import ConfigError, DataError, TlAppError, unknown_choice
from tl_app.data.images import EXIF_ORIENTATION, decode_pil
from tl_app.data.pipeline import effective_policy, make_dataset
from tl_app.data.scan import scan
from tl_app.models.backbones import REGISTRY, BackbonePreprocess, build_base, canonical_name, get_spec
from tl_app.models.backbones import resolve_input_size
from tl_app.models.opener import open_model
from tl_app.models.receptive_field import Field, receptive_field, spatial_layers
from tl_app.models.surgery import find_backbone
from tl_app.models.weights import labelled
from tl_app.insight.plots import Tile, contact_sheet

DEFAULT_UNITS = 8
DEFAULT_PER_UNIT = 6


# ---- mapping a box back to the original image -------------------------------------------
def to_original(box, size: int, height: int, width: int, policy: str) -> tuple[int, int, int, int]:
    """A (top, left, bottom, right) box in model-input pixels -> the same region of the original image,
    undoing the resize policy of data.pipeline.resize_images (stretch, letterbox, center_crop)."""
    top, left, bottom, right = box
    policy = effective_policy(policy)
    if policy == "stretch":
        sy, sx, oy, ox = height / size, width / size, 0.0, 0.0
    elif policy == "center_crop":
        side = min(height, width)
        sy = sx = side / size
        oy, ox = (height - side) // 2, (width - side) // 2
    elif policy == "letterbox":  # tf.image.resize_with_pad's arithmetic, in float32 as TensorFlow does it
        f = np.float32
        ratio = max(f(width) / f(size), f(height) / f(size))
        rh, rw = f(height) / ratio, f(width) / ratio
        pad_y, pad_x = max(0, int(np.floor((f(size) - rh) / 2))), max(0, int(np.floor((f(size) - rw) / 2)))
        rh, rw = int(np.floor(rh)), int(np.floor(rw))
        sy, sx = height / rh, width / rw
        oy, ox = -pad_y * sy, -pad_x * sx
    else:
        raise ConfigError(unknown_choice("resize policy", policy, ("stretch", "letterbox", "center_crop")))
    y0, y1 = oy + top * sy, oy + bottom * sy
    x0, x1 = ox + left * sx, ox + right * sx
    y0, x0 = max(0, int(np.floor(y0))), max(0, int(np.floor(x0)))
    y1, x1 = min(height, int(np.ceil(y1))), min(width, int(np.ceil(x1)))
    return y0, x0, max(y1, y0 + 1), max(x1, x0 + 1)


# ---- what is probed ----------------------------------------------------------------------
@dataclass
class Probe:
    """A layer to read: pixels (N, size, size, 3, 0..255) -> activations (N, h, w, C), and what frames it."""

    activations: Callable = field(repr=False)
    layer: str
    field: Field
    input_size: int
    resize_policy: str
    description: str
    background: tuple = (255, 255, 255)
    classes: list[str] = field(default_factory=list)  # a trained model's classes
    class_weights: np.ndarray | None = field(default=None, repr=False)  # (channels, classes) head weights
    class_weights_note: str = ""
    identity: str = ""  # what makes two passes the same (model files, weights, layer, size, policy); "" = no cache


def _layer_model(model, layer: str):
    import keras

    names = spatial_layers(model)
    if layer not in names:
        raise ConfigError(unknown_choice(f"convolutional layer of {model.name}", layer, names))
    return keras.Model(model.input, model.get_layer(layer).output)


def _default_layer(model, name: str) -> str:
    spec = REGISTRY.get(name)
    names = spatial_layers(model)
    if spec is not None and spec.last_conv_layer in names:
        return spec.last_conv_layer
    convs = [layer.name for layer in model.layers if layer.name in names and hasattr(layer, "kernel_size")]
    if not convs:
        raise ConfigError(f"Model {model.name!r} has no convolutional layer to draw patches for.")
    return convs[-1]


def _call(model) -> Callable:
    def activations(images):  # predict_on_batch: one compiled function, not an eager call per batch
        return np.asarray(model.predict_on_batch(np.asarray(images, np.float32)), np.float32)
    return activations


def head_class_weights(head, channels: int) -> tuple[np.ndarray, str]:
    """(channels, classes): how much each pooled feature pushes each class up in a trained head.

    A logistic head is one Dense layer: its kernel, exactly. A dense head's hidden layers are
    multiplied through (ReLU, BatchNormalization and dropout ignored): a linear approximation.
    """
    from keras import layers

    dense = [layer for layer in head.layers if isinstance(layer, layers.Dense)]
    if not dense:
        raise TlAppError(f"The head {head.name!r} has no Dense layer: --for-class needs a trained dense or "
                         f"logistic head.")
    weights = np.asarray(dense[0].kernel, np.float64)
    for layer in dense[1:]:
        weights = weights @ np.asarray(layer.kernel, np.float64)
    if weights.shape[0] != channels:
        raise ConfigError(
            f"The head reads {weights.shape[0]} pooled features but the layer has {channels} channels: "
            f"--for-class works on the layer the head is pooled from (leave --layer out).")
    note = "head kernel" if len(dense) == 1 else (
        f"product of the head's {len(dense)} Dense kernels (a linear approximation: ReLU/BN ignored)")
    return weights, note


def probe_for(source, layer: str = "", weights: str = "none", input_size: int = 0,
              resize_policy: str = "auto") -> Probe:
    """A backbone name (built with ``weights``), a trained run/export (opened), or a Keras model (notebooks)."""
    import keras

    if isinstance(source, keras.Model):
        size = int(source.inputs[0].shape[1])
        layer = layer or _default_layer(source, source.name)
        return Probe(_call(_layer_model(source, layer)), layer, receptive_field(source, layer), size,
                     resize_policy, f"model {source.name}")
    name = str(source)
    if canonical_name(name) is not None and not Path(name).exists():
        spec = get_spec(name)
        size = resolve_input_size(spec, input_size)
        base = build_base(spec, size, weights)
        layer = layer or spec.last_conv_layer
        inner = _layer_model(base, layer)
        inputs = keras.Input((size, size, 3), name="image")
        model = keras.Model(inputs, inner(BackbonePreprocess(spec.preprocess, name="preprocess")(inputs)))
        weight_file = Path(weights) if weights and Path(weights).is_file() else None
        identity = json.dumps([spec.name, weights, file_stamp(weight_file) if weight_file else None, layer, size,
                               effective_policy(resize_policy)])
        return Probe(_call(model), layer, receptive_field(base, layer), size, resize_policy,
                     f"{spec.name} ({labelled(weights) if weights not in ('', 'none') else 'random weights'})",
                     identity=identity)
    loaded = open_model(name, keras=True)
    model = loaded.model
    spec = REGISTRY.get(loaded.backbone)
    if spec is None:
        raise TlAppError(f"{name}: its backbone {loaded.backbone!r} is not one tl-app knows; patches need it.")
    backbone = find_backbone(model, spec)
    layer = layer or _default_layer(backbone, spec.name)
    inner = _layer_model(backbone, layer)
    try:
        preprocess = model.get_layer("preprocess")
    except ValueError:
        preprocess = None
    inputs = keras.Input((loaded.input_size, loaded.input_size, 3), name="image")
    probe_model = keras.Model(inputs, inner(preprocess(inputs) if preprocess is not None else inputs))
    class_weights, note = None, ""
    try:
        head = model.get_layer("head")
    except ValueError:
        head = None
    if head is not None:
        channels = int(inner.output.shape[-1])
        try:
            class_weights, note = head_class_weights(head, channels)
        except ConfigError as exc:
            note = str(exc)
    trained = labelled(loaded.config.backbone.weights) if loaded.config is not None else ""
    return Probe(_call(probe_model), layer, receptive_field(backbone, layer), loaded.input_size,
                 loaded.resize_policy, f"{loaded.label} ({spec.name}{', ' + trained if trained else ''})",
                 tuple(loaded.background), list(loaded.classes), class_weights, note,
                 identity=json.dumps([str(Path(loaded.source).resolve()), folder_stamp(loaded.source), layer]))


def file_stamp(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def folder_stamp(folder: Path) -> list:
    """Size and time of a model folder's own files: a retrained or re-exported model is another pass."""
    return [file_stamp(p) for p in sorted(Path(folder).iterdir()) if p.is_file()]


# ---- the streaming pass ------------------------------------------------------------------
class TopK:
    """Per channel, the K highest per-image peaks (value, image, row, col), and their running variance."""

    def __init__(self, channels: int, k: int):
        self.k = k
        self.values = np.full((channels, k), -np.inf, np.float32)
        self.images = np.full((channels, k), -1, np.int64)
        self.rows = np.zeros((channels, k), np.int32)
        self.cols = np.zeros((channels, k), np.int32)
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add(self, activations: np.ndarray, image_ids) -> None:
        batch, height, width, channels = activations.shape
        flat = activations.reshape(batch, height * width, channels)
        where = flat.argmax(axis=1)  # (B, C)
        peaks = np.take_along_axis(flat, where[:, None, :], axis=1)[:, 0, :]
        self._variance(peaks)
        values = np.concatenate([self.values, peaks.T], axis=1)
        images = np.concatenate([self.images, np.broadcast_to(np.asarray(image_ids, np.int64), (channels, batch))],
                                axis=1)
        rows = np.concatenate([self.rows, (where // width).T.astype(np.int32)], axis=1)
        cols = np.concatenate([self.cols, (where % width).T.astype(np.int32)], axis=1)
        keep = np.argsort(-values, axis=1, kind="stable")[:, :self.k]
        self.values, self.images = np.take_along_axis(values, keep, 1), np.take_along_axis(images, keep, 1)
        self.rows, self.cols = np.take_along_axis(rows, keep, 1), np.take_along_axis(cols, keep, 1)

    def _variance(self, peaks: np.ndarray) -> None:  # Chan et al.'s parallel update
        n = len(peaks)
        mean = peaks.mean(axis=0, dtype=np.float64)
        m2 = ((peaks - mean) ** 2).sum(axis=0, dtype=np.float64)
        delta = mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.count, 1)


def stream(probe: Probe, records, k: int, batch_size: int = 32, say=None) -> tuple[TopK | None, list]:
    """One pass through data.pipeline's decode and resize (parallel, the training pipeline's own):
    (top-K per channel, skipped files). Heaps refer to images by their index in ``records``."""
    top, seen, done = None, np.zeros(len(records), bool), 0
    dataset = make_dataset(records, probe.input_size, probe.resize_policy, batch_size, with_index=True,
                           background=probe.background)
    for images, index in dataset:
        acts = probe.activations(images.numpy())
        if acts.ndim != 4:
            raise TlAppError(f"Layer {probe.layer!r} gives {acts.ndim}-D outputs; patches need (N, H, W, C).")
        top = top or TopK(acts.shape[-1], k)
        index = index.numpy()
        top.add(acts, index)
        seen[index] = True
        done += len(index)
        if say is not None and done // batch_size % 20 == 0:
            say(f"  {done} of {len(records)} images")
    skipped = [{"path": records[i].path, "reason": "could not be decoded (or changed since the scan)"}
               for i in np.flatnonzero(~seen)]
    return top, skipped


def oriented_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as decoded: EXIF orientations 5-8 swap the stored sides."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        turned = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1) in (5, 6, 7, 8)
    return (width, height) if turned else (height, width)


# ---- the pass cache ----------------------------------------------------------------------
def cache_file(probe: Probe, records, cache_dir) -> Path | None:
    """One file per (model, layer, size, policy, the images in order and their content); None: no cache."""
    if not cache_dir or not probe.identity:
        return None
    digest = hashlib.sha256(probe.identity.encode())
    for record in records:
        digest.update(f"\0{record.path}\0{record.sha256}".encode())
    return Path(cache_dir) / f"pass-{digest.hexdigest()[:24]}.npz"


def cached_pass(path: Path | None, k: int) -> tuple[TopK | None, list]:
    """The heaps of an earlier pass with at least ``k`` patches per unit (cut to ``k``), or None."""
    if path is None or not path.is_file():
        return None, []
    try:
        with np.load(path) as data:
            if int(data["k"]) < k:
                return None, []
            top = TopK(data["values"].shape[0], k)
            for name in ("values", "images", "rows", "cols"):
                setattr(top, name, np.array(data[name][:, :k]))
            top.count, top.mean, top.m2 = int(data["count"]), np.array(data["mean"]), np.array(data["m2"])
            return top, json.loads(str(data["skipped"]))
    except (OSError, ValueError, KeyError):  # a damaged cache file is a miss, never an error
        return None, []


def save_pass(path: Path | None, top: TopK, skipped: list) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, values=top.values, images=top.images, rows=top.rows, cols=top.cols, count=top.count,
             mean=top.mean, m2=top.m2, k=top.k, skipped=json.dumps(skipped))
    atomic_write_bytes(path, buffer.getvalue())


# ---- which units -------------------------------------------------------------------------
def choose_units(top: TopK, probe: Probe, units: int = DEFAULT_UNITS, unit_ids=None,
                 for_class: str | None = None) -> tuple[list[int], str]:
    channels = top.values.shape[0]
    if unit_ids:
        bad = [u for u in unit_ids if not 0 <= int(u) < channels]
        if bad:
            raise ConfigError(f"--unit {bad[0]} is out of range: layer {probe.layer!r} has channels "
                              f"0..{channels - 1}.")
        return [int(u) for u in unit_ids], "chosen"
    if units < 1:
        raise ConfigError(f"--units must be at least 1, got {units}.")
    if for_class is not None:
        return class_units(probe, for_class, units), f"largest head weights for {for_class!r}"
    return [int(u) for u in np.argsort(-top.variance, kind="stable")[:units]], "highest variance across the images"


def class_units(probe: Probe, class_name: str, units: int) -> list[int]:
    if probe.class_weights is None:
        raise ConfigError(
            "--for-class needs a trained model (a run directory or an exported model) whose head reads this "
            f"layer's pooled features; got {probe.description}. {probe.class_weights_note}".strip())
    if class_name not in probe.classes:
        raise ConfigError(unknown_choice("class", class_name, probe.classes))
    column = probe.class_weights[:, probe.classes.index(class_name)]
    order = [int(u) for u in np.argsort(-column, kind="stable") if column[u] > 0]
    return order[:units]


# ---- the entry point ---------------------------------------------------------------------
def check_arguments(units: int, per_unit: int, batch_size: int) -> None:
    if per_unit < 1:
        raise ConfigError(f"--per-unit must be at least 1, got {per_unit}.")
    if units < 1:
        raise ConfigError(f"--units must be at least 1, got {units}.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")


def folder_records(data) -> list:
    """Every usable image of a dataset folder (all splits), as data.scan finds them."""
    manifest = scan(data)
    if not manifest.records:
        raise DataError(f"No usable image in {str(data)!r}: expected root/<class>/*.jpg (or .png ...).")
    return manifest.records


def patches(source, data, layer: str = "", units: int = DEFAULT_UNITS, unit_ids=None, per_unit: int = DEFAULT_PER_UNIT,
            for_class: str | None = None, out: str | Path | None = None, weights: str = "none",
            input_size: int = 0, resize_policy: str = "auto", batch_size: int = 32, echo=print,
            probe: Probe | None = None, records=None, sheet: bool = True, cache_dir: str | Path | None = None
            ) -> dict:
    """Top-``per_unit`` patches of chosen channels of one layer over a folder; a contact sheet and a JSON list.

    ``source``: a backbone name (``weights`` says which), a run directory or exported model, or a Keras
    model. ``records`` (data.scan Records) replace the folder scan (the report passes the run's).
    With ``cache_dir``, the pass (top-K heaps of every unit, variances) is kept there, keyed by the model's
    files, layer, size, policy and the images' content: other units, rules or a smaller K need no new pass.
    """
    say = echo or (lambda *a, **k: None)
    check_arguments(units, per_unit, batch_size)
    probe = probe or probe_for(source, layer, weights, input_size, resize_policy)
    if for_class is not None and not unit_ids:
        class_units(probe, for_class, units)  # fail before the pass, not after it
    records = list(records) if records is not None else folder_records(data)
    say(f"{probe.description}: layer {probe.layer}, receptive field {probe.field.size[0]:g} px "
        f"(jump {probe.field.jump[0]:g}) at {probe.input_size} px; {len(records)} images")
    cache = cache_file(probe, records, cache_dir)
    top, skipped = cached_pass(cache, per_unit)
    cached = top is not None
    if cached:
        say(f"  activations from the cache: {cache}")
    else:
        top, skipped = stream(probe, records, per_unit, batch_size, say)
        if top is not None:
            save_pass(cache, top, skipped)
    if top is None:
        raise DataError(f"None of the {len(records)} images of {str(data)!r} could be read.")
    chosen, rule = choose_units(top, probe, units, unit_ids, for_class)
    rows = unit_rows(top, records, probe, chosen)
    summary = {"source": probe.description, "layer": probe.layer, "input_size": probe.input_size,
               "resize_policy": effective_policy(probe.resize_policy),
               "receptive_field": {"size": list(probe.field.size), "jump": list(probe.field.jump),
                                   "start": list(probe.field.start)},
               "images": top.count, "cached": cached, "units_rule": rule, "units": rows, "skipped": skipped,
               "patches": [e for r in rows for e in r["patches"]]}
    if for_class is not None:
        summary["for_class"] = for_class
        summary["class_weights"] = probe.class_weights_note
    if sheet:
        path = Path(out) if out else Path("patches.png")
        summary["sheet"] = str(draw_sheet(rows, path, f"{probe.description} · {probe.layer} · units by {rule}",
                                          probe.background))
        path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        summary["json"] = str(path.with_suffix(".json"))
        say(f"sheet: {summary['sheet']} ({len(rows)} units x up to {per_unit} patches); list: {summary['json']}")
    for item in skipped:
        say(f"skipped {item['path']}: {item['reason']}")
    return summary


def unit_rows(top: TopK, records, probe: Probe, chosen: list[int]) -> list[dict]:
    """Each chosen unit's patches: file, class, activation, position in the layer, box in the original."""
    rows = []
    for unit in chosen:
        entries = []
        for value, image, row, col in zip(top.values[unit], top.images[unit], top.rows[unit], top.cols[unit]):
            if image < 0 or not np.isfinite(value):
                continue
            record = records[int(image)]
            path, label = record.path, record.label
            height, width = oriented_size(path)
            box_in = probe.field.box(int(row), int(col), probe.input_size, probe.input_size)
            box = to_original(box_in, probe.input_size, height, width, probe.resize_policy)
            entries.append({"file": path, "class": label, "unit": unit, "value": float(value),
                            "position": [int(row), int(col)], "box": list(box),
                            "box_input": [round(v, 2) for v in box_in]})
        rows.append({"unit": unit, "variance": float(top.variance[unit]), "patches": entries})
    return rows


# ---- the run report's "What the features see" -----------------------------------------------
REPORT_IMAGES = 1000  # the report reads at most this many of the run's images (evenly spaced)


def class_feature_patches(run_dir: str | Path, records, out_dir: str | Path, units: int = 4,
                          per_unit: int = 6) -> dict:
    """For every class, the units its head weighs most and their patches: one streaming pass, one sheet
    per class. Kept in out_dir/features.json so a second report does not read the images again."""
    out_dir = Path(out_dir)
    saved = out_dir / "features.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    records = list(records)
    if len(records) > REPORT_IMAGES:
        records = [records[int(i)] for i in np.linspace(0, len(records) - 1, REPORT_IMAGES)]
    probe = probe_for(str(run_dir))
    if probe.class_weights is None:
        raise TlAppError(f"the head gives no per-feature class weights ({probe.class_weights_note or 'no Dense head'})")
    top, skipped = stream(probe, records, per_unit)
    if top is None:
        raise DataError("none of the run's images could be read")
    classes = []
    for name in probe.classes:
        rows = unit_rows(top, records, probe, class_units(probe, name, units))
        sheet = draw_sheet(rows, out_dir / f"class_{len(classes):02d}.png",
                           f"{name}: the {len(rows)} units with the largest head weights", probe.background)
        weights = probe.class_weights[:, probe.classes.index(name)]
        classes.append({"class": name, "sheet": str(sheet),
                        "units": [{"unit": r["unit"], "weight": float(weights[r["unit"]]), "patches": r["patches"]}
                                  for r in rows]})
    summary = {"source": probe.description, "layer": probe.layer, "images": top.count,
               "receptive_field": probe.field.size[0], "class_weights": probe.class_weights_note,
               "classes": classes, "skipped": skipped}
    out_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(summary, indent=2))
    return summary


def crop(entry: dict, background=(255, 255, 255), thumb: int = 96) -> np.ndarray:
    """The patch, scaled so its longer side is ``thumb`` pixels (small fields are enlarged, not lost)."""
    from PIL import Image

    top, left, bottom, right = entry["box"]
    patch = Image.fromarray(decode_pil(entry["file"], background)[top:bottom, left:right])
    scale = thumb / max(patch.size)
    size = (max(1, round(patch.size[0] * scale)), max(1, round(patch.size[1] * scale)))
    resample = Image.Resampling.NEAREST if scale > 2 else Image.Resampling.LANCZOS
    return np.asarray(patch.resize(size, resample))


def draw_sheet(rows: list[dict], path: str | Path, title: str, background=(255, 255, 255),
               thumb: int = 96) -> Path:
    """One row per unit, its patches left to right, each captioned with its image's class and activation."""
    grid = []
    for row in rows:
        tiles = []
        for n, entry in enumerate(row["patches"]):
            caption = f"{'unit ' + str(row['unit']) + ': ' if n == 0 else ''}{entry['class']}\n{entry['value']:.3g}"
            try:
                image = crop(entry, background, thumb)
            except Exception:  # noqa: BLE001 - a file gone since the pass becomes a grey tile
                image = np.full((thumb, thumb, 3), 200, np.uint8)
            tiles.append(Tile(image, caption))
        grid.append(tiles)
    return contact_sheet(grid, path, title, thumb=thumb, cell_inches=1.3)
