"""TF Serving's REST encoding: request bodies to tensors, tensors to response bodies.

Row format: ``{"instances": [...]}`` -> ``{"predictions": [...]}``; columnar:
``{"inputs": ...}`` -> ``{"outputs": ...}``. Binary values travel as
``{"b64": "..."}``. Every malformed input raises BadRequest with a message
that says what was expected; nothing here can crash the server.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re

import numpy as np
from tl_app.data.images import UNIT_RANGE_OPTION, pixel_range_problem
from tl_app.data.images import graph_decodable, to_rgb

MAX_PIXEL_SIDE = 8192
URLSAFE_B64 = re.compile(r"[A-Za-z0-9_-]*={0,2}")
DTYPE_NAMES = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE", "float16": "DT_HALF", "int32": "DT_INT32",
               "int64": "DT_INT64", "uint8": "DT_UINT8", "string": "DT_STRING", "bool": "DT_BOOL",
               "int8": "DT_INT8", "int16": "DT_INT16", "bfloat16": "DT_BFLOAT16"}


class BadRequest(Exception):
    """HTTP 400."""


class TooLarge(Exception):
    """HTTP 413."""


def parse_json(body: bytes):
    if not body:
        raise BadRequest("Empty request body: expected a JSON object such as {\"instances\": [...]}.")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"Request body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadRequest("Request body is nested too deeply to be a predict request.") from None


def is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def request_inputs(request, signature, max_images: int) -> tuple[dict, bool]:
    """(input name -> numpy batch, row_format) for one predict request."""
    if not isinstance(request, dict):
        raise BadRequest("Request body must be a JSON object with \"instances\" (rows) or \"inputs\" (columns).")
    # Other top-level keys are ignored, as TF Serving ignores them.
    if ("instances" in request) == ("inputs" in request):
        raise BadRequest("Exactly one of \"instances\" (row format) or \"inputs\" (columnar format) is required.")
    names = list(signature.inputs)
    if "instances" in request:
        raw = rows_to_columns(request["instances"], names)
        row = True
    else:
        raw = columns(request["inputs"], names)
        row = False
    tensors = {}
    for name in names:
        tensors[name] = to_array(raw[name], signature.inputs[name], name)
        problem = pixel_range_problem(tensors[name], request.get(UNIT_RANGE_OPTION) is True)
        if problem:
            raise BadRequest(f"Input {name!r}: {problem}.")
    sizes = {len(v) if np.ndim(v) else 1 for v in tensors.values()}
    if len(sizes) != 1:
        raise BadRequest(f"All inputs must have the same batch size; got {sorted(sizes)}.")
    count = sizes.pop()
    if count == 0:
        raise BadRequest("No instances given: send at least one.")
    if count > max_images:
        raise TooLarge(f"{count} instances in one request; the limit is {max_images} (--max-images).")
    return tensors, row


def rows_to_columns(instances, names: list[str]) -> dict:
    if not isinstance(instances, list):
        raise BadRequest("\"instances\" must be a list with one entry per example.")
    if len(names) == 1:
        name = names[0]
        values = []
        for item in instances:
            if isinstance(item, dict) and not is_b64(item):
                if set(item) != {name}:
                    raise BadRequest(f"Each instance must be a value or an object with the key {name!r}; "
                                     f"got keys {sorted(item)[:10]}.")
                item = item[name]
            values.append(item)
        return {name: values}
    out = {n: [] for n in names}
    for item in instances:
        if not isinstance(item, dict) or set(item) != set(names):
            raise BadRequest(f"Each instance must be an object with the keys {names}.")
        for n in names:
            out[n].append(item[n])
    return out


def columns(inputs, names: list[str]) -> dict:
    if isinstance(inputs, dict) and not is_b64(inputs):
        if set(inputs) != set(names):
            raise BadRequest(f"\"inputs\" must have exactly the keys {names}; got {sorted(inputs)[:10]}.")
        return inputs
    if len(names) != 1:
        raise BadRequest(f"This signature has several inputs; \"inputs\" must be an object with keys {names}.")
    return {names[0]: inputs}


def to_array(value, spec, name: str) -> np.ndarray:
    """A JSON value to a numpy array of the input's dtype and rank, or BadRequest."""
    rank = spec.shape.rank
    if spec.dtype.name == "string":
        array = _strings(value, name)
    else:
        if isinstance(value, (dict, str)) or value is None:
            raise BadRequest(f"Input {name!r} expects numbers ({spec.dtype.name}), got {type(value).__name__}.")
        try:
            array = np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(f"Input {name!r} must be a rectangular nested list of {spec.dtype.name} "
                             f"(every row the same length).") from None
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise BadRequest(f"Input {name!r} contains NaN or infinite values.")
    if rank is not None and array.ndim != rank:
        raise BadRequest(f"Input {name!r} must have rank {rank} (shape {shape_text(spec)}), got shape "
                         f"{list(array.shape)}.")
    for got, want in zip(array.shape[1:], spec.shape[1:]):
        if want is not None and got != want:
            raise BadRequest(f"Input {name!r} must have shape {shape_text(spec)}, got {list(array.shape)}.")
    if array.ndim >= 3 and any(side > MAX_PIXEL_SIDE for side in array.shape[1:3]):
        raise BadRequest(f"Input {name!r}: images larger than {MAX_PIXEL_SIDE} pixels a side are not accepted.")
    return array


