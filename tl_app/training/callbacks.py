"""Training callbacks that make a run observable and resumable.

Every piece of state that decides what the next epoch does (early-stopping
counters and best weights, the history, the learning-rate controller) can be
read with ``get_state`` and put back with ``set_state``; ``TrainingCheckpoint``
writes it, with the model and optimiser variables, atomically after every epoch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from tl_app.core.errors import TlAppError
from tl_app.core.files import atomic_write_text, temporary_sibling
from tl_app.core.files import write_json

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


class TrainingDivergedError(TlAppError):
    """The loss became NaN or infinite; the run stopped at the last good checkpoint."""


def snapshot(variables) -> dict[str, np.ndarray]:
    """Host copies of variable values, keyed by variable path."""
    return {v.path: np.asarray(v.numpy()) for v in variables}


def assign_by_path(variables, arrays: dict[str, np.ndarray], what: str = "model") -> None:
    """Assign saved values to variables by path; a mismatch means a different model."""
    variables = list(variables)
    missing = [v.path for v in variables if v.path not in arrays]
    if missing:
        raise TlAppError(
            f"The checkpoint does not match this {what}: {len(missing)} variable(s) missing "
            f"(first: {missing[0]}). Was the run's config.json edited? Start a new run instead of --resume."
        )
    for v in variables:
        check_shape(v, arrays[v.path])
        v.assign(arrays[v.path])


def stable_path(path: str) -> str:
    """Variable paths without Keras's process-wide seed-generator numbering (seed_generator_12/...)."""
    return re.sub(r"seed_generator_\d+", "seed_generator", path)


def assign_in_order(variables, saved: list[tuple[str, np.ndarray]], what: str = "model") -> None:
    """Assign saved (path, value) pairs to variables in creation order, checking paths and shapes."""
    variables = list(variables)
    if len(variables) != len(saved):
        raise TlAppError(f"The checkpoint holds {len(saved)} {what} variables, this {what} has {len(variables)}: "
                         f"was the run's config.json edited? Start a new run instead of --resume.")
    for v, (path, value) in zip(variables, saved):
        if stable_path(v.path) != stable_path(path):
            raise TlAppError(f"The checkpoint does not match this {what}: {path} where {v.path} was expected. "
                             f"Start a new run instead of --resume.")
        check_shape(v, value)
        v.assign(value)


def check_shape(variable, value: np.ndarray) -> None:
    if tuple(value.shape) != tuple(variable.shape):
        raise TlAppError(f"Checkpoint variable {variable.path} has shape {value.shape}, "
                         f"the model expects {tuple(variable.shape)}. Start a new run instead of --resume.")


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite, and remembers where.

    ``async_safe``: Keras may run the check on a helper thread, so reading the
    loss does not stall the device every step (the stop can come a step or two
    later; Keras waits for every check before the epoch ends).
    """

    async_safe = True

    def __init__(self):
        super().__init__()
        self.bad: dict | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or self.bad is not None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self.bad = {"epoch": self.epoch, "batch": int(batch), "loss": loss}
            self.model.stop_training = True


class EarlyStopping(keras.callbacks.Callback):
    """Keras-style early stopping that keeps the best weights by variable path and can be resumed.

    It spans both fine-tuning phases: the best value and weights carry over, the
    patience counter restarts with each phase. Only the weights that training can
    change (``tracked()``) are copied; ``extend_best`` adds weights that start
    training later (they still hold their best-epoch values then).
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 tracked: Callable[[], list] | None = None, nan_guard: StopOnNaN | None = None):
        super().__init__()
        self.monitor, self.patience, self.min_delta = monitor, max(1, int(patience)), float(min_delta)
        self.tracked = tracked
        self.nan_guard = nan_guard
        self.best = math.inf
        self.best_epoch = 0  # global epoch number, 1-based; 0: none yet
        self.best_weights: dict[str, np.ndarray] | None = None
        self.wait = 0
        self.improved = False
        self.epoch_offset = 0

    def start_phase(self, epoch_offset: int) -> None:
        self.wait = 0
        self.epoch_offset = int(epoch_offset)

    def weights(self) -> list:
        return list(self.tracked()) if self.tracked is not None else list(self.model.weights)

    def on_epoch_end(self, epoch, logs=None):
        self.improved = False
        if self.nan_guard is not None and self.nan_guard.bad is not None:
            return
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = float(value)
        if math.isfinite(value) and value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait, self.improved = value, self.epoch_offset + epoch + 1, 0, True
            self.best_weights = snapshot(self.weights())
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.model.stop_training = True

    def extend_best(self, variables) -> None:
        """Record the current values of weights the best snapshot does not hold yet."""
        if self.best_weights is not None:
            for v in variables:
                if v.path not in self.best_weights:
                    self.best_weights[v.path] = np.asarray(v.numpy())

    def restore(self, model: keras.Model) -> bool:
        if self.best_weights is None:
            return False
        variables = [v for v in model.weights if v.path in self.best_weights]
        assign_by_path(variables, self.best_weights)
        return True

    def get_state(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "best_epoch": self.best_epoch,
                "wait": self.wait, "monitor": self.monitor}

    def set_state(self, state: dict, best_weights: dict[str, np.ndarray] | None) -> None:
        self.best = math.inf if state.get("best") is None else float(state["best"])
        self.best_epoch = int(state.get("best_epoch", 0))
        self.wait = int(state.get("wait", 0))
        self.best_weights = best_weights


