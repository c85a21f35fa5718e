"""Pretrained weights: the Keras cache, local files, offline errors, fingerprints.

``imagenet`` resolves to the standard Keras cache (``$KERAS_HOME/models``,
default ``~/.keras/models``); a missing file is downloaded through Keras'
own ``get_file`` from the same address keras.applications uses. When that
fails (no internet), the user gets one paragraph that says how to go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import h5py

from tl_app.core.errors import TlAppError, WeightsUnavailableError
from tl_app.core.files import atomic_write_text


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def cache_path(spec) -> Path:
    return keras_home() / "models" / spec.weights_file


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights(spec, weights: str) -> Path | None:
    """None for random initialisation, else the path of the weight file to load."""
    weights = str(weights or "none")
    if weights.lower() in ("none", "random"):
        return None
    if weights.lower() == "imagenet":
        path = cache_path(spec)
        if path.is_file():
            return path
        return download_imagenet(spec)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"Weight file {weights!r} does not exist. Expected 'imagenet', 'none', or the path "
            f"of a weight file for {spec.name} (.h5, .weights.h5 or .keras)."
        )
    return path


def download_imagenet(spec) -> Path:
    """The real Keras download path; on failure, a clear offline message."""
    from keras.utils import get_file

    try:
        return Path(
            get_file(
                spec.weights_file,
                spec.weights_origin,
                cache_subdir="models",
                file_hash=spec.weights_md5,
                cache_dir=str(keras_home()),
            )
        )
    except Exception as exc:  # urllib errors arrive wrapped in a bare Exception
        raise WeightsUnavailableError(offline_message(spec, exc)) from None


def offline_message(spec, exc: BaseException | None = None) -> str:
    reason = f" ({exc})" if exc else ""
    return (
        f"ImageNet weights for {spec.name} are not available{reason}. "
        f"Keras wanted the file {spec.weights_file} from {spec.weights_origin} "
        f"and keeps it in its cache at {cache_path(spec).parent} (set KERAS_HOME to move it). "
        f"On a machine without internet, copy that file here and run "
        f"'tl-app weights import FILE --backbone {spec.name}', or pass the file directly with "
        f"--weights PATH. To go on without pretrained weights, use --weights none "
        f"(random initialisation: features will be far weaker)."
    )


def is_legacy_h5(path: Path) -> bool:
    """Keras 2 / keras.applications weight files (layer_names at the root)."""
    try:
        with h5py.File(path, "r") as handle:
            return "layer_names" in handle.attrs or "model_weights" in handle
    except OSError:
        return False


def load_weight_file(model, path: str | Path, spec=None) -> None:
    """Load weights in any Keras format into ``model``, or fail with a clear message."""
    path = Path(path)
    name = spec.name if spec else model.name
    try:
        if not path.name.endswith(".keras") and not is_legacy_h5(path) and h5py.is_hdf5(str(path)):
            check_shapes(model, path)
        with warnings.catch_warnings():
            # Keras only warns when parts of a file do not match; a partial load is a wrong load.
            warnings.filterwarnings("error", message=".*(Skipping|mismatch|not match).*", category=UserWarning)
            _load(model, path)
    except (ValueError, KeyError, OSError, UserWarning) as exc:
        raise TlAppError(
            f"{path} does not fit the {name} backbone: {str(exc).splitlines()[0][:300]}. "
            f"Expected a weight file saved from keras.applications {name} without its top "
            f"(include_top=False)."
        ) from None


def check_shapes(model, path: Path) -> None:
    """Keras-3 weight files: the file's arrays must be exactly the model's, by shape."""
    shapes: list[tuple] = []

    def visit(_name, item):
        if isinstance(item, h5py.Dataset):
            shapes.append(tuple(item.shape))

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    expected = sorted(tuple(w.shape) for w in model.weights)
    if sorted(shapes) != expected:
        raise ValueError(
            f"the file holds {len(shapes)} arrays, the model has {len(expected)} weights of other shapes"
        )


def _load(model, path: Path) -> None:
    """Keras picks the loader from the file suffix: give it a link with the right one."""
    if path.suffix == ".keras" or path.name.endswith(".weights.h5"):
        model.load_weights(str(path))
    elif is_legacy_h5(path) and path.suffix in (".h5", ".hdf5"):
        model.load_weights(str(path))
    elif h5py.is_hdf5(str(path)):
        suffix = ".h5" if is_legacy_h5(path) else ".weights.h5"
        with tempfile.TemporaryDirectory(prefix="tl-app-weights-") as tmp:
            alias = Path(tmp) / ("weights" + suffix)
            os.symlink(path.resolve(), alias)
            model.load_weights(str(alias))
    else:
        raise ValueError("not an HDF5 or .keras file")


MEMO_FILE = "weights-fingerprints.json"


def fingerprint(spec, weights: str, seed: int = 0, memo_dir: str | Path | None = None) -> str:
    """Identifies the weights for cache keys and model cards.

    With ``memo_dir`` the digest is remembered there by (path, size, mtime), so
    a re-run hashes no 100 MB file; a changed file is hashed again.
    """
    path = resolve_weights(spec, weights)
    if path is None:
        return f"random-seed-{seed}"
    if memo_dir is None:
        return "sha256:" + file_digest(path)
    stat = Path(path).stat()
    key, stamp = str(Path(path).resolve()), [stat.st_size, stat.st_mtime_ns]
    memo_path = Path(memo_dir) / MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(key)
    if isinstance(hit, list) and hit[:2] == stamp:
        return hit[2]
    value = "sha256:" + file_digest(path)
    memo[key] = stamp + [value]
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(memo))
    except OSError:
        pass  # a memo that cannot be written only costs time
    return value


def weights_status(specs) -> list[dict]:
    """One row per backbone: is its ImageNet file in the cache, and is it the official one."""
    rows = []
    for spec in specs:
        path = cache_path(spec)
        row = {"backbone": spec.name, "file": str(path), "present": path.is_file(), "official": None}
        if path.is_file():
            row["official"] = file_digest(path, "md5") == spec.weights_md5
            row["size_mb"] = round(path.stat().st_size / 1e6, 1)
        rows.append(row)
    return rows