def _strings(value, name: str) -> np.ndarray:
    if not isinstance(value, list):
        raise BadRequest(f"Input {name!r} expects a list of {{\"b64\": ...}} values.")
    out = np.empty(len(value), dtype=object)
    for i, item in enumerate(value):
        if is_b64(item):
            data = item["b64"]
            if not isinstance(data, str):
                raise BadRequest(f"Input {name!r}[{i}]: \"b64\" must be a base64 string.")
            out[i] = decode_b64(data, name, i)
        elif isinstance(item, str):
            out[i] = item.encode("utf-8")
        else:
            raise BadRequest(f"Input {name!r}[{i}] must be {{\"b64\": \"...\"}} or a string, "
                             f"got {type(item).__name__}.")
    return out


def decode_b64(data: str, name: str, index: int) -> bytes:
    """Standard base64, or the URL-safe alphabet some clients send; anything else is a 400."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    if URLSAFE_B64.fullmatch(data):
        try:
            return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        except (binascii.Error, ValueError):
            pass
    raise BadRequest(f"Input {name!r}[{index}]: \"b64\" is not valid base64.")


def shape_text(spec) -> str:
    return "[" + ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d))
                           for i, d in enumerate(spec.shape)) + "]"


# ---- images ---------------------------------------------------------------------------
JPEG_SCALES = (2, 4, 8)  # what JPEG draft mode can decode at, for free


class OpenedImage:
    """An encoded image whose header was read: its decoded size (after any downscale) and how to finish it."""

    def __init__(self, data: bytes, image, pixels: int, convert: bool):
        self.data = data
        self.image = image
        self.pixels = pixels
        self.convert = convert

    def finish(self, background=(255, 255, 255)) -> bytes:
        """The bytes the model decodes: the original, or a lossless PNG of what Pillow decoded."""
        from PIL import Image

        try:
            if not self.convert:
                return self.data
            pixels = np.asarray(to_rgb(self.image, background), dtype=np.uint8)
        except Exception as exc:
            raise BadRequest(f"Image: not a decodable image ({type(exc).__name__}: {str(exc)[:120]}).") from None
        finally:
            self.image.close()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()


def open_image(data: bytes, index: int, max_pixels: int, image_pixels: int | None = None) -> OpenedImage:
    """Read an encoded image's header (no pixels yet); refuse what is too big to decode.

    Over ``max_pixels`` is a 400 (the run's limit, as training refuses it).
    Over ``image_pixels`` (the decode budget): a JPEG is set to decode at
    1/2, 1/4 or 1/8 scale (draft mode, no full-size buffer ever), anything
    else is a 413.
    """
    from PIL import Image

    image_pixels = image_pixels or max_pixels
    if not data:
        raise BadRequest(f"Image {index}: empty.")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels or max(width, height) > 4 * MAX_PIXEL_SIDE:
            image.close()
            raise BadRequest(f"Image {index}: too many pixels ({width}x{height}); the limit is {max_pixels}.")
        convert = not graph_decodable(image)
        if width * height > image_pixels:
            scale = next((k for k in JPEG_SCALES if -(-width // k) * -(-height // k) <= image_pixels), None)
            if (image.format or "").upper() != "JPEG" or scale is None:
                image.close()
                raise TooLarge(f"Image {index}: {width}x{height} decodes to {width * height} pixels, over the "
                               f"server's budget of {image_pixels} per image (--image-pixels); send it smaller "
                               f"(as JPEG it would be downscaled while decoding).")
            image.draft("RGB", (-(-width // scale), -(-height // scale)))
            width, height = image.size
            convert = True
        return OpenedImage(data, image, width * height, convert)
    except (BadRequest, TooLarge):
        raise
    except Image.DecompressionBombError:
        raise BadRequest(f"Image {index}: too many pixels (possible decompression bomb).") from None
    except Image.UnidentifiedImageError:
        raise BadRequest(f"Image {index}: not a decodable image (unknown or unsupported format).") from None
    except Exception as exc:
        raise BadRequest(f"Image {index}: not a decodable image ({type(exc).__name__}: {str(exc)[:120]}).") from None


def prepare_image(data: bytes, index: int, max_pixels: int, background=(255, 255, 255),
                  image_pixels: int | None = None) -> bytes:
    """Check an encoded image from its header; re-encode to PNG what TF would decode differently.

    Plain JPEG/PNG pass through untouched (decoded in the SavedModel graph,
    as in training); EXIF-rotated, transparent, CMYK, 16-bit, GIF, BMP, WebP
    and TIFF images are decoded with Pillow exactly as training did and sent
    on as lossless PNG, so the server agrees with training and `tl-app predict`.
    """
    opened = open_image(data, index, max_pixels, image_pixels)
    try:
        return opened.finish(background)
    except BadRequest as exc:
        raise BadRequest(str(exc).replace("Image:", f"Image {index}:", 1)) from None


# ---- responses --------------------------------------------------------------------------
def to_json_value(name: str, array: np.ndarray):
    if array.dtype == object or array.dtype.kind == "S":
        if name.endswith("_bytes"):
            return _map_strings(array, lambda b: {"b64": base64.b64encode(b).decode("ascii")})
        return _map_strings(array, lambda b: b.decode("utf-8", errors="replace") if isinstance(b, bytes) else b)
    if array.dtype == np.float32:
        return float32_values(array)
    return array.tolist()


def float32_values(array: np.ndarray):
    """float32 as TF Serving writes it: the shortest decimal that reads back the same (at most 9 digits).

    ``array.tolist()`` widens to float64 first: 0.1f would be written 0.10000000149011612.
    """
    return np.asarray(array, dtype=np.float32).astype(str).astype(np.float64).tolist()


def float32_value(value) -> float:
    return float(str(np.float32(value)))


def classify_inputs(request, input_name: str, max_images: int) -> np.ndarray:
    """The encoded images of a TF Serving :classify body, ``{"examples": [{"image_bytes": {"b64": ...}}]}``."""
    if not isinstance(request, dict) or not isinstance(request.get("examples"), list):
        raise BadRequest("A :classify body is a JSON object with \"examples\": [{\"%s\": {\"b64\": \"...\"}}, ...]."
                         % input_name)
    context = request.get("context") or {}
    if not isinstance(context, dict):
        raise BadRequest("\"context\" must be an object of features shared by every example.")
    examples = request["examples"]
    if not examples:
        raise BadRequest("No examples given: send at least one.")
    if len(examples) > max_images:
        raise TooLarge(f"{len(examples)} examples in one request; the limit is {max_images} (--max-images).")
    values = []
    for i, example in enumerate(examples):
        if not isinstance(example, dict):
            raise BadRequest(f"Example {i} must be an object of features, such as {{\"{input_name}\": {{\"b64\": ...}}}}.")
        features = {**context, **example}
        value = features.get(input_name)
        if value is None and len(features) == 1:
            value = next(iter(features.values()))
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not is_b64(value):
            raise BadRequest(f"Example {i}: feature {input_name!r} must be {{\"b64\": \"...\"}} (the encoded image).")
        values.append(value)
    return _strings(values, input_name)


def _map_strings(array: np.ndarray, fn):
    return _map_nested(array.tolist(), fn)


def _map_nested(value, fn):
    return [_map_nested(v, fn) for v in value] if isinstance(value, list) else fn(value)


def format_response(outputs: dict, row: bool) -> dict:
    names = sorted(outputs)
    if row:
        count = len(next(iter(outputs.values())))
        columns_json = {n: to_json_value(n, outputs[n]) for n in names}
        if len(names) == 1:
            return {"predictions": columns_json[names[0]]}
        return {"predictions": [{n: columns_json[n][i] for n in names} for i in range(count)]}
    if len(names) == 1:
        return {"outputs": to_json_value(names[0], outputs[names[0]])}
    return {"outputs": {n: to_json_value(n, outputs[n]) for n in names}}


def tensor_info(spec, tensor_name: str) -> dict:
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in (spec.shape if spec.shape.rank else [])]
    return {"dtype": DTYPE_NAMES.get(spec.dtype.name, "DT_" + spec.dtype.name.upper()),
            "tensor_shape": {"dim": dims, "unknown_rank": spec.shape.rank is None},
            "name": tensor_name}


def signature_def(signature) -> dict:
    """The SignatureDef JSON of TF Serving's metadata endpoint."""
    outputs = sorted(signature.outputs.items())
    return {
        "inputs": {n: tensor_info(s, f"{signature.name}_{n}:0") for n, s in signature.inputs.items()},
        "outputs": {n: tensor_info(s, f"StatefulPartitionedCall:{i}") for i, (n, s) in enumerate(outputs)},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
