"""Reading one image file: probe it, say why it is bad, or decode it to RGB.

The scan probes every file once with Pillow (format, size, EXIF orientation,
mode, truncation); files that TensorFlow decodes correctly as they are (JPEG
and PNG in RGB or grayscale, upright, 8-bit, opaque) are marked ``fast`` and
decoded in the tf.data graph without the GIL. Everything else goes through
``decode_pil``, which applies the EXIF orientation, composites transparency
onto a fixed background and converts every mode to 8-bit RGB.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from tl_app.data.duplicates import dhash

ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO"}
FAST_MODES = {"RGB", "L"}
GRAPH_FORMATS = {"JPEG", "PNG"}  # decoded in the tf.data graph when also upright, 8-bit and opaque
EXIF_ORIENTATION = 0x0112


@dataclass
class Probe:
    """What the scan learns about one file."""

    sha256: str = ""
    format: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    orientation: int = 1
    fast: bool = False
    dhash: str = ""  # perceptual hash (data.duplicates): near-duplicates across splits
    reason: str = ""  # non-empty: the file is skipped, and this says why

    @property
    def ok(self) -> bool:
        return not self.reason


# ---- the checks every reader shares (dataset scan, tl-app predict) -----------------------
EMPTY_FILE = "empty file (0 bytes)"
PIXEL_HINT = " (raise data.max_pixels if it is real)"


def path_problem(path: Path) -> str:
    """Why ``path`` cannot be read as a file at all ("" when it can), before opening it."""
    if path.is_symlink() and not path.exists():
        return "broken link"
    if not path.is_file():  # FIFOs, sockets, devices: reading could block forever
        return "not a regular file"
    return ""


def unreadable(exc: OSError) -> str:
    """The reason for a file that exists but could not be opened or read."""
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    return f"unreadable: {exc.strerror or exc}"


def decode_problem(exc: BaseException) -> str:
    """The reason for an error Pillow raised while opening or decoding an image."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels: possible decompression bomb ({exc})"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (unknown file type)"
    text = str(exc)
    return "truncated image" if "truncat" in text.lower() else f"undecodable image: {text[:200]}"


def graph_decodable(image: Image.Image) -> bool:
    """The ``fast`` rule: does TensorFlow's decoder give the same pixels as ``decode_pil``?

    Plain upright 8-bit opaque JPEG/PNG: yes. EXIF-rotated, transparent, CMYK,
    16-bit, GIF, BMP, WebP, TIFF...: no, decode those with Pillow.
    """
    fmt = (image.format or "").upper()
    orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    opaque = "transparency" not in image.info and image.mode in FAST_MODES
    return fmt in GRAPH_FORMATS and opaque and orientation == 1


def read_header(image: Image.Image, probe: Probe, max_pixels: int, pixel_hint: str = "") -> Probe:
    """Format, size, mode and orientation of an opened image into ``probe``; a reason if they rule it out."""
    probe.format = (image.format or "").upper()
    probe.width, probe.height = image.size
    probe.mode = image.mode
    if probe.format not in IMAGE_FORMATS:
        probe.reason = f"unsupported image format {probe.format or 'unknown'}"
    elif probe.width * probe.height > max_pixels:
        probe.reason = (f"too many pixels ({probe.width}x{probe.height} > {max_pixels}); "
                        f"possible decompression bomb{pixel_hint}")
    else:
        probe.orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
    return probe


def probe_header(path: str | Path, max_pixels: int) -> Probe:
    """probe_file's checks that need only the header: no hash, no pixel decode; never raises for a bad file.

    For readers that decode the file next anyway (tl-app predict): a truncated
    or corrupt body shows up there, not here.
    """
    path = Path(path)
    problem = path_problem(path)
    if problem:
        return Probe(reason=problem)
    try:
        handle = open(path, "rb")
    except OSError as exc:
        return Probe(reason=unreadable(exc))
    with handle:
        try:
            if os.fstat(handle.fileno()).st_size == 0:
                return Probe(reason=EMPTY_FILE)
        except OSError as exc:
            return Probe(reason=unreadable(exc))
        probe = Probe()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(handle) as image:
                    read_header(image, probe, max_pixels)
                    probe.fast = not probe.reason and graph_decodable(image)
        except Exception as exc:  # a corrupt header can raise almost anything inside Pillow
            probe.reason = decode_problem(exc)
            probe.fast = False
    return probe


