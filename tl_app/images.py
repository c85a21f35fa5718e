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
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "MPO"}
FAST_MODES = {"RGB", "L"}
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
    reason: str = ""  # non-empty: the file is skipped, and this says why

    @property
    def ok(self) -> bool:
        return not self.reason


def probe_file(path: str | Path, max_pixels: int) -> Probe:
    """Hash and check one file; never raises for a bad file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return Probe(reason="broken link")
    if not path.is_file():  # FIFOs, sockets, devices: reading could block forever
        return Probe(reason="not a regular file")
    try:
        data = path.read_bytes()
    except PermissionError:
        return Probe(reason="unreadable: permission denied")
    except OSError as exc:
        return Probe(reason=f"unreadable: {exc.strerror or exc}")
    if not data:
        return Probe(reason="empty file (0 bytes)")
    probe = Probe(sha256=hashlib.sha256(data).hexdigest())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            probe.format = (image.format or "").upper()
            probe.width, probe.height = image.size
            probe.mode = image.mode
            if probe.format not in IMAGE_FORMATS:
                probe.reason = f"unsupported image format {probe.format or 'unknown'}"
                return probe
            if probe.width * probe.height > max_pixels:
                probe.reason = (
                    f"too many pixels ({probe.width}x{probe.height} > {max_pixels}); "
                    "possible decompression bomb (raise data.max_pixels if it is real)"
                )
                return probe
            probe.orientation = int(image.getexif().get(EXIF_ORIENTATION, 1) or 1)
            transparent = "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa")
            if probe.format == "JPEG" and image.mode in ("RGB", "L"):
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()  # full decode: finds truncated and corrupt data
    except Image.DecompressionBombError as exc:
        probe.reason = f"too many pixels: possible decompression bomb ({exc})"
        return probe
    except Image.DecompressionBombWarning as exc:
        probe.reason = f"too many pixels: possible decompression bomb ({exc})"
        return probe
    except Image.UnidentifiedImageError:
        probe.reason = "not an image (unknown file type)"
        return probe
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        probe.reason = "truncated image" if "truncat" in text.lower() else f"undecodable image: {text[:200]}"
        return probe
    probe.fast = (
        probe.format in ("JPEG", "PNG")
        and probe.mode in FAST_MODES
        and probe.orientation == 1
        and not transparent
    )
    return probe


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any Pillow image to 8-bit RGB: first frame, upright, alpha composited."""
    try:
        image.seek(0)
    except (AttributeError, EOFError):
        pass
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or image.mode == "PA":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def decode_pil(source: str | bytes | Path, background=(255, 255, 255)) -> np.ndarray:
    """Decode a path or encoded bytes to an HxWx3 uint8 array."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        return np.asarray(to_rgb(image, background), dtype=np.uint8)
