"""Where training runs: tf.distribute strategies, mixed precision, and the one rule for
which worker is the chief (the only one that writes the run folder).

Multi-worker training reads TF_CONFIG; Keras 3 needs a small patch to fit
under MultiWorkerMirroredStrategy (see patch_keras_multi_worker).
"""

from __future__ import annotations

import contextlib
import json
import os
from tl_app.core.errors import ConfigError, TlAppError



# ---- devices and numerics ----------------------------------------------------------
_STRATEGIES: dict = {}


def make_strategy(name: str):
    """None (default device) or a tf.distribute strategy (one per process); multi-worker reads TF_CONFIG."""
    if name in ("", "none"):
        return None
    if name not in _STRATEGIES:
        _STRATEGIES[name] = _new_strategy(name)
    return _STRATEGIES[name]


def _new_strategy(name: str):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        try:
            if os.environ.get("TF_CONFIG", "").strip():
                # checks TF_CONFIG and lets Keras fit across workers (tl_app.engines.distributed)
                return multi_worker_strategy()
            return tf.distribute.MultiWorkerMirroredStrategy()  # no TF_CONFIG: one local worker
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"--distribute multi-worker could not start: {exc}. It must be set up before TensorFlow runs "
                f"anything (run it from the command line), and TF_CONFIG must describe the cluster "
                f"(unset TF_CONFIG for a single local worker)."
            ) from None
    raise ConfigError(f"train.distribute = {name!r}: expected none, mirrored or multi-worker.")


def scope(strategy):
    """strategy.scope(), or nothing without a strategy."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def precision_policy(name: str) -> str:
    return {"none": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[name]


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
