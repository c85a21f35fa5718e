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

from tl_app.config import Config
from tl_app.errors import TlAppError

SUMMARY_FILE = "tl-app-summary.json"
KERAS_ISSUE = "https://github.com/keras-team/keras/issues/20585"
TF_CONFIG_HELP = ("Set TF_CONFIG on every worker, e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                  "[\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' "
                  "(index 1 on the second worker); see docs/scale-out.md. Or use --engine ray, which sets it for you.")


# ---- TF_CONFIG -----------------------------------------------------------------
def read_tf_config(environ=None) -> dict:
    """The parsed TF_CONFIG, or a TlAppError saying how to set it."""
    raw = (environ if environ is not None else os.environ).get("TF_CONFIG", "")
    if not raw.strip():
        raise TlAppError(f"--distribute multi-worker needs the TF_CONFIG environment variable. {TF_CONFIG_HELP}")
    try:
        value = json.loads(raw)
        cluster, task = value["cluster"], value["task"]
        members = cluster[task["type"]]
        int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TlAppError(f"TF_CONFIG is not valid ({exc!r}): {raw!r}. {TF_CONFIG_HELP}") from None
    if int(task["index"]) >= len(members):
        raise TlAppError(f"TF_CONFIG task index {task['index']} is outside the {len(members)} "
                         f"{task['type']}s of the cluster. {TF_CONFIG_HELP}")
    return value


def worker_count(tf_config: dict) -> int:
    return sum(len(cluster) for kind, cluster in tf_config["cluster"].items() if kind in ("chief", "worker"))


def is_chief(tf_config: dict | None = None) -> bool:
    """The worker that writes shared artifacts: the "chief" task, else worker 0 (no TF_CONFIG: yes)."""
    if tf_config is None:
        if not os.environ.get("TF_CONFIG", "").strip():
            return True
        try:
            tf_config = read_tf_config()
        except TlAppError:  # not a usable cluster description: this process is on its own
            return True
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


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


# ---- the strategy ----------------------------------------------------------------
def multi_worker_strategy():
    """MultiWorkerMirroredStrategy from TF_CONFIG, with Keras patched to fit under it."""
    read_tf_config()
    import tensorflow as tf

    patch_keras_multi_worker()
    return tf.distribute.MultiWorkerMirroredStrategy()


def patch_keras_multi_worker() -> bool:
    """Make Keras 3's TF trainer work with more than one worker (see the module docstring); idempotent."""
    try:
        import tensorflow as tf
        from keras.src import tree
        from keras.src.backend.tensorflow import trainer
    except ImportError:  # a Keras layout we do not know: leave it alone
        return False
    if getattr(trainer, "_tl_app_multi_worker_patch", False):
        return True
    if not hasattr(trainer, "reduce_per_replica") or not hasattr(trainer, "_collective_all_reduce_multi_worker"):
        return False
    multi_worker = trainer._collective_all_reduce_multi_worker
    original_reduce = trainer.reduce_per_replica
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def local_value(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return value.values[0] if hasattr(value, "values") else value
        return value

    def reduce_per_replica(values, strategy, reduction):
        if multi_worker(strategy) and reduction in ("auto", "mean"):
            def reduce(value):
                rank = getattr(getattr(local_value(value), "shape", None), "rank", None)
                return strategy.reduce("MEAN", value, axis=None if not rank else 0)

            return tree.map_structure(reduce, values)
        return original_reduce(values, strategy, reduction)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or not multi_worker(strategy) or iterator is None:
            return original_build(self, iterator=iterator, data_batch=data_batch)
        # Shapes are all the symbolic build needs: this worker's own replica batch has them,
        # and taking it costs no cross-worker reduction of a whole batch structure.
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v, batch)
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer._tl_app_multi_worker_patch = True
    return True


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
        from tl_app.train import train

        summary = train(config, echo=print if loop_config.get("verbose") else None)
        with tempfile.TemporaryDirectory(prefix="tl-app-summary-") as folder:
            (Path(folder) / SUMMARY_FILE).write_text(json.dumps(summary, default=str))
            ray_train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
                             checkpoint=ray_train.Checkpoint.from_directory(folder))
        return
    from tl_app.finetune import train_finetune

    with tempfile.TemporaryDirectory(prefix="tl-app-worker-") as scratch:
        config.train.runs_dir = scratch
        train_finetune(config, echo=None)
    ray_train.report({})


def train_on_ray(config: Config, echo: Callable | None = print) -> dict:
    """Fine-tune with N workers started by Ray Train's TensorflowTrainer; the chief's summary comes back."""
    from tl_app.engines import check_resources, connect

    check_resources(connect(config.engine), config.engine)
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.tensorflow import TensorflowTrainer
    except ImportError as exc:
        from tl_app.engines import RAY_EXTRA

        raise TlAppError(f"--engine ray training needs Ray Train ({exc}). Install it with: {RAY_EXTRA}") from None
    engine = config.engine
    worker_config = config.with_overrides({"engine.name": "local", "train.distribute": "multi-worker"})
    resources = {"CPU": float(engine.cpus_per_worker)}
    if engine.gpus_per_worker:
        resources["GPU"] = float(engine.gpus_per_worker)
    runs_dir = os.path.abspath(config.train.runs_dir)
    worker_config.train.runs_dir = runs_dir
    for section, key in (("data", "root"), ("features", "cache_dir"), ("export", "root")):
        part = getattr(worker_config, section)
        value = getattr(part, key)
        if value and "://" not in value:
            setattr(part, key, os.path.abspath(value))
    if worker_config.backbone.weights not in ("imagenet", "none"):  # a local weight file
        worker_config.backbone.weights = os.path.abspath(worker_config.backbone.weights)
    trainer = TensorflowTrainer(
        _train_loop_per_worker,
        train_loop_config={"config": worker_config.to_dict(), "verbose": echo is not None},
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