def probe_file(path: str | Path, max_pixels: int) -> Probe:
    """Hash and check one file (header and full decode); never raises for a bad file."""
    path = Path(path)
    problem = path_problem(path)
    if problem:
        return Probe(reason=problem)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Probe(reason=unreadable(exc))
    if not data:
        return Probe(reason=EMPTY_FILE)
    probe = Probe(sha256=hashlib.sha256(data).hexdigest())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if read_header(image, probe, max_pixels, PIXEL_HINT).reason:
                return probe
            fast = graph_decodable(image)
            if probe.format == "JPEG" and image.mode in ("RGB", "L"):
                # a cheap decode, still large enough for a faithful perceptual hash
                image.draft(image.mode, (max(min(image.width, 64), image.width // 8),
                                         max(min(image.height, 64), image.height // 8)))
            image.load()  # full decode: finds truncated and corrupt data
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, SyntaxError, ValueError,
            EOFError) as exc:
        probe.reason = decode_problem(exc)
        return probe
    probe.fast = fast
    try:
        probe.dhash = dhash(image)
    except (OSError, ValueError):
        probe.dhash = ""
    return probe


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I": how older Pillow opens 16-bit gray PNG


def scale_16bit(array: np.ndarray) -> np.ndarray:
    """16-bit values to 8 bits by the mode's range, never by the content: round(v * 255 / 65535).

    A dark 16-bit image stays dark (scaling by its own maximum brightened it 257x).
    The graph decoder (data.decode) uses the same integer formula.
    """
    values = np.clip(np.asarray(array, np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def composite(rgba: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """RGBA uint8 onto an opaque background: round((c*a + bg*(255-a)) / 255), the graph decoder's rounding."""
    values = np.asarray(rgba, np.int32)
    alpha = values[..., 3:4]
    bg = np.asarray(background, np.int32).reshape(1, 1, 3)
    return ((values[..., :3] * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any Pillow image to 8-bit RGB: first frame, upright, alpha composited."""
    try:
        image.seek(0)
    except (AttributeError, EOFError):
        pass
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        image = Image.fromarray(scale_16bit(np.asarray(image)), "L")
    if image.mode in ("P", "PA", "RGBA", "LA", "RGBa", "La") or "transparency" in image.info:
        return Image.fromarray(composite(np.asarray(image.convert("RGBA")), background), "RGB")
    return image.convert("RGB")


def decode_pil(source: str | bytes | Path, background=(255, 255, 255)) -> np.ndarray:
    """Decode a path or encoded bytes to an HxWx3 uint8 array."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        return np.asarray(to_rgb(image, background), dtype=np.uint8)


# ---- the pixel contract of predict_pixels, TFLite and ONNX ------------------------------------
UNIT_RANGE_OPTION = "allow_unit_range"  # the request key that accepts 0..1-looking pixels on purpose


def looks_scaled_to_unit(image: np.ndarray) -> bool:
    """True for float pixels that look scaled to 0..1 (every value within [0, 1], not a constant image).

    The models take RGB 0..255; a client sending 0..1 gets confident nonsense.
    """
    values = np.asarray(image)
    if values.dtype.kind != "f" or values.size == 0:
        return False
    low, high = float(values.min()), float(values.max())
    return 0.0 <= low and high <= 1.0 and high > low


def pixel_range_problem(images: np.ndarray, allow_unit_range: bool = False) -> str:
    """Why a float pixel batch [N, H, W, 3] breaks the 0..255 RGB contract ("" when it does not)."""
    values = np.asarray(images)
    if values.dtype.kind != "f" or values.ndim != 4 or values.size == 0:
        return ""
    for index, image in enumerate(values):
        low, high = float(image.min()), float(image.max())
        if low < -0.5 or high > 255.5:
            return (f"image {index} has values from {low:g} to {high:g}; the model takes RGB pixels 0..255 "
                    f"(not preprocessed or normalised values: the preprocessing runs inside the model)")
        if not allow_unit_range and looks_scaled_to_unit(image):
            return (f"image {index}: every value is within 0..1; the model takes RGB pixels 0..255, not 0..1 "
                    f"(multiply by 255). If these really are 0..255 pixels this dark, add "
                    f"\"{UNIT_RANGE_OPTION}\": true to the request")
    return ""
