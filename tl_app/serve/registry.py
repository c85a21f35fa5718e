"""The models a server knows: every saved_models/<name>/<version> under its root.

As TF Serving does, the newest version of each model is loaded eagerly and a
poll of the root picks up new versions without a restart; an older version is
loaded when a request names it, and unloaded again after a while unused.
Names and versions are only ever looked up in what the scan found, and a
model or version folder whose real path (symlinks resolved) leaves its root
is skipped: a request can never turn into a path outside the root. A models
config file (TF Serving's) names each model's own root, its version policy
and its version labels instead of the scan.

A version that fails to load (a half-copied folder) is retried when its
folder changes, with a backoff; its error, shown in the status, names no
server path. A request for the latest version falls back to the newest one
still available when the newest is removed under it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tl_app.core.config import MAX_PIXELS
from tl_app.models.artifacts import BYTES_SIGNATURE, CARD_FILE, SAVED_MODEL_FILE, list_versions, read_card, valid_model_name
from tl_app.models.opener import DEFAULT_BACKGROUND, open_savedmodel, run_background
from tl_app.serve.batching import DirectRunner, DynamicBatcher, Unavailable
from tl_app.serve.codec import BadRequest

log = logging.getLogger("tl_app.serve")
MAX_BATCHERS = 8  # per version: one per signature and input shape, least recently used closed first
RETRY_BACKOFF = (1.0, 60.0)  # seconds before a failed version whose folder changed is retried: first, most
NAME_ECHO = 100  # characters of a requested name echoed back in an error


def short(name) -> str:
    """A client-given name cut to a sane length for an error message."""
    text = str(name)
    return text if len(text) <= NAME_ECHO else text[:NAME_ECHO] + "..."


def listing(items, most: int = 20) -> str:
    """At most ``most`` items, comma-separated, and how many more there are."""
    items = [str(i) for i in items]
    more = f" ... and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


@dataclass
class Source:
    """Where one model's versions live, which of them to serve and its version labels (a models config entry)."""

    base_path: Path
    policy: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple = ()
    labels: dict = field(default_factory=dict)

    def allowed(self, versions: list[int]) -> list[int]:
        if self.policy == "specific":
            return [v for v in versions if v in self.versions]
        return list(versions)

    def eager(self, versions: list[int]) -> list[int]:
        """The versions loaded without being asked for: the newest N (latest), every one (all, specific)."""
        if self.policy == "latest":
            return versions[-max(1, self.num_versions):]
        return versions


class NotFound(Exception):
    """Unknown model, version or signature: HTTP 404 (or 400 for a signature)."""


@dataclass
class Signature:
    """One signature of a loaded SavedModel: names, dtypes and shapes of its tensors."""

    name: str
    function: object = field(repr=False)
    inputs: dict  # name -> tf.TensorSpec
    outputs: dict  # name -> tf.TensorSpec

    @property
    def batchable(self) -> bool:
        specs = list(self.inputs.values()) + list(self.outputs.values())
        return all(s.shape.rank and s.shape.rank >= 1 and s.shape[0] is None for s in specs)

    def __call__(self, inputs: dict) -> dict:
        import tensorflow as tf

        feed = {k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in inputs.items()}
        return {k: v.numpy() for k, v in self.function(**feed).items()}


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    card: dict
    loaded: object = field(repr=False)
    signatures: dict  # name -> Signature
    background: tuple = DEFAULT_BACKGROUND  # training's data.background: transparent images are composited on it
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    runners: OrderedDict = field(default_factory=OrderedDict, repr=False)  # least recently used first
    arriving: int = 0  # requests for this version between lookup and submit (event-loop thread only)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    closed: bool = False
    classes: list = field(init=False)

    max_pixels: int = field(init=False)  # per request image: the run's data.max_pixels unless serve.max_pixels

    def __post_init__(self):
        self.classes = list(self.card.get("classes") or [])
        data = (self.card.get("config") or {}).get("data") or {}
        card_limit = data.get("max_pixels")
        valid = isinstance(card_limit, int) and not isinstance(card_limit, bool) and card_limit > 0
        self.max_pixels = card_limit if valid else MAX_PIXELS

    def signature(self, name: str | None) -> Signature:
        key = name or BYTES_SIGNATURE
        if key not in self.signatures:
            raise BadRequest(f"Serving signature name: \"{short(key)}\" not found in signature def; "
                           f"available: {', '.join(sorted(self.signatures))}")
        return self.signatures[key]

    def runner(self, signature: Signature, inputs: dict, settings, executor: Executor, metrics,
               incoming=lambda: 0):
        """The runner for this signature and input shape: a batcher (at most MAX_BATCHERS kept) or a direct call.

        Call it on the event loop and submit before the next ``await``: an idle batcher may be closed here.
        ``incoming()`` counts requests whose bodies are still being read: the batcher waits for them too.
        """
        on_batch = (lambda size, s=signature.name: metrics.batch(self.name, s, size))
        on_stage = (lambda stage, value: metrics.stage(self.name, stage, value))
        allowed = tuple(getattr(settings, "allowed_batch_sizes", ()) or ())
        batching = settings.batching and signature.batchable
        key = (signature.name,) + (tuple((k, np.shape(v)[1:]) for k, v in sorted(inputs.items())) if batching else ())
        with self.lock:
            if self.closed:
                raise Unavailable(f"Model {self.name} version {self.version} was unloaded; retry the request.")
            self.last_used = time.time()
            runner = self.runners.get(key)
            if runner is not None:
                self.runners.move_to_end(key)
                return runner
            if not batching:
                runner = self.runners[key] = DirectRunner(signature, executor, on_batch, (), on_stage)  # no padding
                return runner
            if len(self.runners) >= MAX_BATCHERS and not self._close_idle_runner():
                return DirectRunner(signature, executor, on_batch, allowed, on_stage)  # every batcher busy
            runner = self.runners[key] = DynamicBatcher(
                signature, executor, settings.max_batch_size, settings.batch_timeout_ms, on_batch,
                arriving=lambda: self.arriving + incoming(), allowed_sizes=allowed, on_stage=on_stage)
            return runner

    def _close_idle_runner(self) -> bool:
        """Close the least recently used runner that has no request waiting (lock held); False if none."""
        for key, runner in self.runners.items():
            if runner.idle:
                del self.runners[key]
                runner.close()
                return True
        return False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for runner in self.runners.values():
                runner.close()
            self.runners.clear()