class EmaWeights(keras.callbacks.Callback):
    """Validation, early stopping and the checkpoint see the optimiser's moving average of the weights.

    ``swap_in`` (at validation, or at the epoch's end when there is none) puts the
    averages into the model and keeps the raw weights; ``restorer()`` is a second
    callback, placed after the checkpoint, that puts the raw weights back so
    training goes on from them. So the best epoch kept and exported is an
    averaged one, and the checkpoint's best file holds averaged weights too.
    """

    def __init__(self):
        super().__init__()
        self.raw: list[np.ndarray] | None = None

    def optimizer(self):
        optimizer = self.model.optimizer
        return getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer wraps the real one

    def swap_in(self) -> None:
        if self.raw is not None or not getattr(self.optimizer(), "use_ema", False):
            return
        variables = self.model.trainable_variables
        self.raw = [np.asarray(v.numpy()) for v in variables]
        self.optimizer().finalize_variable_values(variables)

    def swap_out(self) -> None:
        if self.raw is None:
            return
        for v, value in zip(self.model.trainable_variables, self.raw):
            v.assign(value)
        self.raw = None

    def on_test_begin(self, logs=None):
        self.swap_in()

    def on_epoch_end(self, epoch, logs=None):
        self.swap_in()  # no validation data: the epoch-end callbacks still see the averages

    def restorer(self) -> keras.callbacks.Callback:
        outer = self

        class RawWeights(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                outer.swap_out()

        return RawWeights()


class EpochRecorder(keras.callbacks.Callback):
    """history.json, log.csv and TensorBoard scalars, rewritten after every epoch.

    Epochs are numbered across phases (1, 2, ... in phase 1, continuing in phase 2).
    """

    def __init__(self, run_dir: str | Path, history: list[dict], phase: int = 1, epoch_offset: int = 0,
                 nan_guard: StopOnNaN | None = None, write: bool = True, echo=None, epochs: int = 0,
                 label: str = ""):
        super().__init__()
        self.echo, self.epochs, self.label = echo, epochs, label  # echo: one plain line per epoch (logs, pipes)
        self.run_dir = Path(run_dir)
        self.history = history
        self.phase, self.epoch_offset = phase, epoch_offset
        self.nan_guard = nan_guard
        self.write = write
        self.started = time.perf_counter()
        self._writers = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_guard is not None and self.nan_guard.bad is not None:
            return
        logs = logs or {}
        entry = {"epoch": self.epoch_offset + epoch + 1, "phase": self.phase}
        for key in HISTORY_KEYS:
            if key in logs and logs[key] is not None:
                entry[key] = float(logs[key])
        entry["seconds"] = round(time.perf_counter() - self.started, 3)
        self.history.append(entry)
        if self.echo:
            self.echo(epoch_line(entry, epoch + 1, self.epochs, self.label))
        if self.write:
            write_history(self.run_dir, self.history)
            self.tensorboard(entry)

    def on_train_end(self, logs=None):
        for writer in (self._writers or {}).values():
            writer.close()
        self._writers = None

    def tensorboard(self, entry: dict) -> None:
        """Scalars in TensorBoard's layout (logs/train, logs/validation), without the tensorboard package."""
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        if self._writers is None:
            logs = self.run_dir / "logs"
            self._writers = {"train": tf.summary.create_file_writer(str(logs / "train")),
                             "validation": tf.summary.create_file_writer(str(logs / "validation"))}
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        for key, value in entry.items():
            if key in ("epoch", "phase", "seconds"):
                continue
            writer = self._writers["validation" if key.startswith("val_") else "train"]
            with writer.as_default():
                tf.summary.write(f"epoch_{key.removeprefix('val_')}", tf.constant(value, tf.float32),
                                 step=entry["epoch"], metadata=meta)
        for writer in self._writers.values():
            writer.flush()


def interactive() -> bool:
    """Keras' redrawn progress bars (and their colours) only on a terminal; logs and pipes get plain lines."""
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def epoch_line(entry: dict, epoch: int, epochs: int, label: str = "") -> str:
    """``phase 2 epoch 3/4: loss 0.4120, accuracy 0.8800, val_loss 0.5011, val_accuracy 0.8400 (12.3s)``."""
    metrics = ", ".join(f"{key} {entry[key]:.4f}" if key != "learning_rate" else f"lr {entry[key]:.3g}"
                        for key in HISTORY_KEYS if entry.get(key) is not None)
    return f"{label}epoch {epoch}/{epochs}: {metrics} ({entry.get('seconds', 0.0):.1f}s)"


def write_history(run_dir: Path, history: list[dict]) -> None:
    """history.json ({"epochs": [...]}) and log.csv, each replaced atomically."""
    write_json(run_dir / "history.json", {"epochs": history})
    columns = ["epoch", "phase", *HISTORY_KEYS, "seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "log.csv", buffer.getvalue())


# ---- the training-state checkpoint -------------------------------------------------
class CheckpointStore:
    """checkpoints/epoch-NNNN.npz: one file per completed epoch, written atomically.

    Each file holds a JSON description and the variables training can have
    changed so far (the rest are rebuilt from the pretrained weights), plus the
    optimiser variables. Two files are kept: the latest, and the best epoch's,
    which early stopping restores from; so a kill at any moment leaves a
    complete, consistent pair. Writes run on a background thread so saving does
    not stall training; ``flush`` waits for them.
    """

    PATTERN = re.compile(r"^epoch-(\d+)\.npz$")

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.dir = Path(run_dir) / "checkpoints"
        self.enabled = enabled
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @staticmethod
    def name(epoch: int) -> str:
        return f"epoch-{epoch:04d}.npz"

    def files(self) -> dict[int, Path]:
        out = {}
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                match = self.PATTERN.match(path.name)
                if match:
                    out[int(match.group(1))] = path
        return out

    # -- writing --
    def save(self, epoch: int, meta: dict, model_arrays: list[tuple[str, np.ndarray]],
             optimizer_arrays: list[np.ndarray], keep: tuple[str, ...] = ()) -> None:
        if not self.enabled:
            return
        self._raise_pending()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="tl-app-checkpoint", daemon=True)
            self._thread.start()
        self._queue.put((epoch, meta, model_arrays, optimizer_arrays, keep))

    def flush(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise TlAppError(f"Could not write the training checkpoint in {self.dir}: {error}")

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(*item)
            except BaseException as exc:  # reported on the next save/flush
                self._error = exc

    def _write(self, epoch, meta, model_arrays, optimizer_arrays, keep) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        arrays = {"meta": np.frombuffer(json.dumps(meta, default=float).encode(), np.uint8),
                  "model_names": np.array([path for path, _ in model_arrays], dtype=str)}
        arrays.update({f"model/{i}": value for i, (_, value) in enumerate(model_arrays)})
        arrays.update({f"optimizer/{i}": a for i, a in enumerate(optimizer_arrays)})
        name = self.name(epoch)
        atomic_savez(self.dir / name, arrays)
        for old in self.files().values():
            if old.name != name and old.name not in keep:
                old.unlink(missing_ok=True)

    # -- reading --
    def latest(self) -> str | None:
        files = self.files()
        return files[max(files)].name if files else None

    def load(self, name: str | None = None) -> tuple[dict, list[tuple[str, np.ndarray]], list[np.ndarray]] | None:
        """(meta, [(variable path, value)] in saved order, optimiser values) of a file (default: the latest)."""
        name = name or self.latest()
        if name is None:
            return None
        path = self.dir / name
        if not path.is_file():
            raise TlAppError(f"{path} is missing: the checkpoint names it as the best epoch so far. "
                             f"Start a new run instead of --resume.")
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            names = [str(n) for n in data["model_names"]]
            model_arrays = [(n, data[f"model/{i}"]) for i, n in enumerate(names)]
            count = sum(1 for k in data.files if k.startswith("optimizer/"))
            optimizer_arrays = [data[f"optimizer/{i}"] for i in range(count)]
        return meta, model_arrays, optimizer_arrays


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file, then rename over the target: a killed process never leaves half a file."""
    tmp = temporary_sibling(path)  # streamed to disk: no second copy of the weights in memory
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class TrainingCheckpoint(keras.callbacks.Callback):
    """After every completed epoch: ``variables()`` + optimiser variables + ``describe()`` into the store.

    Keep it after the callbacks whose state it saves (early stopping, schedule, recorder).
    """

    def __init__(self, store: CheckpointStore, describe: Callable[[int, bool], dict],
                 variables: Callable[[], list], nan_guard: StopOnNaN | None = None):
        super().__init__()
        self.store, self.describe, self.variables = store, describe, variables
        self.nan_guard = nan_guard

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_guard is not None and self.nan_guard.bad is not None:
            return
        if not self.store.enabled:
            return
        meta = self.describe(epoch + 1, bool(self.model.stop_training))
        model_arrays = [(v.path, np.asarray(v.numpy())) for v in self.variables()]
        optimizer_arrays = [np.asarray(v.numpy()) for v in self.model.optimizer.variables]
        keep = tuple(name for name in (meta["early_stopping"].get("best_file"),) if name)
        self.store.save(meta["global_epoch"], meta, model_arrays, optimizer_arrays, keep)
