"""Multi-worker training: TF_CONFIG, MultiWorkerMirroredStrategy, and Ray Train as a launcher.

Every worker runs the same ``tl-app train ... --distribute multi-worker``
program; TF_CONFIG tells each one the cluster and its own place in it, and
MultiWorkerMirroredStrategy keeps the replicas in lockstep (gradients are
all-reduced every step, so every worker ends with the same weights). With
``--engine ray`` Ray Train's TensorflowTrainer starts the workers and writes
TF_CONFIG for them.

Keras 3 (up to at least 3.15) cannot ``fit`` under MultiWorkerMirroredStrategy
with more than one worker (keras-team/keras#20585): it reduces a whole input
batch structure across workers to build the model symbolically, and reduces
scalar logs along axis 0. ``patch_keras_multi_worker`` fixes both in place,
only for multi-worker collective strategies.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

from tl_app.core.config import Config
from tl_app.core.errors import TlAppError
from tl_app.training.devices import is_chief, patch_keras_multi_worker
from tl_app.training.finetune import train_finetune
from tl_app.engines import check_resources, connect, RAY_EXTRA

SUMMARY_FILE = "tl-app-summary.json"


def tf_config_for(workers: list[str], index: int) -> str:
    """TF_CONFIG for worker ``index`` of a cluster of plain workers (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": int(index)}})


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free right now on ``host`` (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def local_cluster(count: int, host: str = "127.0.0.1") -> list[str]:
    """TF_CONFIG values for ``count`` workers on this machine (loopback, free ports)."""
    workers = [f"{host}:{port}" for port in free_ports(count, host)]
    return [tf_config_for(workers, i) for i in range(count)]


# ---- Ray Train -------------------------------------------------------------------
def _train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: the ordinary fine-tuning, multi-worker (Ray sets TF_CONFIG).

    The chief writes the run directory (and its curves and diagnosis); the
    other workers keep their few files in a temporary folder of their own.
    """
    import tempfile

    from ray import train as ray_train

    patch_keras_multi_worker()
    config = Config.from_dict(loop_config["config"])
    if is_chief():
        summary = loop_config["chief"](config, echo=print if loop_config.get("verbose") else None)
        with tempfile.TemporaryDirectory(prefix="tl-app-summary-") as folder:
            (Path(folder) / SUMMARY_FILE).write_text(json.dumps(summary, default=str))
            ray_train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
                             checkpoint=ray_train.Checkpoint.from_directory(folder))
        return
    with tempfile.TemporaryDirectory(prefix="tl-app-worker-") as scratch:
        config.train.runs_dir = scratch
        train_finetune(config, echo=None)
    ray_train.report({})


def ray_worker_config(config: Config) -> Config:
    """The configuration every Ray Train worker runs: local engine, multi-worker, and every local path
    absolute (workers start elsewhere). Named weights (hed-vgg16) and imagenet stay names."""
    worker = config.with_overrides({"engine.name": "local", "train.distribute": "multi-worker"})
    worker.train.runs_dir = os.path.abspath(config.train.runs_dir)
    for section, key in (("data", "root"), ("features", "cache_dir"), ("export", "root")):
        part = getattr(worker, section)
        value = getattr(part, key)
        if value and "://" not in value:
            setattr(part, key, os.path.abspath(value))
    if os.path.exists(worker.backbone.weights):  # a local weight file, not a name
        worker.backbone.weights = os.path.abspath(worker.backbone.weights)
    return worker


def train_on_ray(config: Config, chief: Callable, echo: Callable | None = print) -> dict:
    """Fine-tune with N workers started by Ray Train's TensorflowTrainer; the chief's summary comes back.

    ``chief(config, echo)`` is what the chief worker runs (the caller's whole training, report included);
    the other workers run plain multi-worker fine-tuning.
    """
    check_resources(connect(config.engine), config.engine)
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer
    except ImportError as exc:
        raise TlAppError(f"--engine ray training needs Ray Train ({exc}). Install it with: {RAY_EXTRA}") from None
    engine = config.engine
    worker_config = ray_worker_config(config)
    runs_dir = worker_config.train.runs_dir
    resources = {"CPU": float(engine.cpus_per_worker)}
    if engine.gpus_per_worker:
        resources["GPU"] = float(engine.gpus_per_worker)
    trainer = TensorflowTrainer(
        _train_loop_per_worker,
        train_loop_config={"config": worker_config.to_dict(), "verbose": echo is not None, "chief": chief},
        scaling_config=ScalingConfig(num_workers=int(engine.num_workers), use_gpu=bool(engine.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=RunConfig(name="tl-app-train", storage_path=os.path.join(runs_dir, "ray-train")),
    )
    if echo:
        echo(f"ray train: {engine.num_workers} workers x {resources}")
    result = trainer.fit()
    if result.error:
        raise TlAppError(f"Ray Train failed: {result.error}")
    if result.checkpoint is None:
        return dict(result.metrics or {})
    with result.checkpoint.as_directory() as folder:  # the chief's summary travels as a checkpoint
        return json.loads((Path(folder) / SUMMARY_FILE).read_text())