def load_version(name: str, version: int, path: Path) -> ModelVersion:
    """A version folder opened the one way every tool opens models (tl_app.models.opener), all signatures kept."""
    loaded, functions = open_savedmodel(path)
    signatures = {}
    for sig_name, function in functions.items():
        _, kwargs = function.structured_input_signature
        signatures[sig_name] = Signature(sig_name, function, dict(kwargs), dict(function.structured_outputs))
    card = read_card(path)
    background = run_background(card.get("config"), f"{path / CARD_FILE} [config]")
    return ModelVersion(name, version, path, card, loaded, signatures, background=background)


@dataclass
class Failure:
    """A version that failed to load: its error (no server paths), its folder's fingerprint and next retry."""

    message: str
    fingerprint: tuple
    attempts: int = 1
    retry_at: float = 0.0


def fingerprint(folder: Path) -> tuple:
    """Changes when anything in the version folder is added, removed, resized or rewritten (a copy completing)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            out.append((os.path.relpath(os.path.join(dirpath, name), folder), stat.st_size, stat.st_mtime_ns))
    return tuple(out)


class Registry:
    """Scan, load, look up and poll; thread-safe."""

    def __init__(self, root: str | Path | None, settings, executor: Executor, metrics, poll_seconds: float = 2.0,
                 idle_unload_seconds: float = 120.0, sources: dict | None = None, reload=None):
        self.root = Path(root) if root is not None else None
        self.real_root = self.root.resolve() if self.root is not None else None
        self.sources = sources  # name -> Source (a models config file), or None: every model folder under root
        self.reload = reload  # () -> new sources or None, called at each poll (the models config file re-read)
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.idle_unload_seconds = idle_unload_seconds
        self.lock = threading.RLock()
        self.load_lock = threading.Lock()
        self.on_disk: dict[str, list[int]] = {}
        self.paths: dict[tuple[str, int], Path] = {}  # real path of every version found
        self.loaded: dict[str, dict[int, ModelVersion]] = {}
        self.failed: dict[tuple[str, int], Failure] = {}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    # ---- disk ----------------------------------------------------------------
    def model_folders(self) -> dict[str, tuple[Path, Source]]:
        """name -> (real model folder, its source): the config's entries, or the root's folders, inside their root."""
        if self.sources is not None:
            out = {}
            for name, source in self.sources.items():
                try:
                    real = source.base_path.resolve()
                except OSError:
                    continue
                if real.is_dir():
                    out[name] = (real, source)
            return out
        found = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return found
        for entry in entries:
            if not valid_model_name(entry.name):
                continue
            try:
                real = Path(entry.path).resolve()
                if not entry.is_dir() or not real.is_relative_to(self.real_root) or real == self.real_root:
                    continue
            except OSError:
                continue
            found[entry.name] = (real, Source(real))
        return found

    def scan_disk(self) -> dict[str, list[int]]:
        """Model folders with at least one complete SavedModel version; versions that resolve outside are skipped."""
        found: dict[str, list[int]] = {}
        paths: dict[tuple[str, int], Path] = {}
        for name, (real, source) in self.model_folders().items():
            bound = real if self.sources is not None else self.real_root
            versions = []
            try:
                for version in source.allowed(list_versions(real)):
                    folder = (real / str(version)).resolve()
                    if not folder.is_relative_to(bound) or folder == bound:
                        continue  # root/m/5 -> /elsewhere/1: never served, nothing read from there
                    if (folder / SAVED_MODEL_FILE).is_file():
                        versions.append(version)
                        paths[(name, version)] = folder
            except OSError:
                continue
            if versions:
                found[name] = versions
        with self.lock:
            self.paths = paths
        return found

    def labels(self, name: str) -> dict:
        source = (self.sources or {}).get(name)
        return dict(source.labels) if source else {}

    def refresh(self) -> None:
        """Pick up new versions, drop removed ones, retry changed failures, unload idle older ones."""
        disk = self.scan_disk()
        with self.lock:
            self.on_disk = disk
        for name, versions in disk.items():
            source = (self.sources or {}).get(name) or Source(Path("."))
            eager = source.eager(versions)
            if source.policy == "latest" and len(eager) == 1:
                for version in reversed(versions):  # the newest that loads
                    if version in self.loaded.get(name, {}):
                        break
                    if not self._may_load(name, version):
                        continue
                    if self._load(name, version) is not None:
                        break
            else:
                for version in eager:
                    if version not in self.loaded.get(name, {}) and self._may_load(name, version):
                        self._load(name, version)
        now = time.time()
        with self.lock:
            for name in list(self.loaded):
                keep = disk.get(name, [])
                newest_loaded = max((v for v in self.loaded[name] if v in keep), default=None)
                for version, model in list(self.loaded[name].items()):
                    idle = now - model.last_used > self.idle_unload_seconds
                    if version not in keep or (version != newest_loaded and idle):
                        self._unload(name, version)
                if not self.loaded[name]:
                    del self.loaded[name]
            self.failed = {k: v for k, v in self.failed.items() if k[1] in disk.get(k[0], [])}

    def _may_load(self, name: str, version: int) -> bool:
        """Never tried, or failed but its folder changed since and the backoff has passed."""
        with self.lock:
            failure = self.failed.get((name, version))
            path = self.paths.get((name, version))
        if failure is None:
            return True
        if time.time() < failure.retry_at or path is None:
            return False
        return fingerprint(path) != failure.fingerprint

    def _load(self, name: str, version: int) -> ModelVersion | None:
        with self.load_lock:
            with self.lock:
                existing = self.loaded.get(name, {}).get(version)
                path = self.paths.get((name, version))
                failure = self.failed.get((name, version))
            if existing is not None:
                return existing
            if path is None:
                return None
            started = time.perf_counter()
            before = fingerprint(path)
            try:
                model = load_version(name, version, path)
            except Exception as exc:
                message = self.scrub(f"{type(exc).__name__}: {exc}", path)[:500]
                log.error("could not load %s version %s: %s", name, version, message)
                attempts = failure.attempts + 1 if failure else 1
                backoff = min(RETRY_BACKOFF[1], RETRY_BACKOFF[0] * 2 ** (attempts - 1))
                with self.lock:
                    self.failed[(name, version)] = Failure(message, before, attempts, time.time() + backoff)
                return None
            with self.lock:
                self.loaded.setdefault(name, {})[version] = model
                self.failed.pop((name, version), None)
            log.info("loaded %s version %s in %.1fs", name, version, time.perf_counter() - started)
            return model

    def scrub(self, text: str, path: Path) -> str:
        """An error message without the server's paths: the version folder becomes 'name/version'."""
        rel = f"{path.parent.name}/{path.name}"
        roots = sorted({str(path), str(path.parent), str(self.root or ""), str(self.real_root or "")}
                       - {"", "."}, key=len, reverse=True)
        for root in roots:
            text = text.replace(root, rel if root == str(path) else "<root>")
        return text

    def _unload(self, name: str, version: int) -> None:
        model = self.loaded[name].pop(version)
        model.close()
        log.info("unloaded %s version %s", name, version)

    # ---- lookups ----------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            return sorted(set(self.on_disk) | set(self.loaded))

    def versions(self, name: str) -> list[int]:
        with self.lock:
            return list(self.on_disk.get(name, []))

    def resolve_label(self, name: str, label: str) -> int:
        if name not in self.names():
            raise self.not_found(name)
        labels = self.labels(name)
        if label not in labels:
            raise NotFound(f"Unrecognized servable version label: {short(label)} (model {short(name)}; labels are "
                           f"set in the models config file: {', '.join(sorted(labels)) or 'none'})")
        return labels[label]

    def status(self, name: str, version: int | None = None) -> list[dict]:
        """TF Serving's model_version_status entries."""
        if not valid_model_name(name) or name not in self.names():
            raise self.not_found(name, version)
        if version is not None:
            self.get(name, version)
        with self.lock:
            loaded = dict(self.loaded.get(name, {}))
            failed = {v: f.message for (n, v), f in self.failed.items() if n == name}
        entries = []
        for v in sorted(set(loaded) | set(failed), reverse=True):
            if version is not None and v != version:
                continue
            if v in loaded:
                entries.append({"version": str(v), "state": "AVAILABLE",
                                "status": {"error_code": "OK", "error_message": ""}})
            else:
                entries.append({"version": str(v), "state": "END",
                                "status": {"error_code": "UNKNOWN", "error_message": failed[v]}})
        return entries

    def get_loaded(self, name: str, version: int | None = None) -> ModelVersion | None:
        """The loaded model without blocking, or None (then call ``get`` off the event loop)."""
        with self.lock:
            loaded = {v: m for v, m in self.loaded.get(name, {}).items() if not m.closed}
            if not loaded:
                return None
            model = loaded.get(max(loaded) if version is None else version)
        if model is not None:
            model.last_used = time.time()
        return model

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The newest available version, or a specific one (loaded on demand); NotFound otherwise."""
        if not valid_model_name(name):
            raise self.not_found(name, version)
        with self.lock:
            on_disk = list(self.on_disk.get(name, []))
            loaded = {v: m for v, m in self.loaded.get(name, {}).items() if not m.closed and v in on_disk}
            if version is None:
                if loaded:
                    model = loaded[max(loaded)]
                    model.last_used = time.time()
                    return model
            elif version in loaded:
                model = loaded[version]
                model.last_used = time.time()
                return model
        if version is None:
            for candidate in reversed(on_disk):  # the newest was removed: the next newest that loads
                if self._may_load(name, candidate):
                    model = self._load(name, candidate)
                    if model is not None:
                        return model
            raise self.not_found(name, version)
        if version not in on_disk:
            raise self.not_found(name, version)
        model = self._load(name, version) if self._may_load(name, version) else None
        if model is None:
            with self.lock:
                failure = self.failed.get((name, version))
            raise NotFound(f"Servable not found for request: Specific({name}, {version}) "
                           f"(it failed to load: {failure.message if failure else ''})")
        return model

    def not_found(self, name: str, version: int | None = None) -> NotFound:
        """TF Serving's 'Servable not found' message, then what is served here and how to fix the request."""
        request = f"Latest({short(name)})" if version is None else f"Specific({short(name)}, {version})"
        head = f"Servable not found for request: {request}. "
        names = self.names()
        if name in names:
            versions = self.versions(name)
            return NotFound(head + f"Versions of {name} served: {listing(versions)}; ask for one of those, "
                                   f"or leave the version out for the newest.")
        if not names:
            return NotFound(head + "No models are served yet: export one into the server's model root "
                                   "(tl-app export RUN --name NAME), it is picked up without a restart.")
        return NotFound(head + f"Models served: {listing(names)}; put one of those names in the request "
                               f"(/v1/models/NAME:predict, or model_spec.name over gRPC).")

    def models(self) -> list[dict]:
        """A summary of every model for the web page and /api/models."""
        out = []
        for name in self.names():
            try:
                model = self.get(name)
            except NotFound:
                continue
            card = model.card
            out.append({"name": name, "version": model.version, "versions": self.versions(name),
                        "classes": model.classes, "backbone": card.get("backbone"),
                        "input_size": card.get("input_size"), "signatures": sorted(model.signatures)})
        return out

    def loaded_count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.loaded.values())

    # ---- polling ----------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._poll, name="tl-app-model-poll", daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(self.poll_seconds):
            try:
                sources = self.reload() if self.reload is not None else None
                if sources is not None:
                    self.swap_sources(sources)
                self.refresh()
            except Exception:  # a bad folder must not stop the poll
                log.exception("model poll failed")

    def swap_sources(self, sources: dict) -> None:
        """A new models config: models still listed stay loaded (no request fails); refresh loads and unloads."""
        with self.lock:
            self.sources = sources

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            for name in list(self.loaded):
                for version in list(self.loaded[name]):
                    self._unload(name, version)
