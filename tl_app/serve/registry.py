"""The models a server knows: every saved_models/<name>/<version> under its root.

As TF Serving does, the newest version of each model is loaded eagerly and a
poll of the root picks up new versions without a restart; an older version is
loaded when a request names it, and unloaded again after a while unused.
Names and versions are only ever looked up in what the scan found: a request
can never turn into a path outside the root.
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

from tl_app.models.artifacts import BYTES_SIGNATURE, CARD_FILE, SAVED_MODEL_FILE, list_versions, read_card, valid_model_name
from tl_app.models.opener import DEFAULT_BACKGROUND, open_savedmodel, run_background
from tl_app.serve.batching import DirectRunner, DynamicBatcher, Unavailable
from tl_app.serve.codec import BadRequest

log = logging.getLogger("tl_app.serve")
MAX_BATCHERS = 8  # per version: one per signature and input shape, least recently used closed first


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

    def __post_init__(self):
        self.classes = list(self.card.get("classes") or [])

    def signature(self, name: str | None) -> Signature:
        key = name or BYTES_SIGNATURE
        if key not in self.signatures:
            raise BadRequest(f"Serving signature name: \"{key}\" not found in signature def; "
                           f"available: {', '.join(sorted(self.signatures))}")
        return self.signatures[key]

    def runner(self, signature: Signature, inputs: dict, settings, executor: Executor, metrics):
        """The runner for this signature and input shape: a batcher (at most MAX_BATCHERS kept) or a direct call.

        Call it on the event loop and submit before the next ``await``: an idle batcher may be closed here.
        """
        on_batch = (lambda size, s=signature.name: metrics.batch(self.name, s, size))
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
                runner = self.runners[key] = DirectRunner(signature, executor, on_batch)
                return runner
            if len(self.runners) >= MAX_BATCHERS and not self._close_idle_runner():
                return DirectRunner(signature, executor, on_batch)  # every batcher busy: no new one
            runner = self.runners[key] = DynamicBatcher(
                signature, executor, settings.max_batch_size, settings.batch_timeout_ms, on_batch,
                arriving=lambda: self.arriving)
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


class Registry:
    """Scan, load, look up and poll; thread-safe."""

    def __init__(self, root: str | Path, settings, executor: Executor, metrics, poll_seconds: float = 2.0,
                 idle_unload_seconds: float = 120.0):
        self.root = Path(root)
        self.real_root = self.root.resolve()
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.idle_unload_seconds = idle_unload_seconds
        self.lock = threading.RLock()
        self.load_lock = threading.Lock()
        self.on_disk: dict[str, list[int]] = {}
        self.loaded: dict[str, dict[int, ModelVersion]] = {}
        self.failed: dict[tuple[str, int], str] = {}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    # ---- disk ----------------------------------------------------------------
    def scan_disk(self) -> dict[str, list[int]]:
        """Model folders with at least one complete SavedModel version, inside the root."""
        found: dict[str, list[int]] = {}
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
                versions = [v for v in list_versions(real) if (real / str(v) / SAVED_MODEL_FILE).is_file()]
            except OSError:
                continue
            if versions:
                found[entry.name] = versions
        return found

    def refresh(self) -> None:
        """Pick up new versions, drop removed ones, unload idle older ones."""
        disk = self.scan_disk()
        with self.lock:
            self.on_disk = disk
        for name, versions in disk.items():
            for version in reversed(versions):  # the newest that loads
                if version in self.loaded.get(name, {}):
                    break
                if (name, version) in self.failed:
                    continue
                if self._load(name, version) is not None:
                    break
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

    def _load(self, name: str, version: int) -> ModelVersion | None:
        with self.load_lock:
            with self.lock:
                existing = self.loaded.get(name, {}).get(version)
            if existing is not None:
                return existing
            path = self.root / name / str(version)
            started = time.perf_counter()
            try:
                model = load_version(name, version, path)
            except Exception as exc:
                log.error("could not load %s version %s: %s", name, version, exc)
                with self.lock:
                    self.failed[(name, version)] = f"{type(exc).__name__}: {exc}"[:500]
                return None
            with self.lock:
                self.loaded.setdefault(name, {})[version] = model
            log.info("loaded %s version %s in %.1fs", name, version, time.perf_counter() - started)
            return model

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

    def status(self, name: str, version: int | None = None) -> list[dict]:
        """TF Serving's model_version_status entries."""
        if not valid_model_name(name) or name not in self.names():
            raise NotFound(f"Servable not found for request: Latest({name})" if version is None
                           else f"Servable not found for request: Specific({name}, {version})")
        if version is not None:
            self.get(name, version)
        with self.lock:
            loaded = dict(self.loaded.get(name, {}))
            failed = {v: msg for (n, v), msg in self.failed.items() if n == name}
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
            loaded = self.loaded.get(name, {})
            if not loaded:
                return None
            model = loaded.get(max(loaded) if version is None else version)
        if model is not None:
            model.last_used = time.time()
        return model

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The newest loaded version, or a specific one (loaded on demand); NotFound otherwise."""
        if not valid_model_name(name):
            raise NotFound(f"Servable not found for request: Latest({name[:100]})")
        with self.lock:
            on_disk = list(self.on_disk.get(name, []))
            loaded = self.loaded.get(name, {})
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
            raise NotFound(f"Servable not found for request: Latest({name})")
        if version not in on_disk:
            raise NotFound(f"Servable not found for request: Specific({name}, {version})")
        model = self._load(name, version)
        if model is None:
            raise NotFound(f"Servable not found for request: Specific({name}, {version}) "
                           f"(it failed to load: {self.failed.get((name, version), '')})")
        return model

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
                self.refresh()
            except Exception:  # a bad folder must not stop the poll
                log.exception("model poll failed")

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            for name in list(self.loaded):
                for version in list(self.loaded[name]):
                    self._unload(name, version)
