"""Fine-tuning throughput: one phase-2 epoch through tl-app vs a plain hand-written Keras model.fit.

Both train the same model (ResNet50, conv5 unfrozen, BatchNorm frozen, same
head, Adam at the phase-2 rate) on the same JPEG photos with the same
augmentation, class weights and validation images. An epoch is timed from its
start to the end of its last callback, so tl-app's extras (per-epoch training-
state checkpoint, history/CSV/TensorBoard, NaN guard, early stopping, schedule)
are inside the figure. The first epoch (tracing) is not timed.

With a GPU (or --sweep) it also runs tl-app in fp32, mixed bfloat16/float16 and XLA.

    python bench/bench_finetune.py [--quick] [--size 224] [--images 256] [--sweep]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import emit, write_photo_folder


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Epoch wall time including every callback that runs before it (tl-app's run first)."""

        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []  # this process's CPU time: less sensitive to other work
            self.start = self.cpu_start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)
            self.cpu_seconds.append(time.process_time() - self.cpu_start)

    return EpochTimer()


def make_config(root: Path, work: Path, size: int, batch: int, epochs: int, precision: str = "none",
                jit: bool = False):
    from tl_app.core.config import Config

    config = Config()
    config.data.root = str(root)
    config.data.val_fraction = 0.125
    config.backbone.name = "resnet50"
    config.backbone.weights = "none"
    config.backbone.input_size = size
    config.features.cache_dir = str(work / "cache" / "features")
    config.train.runs_dir = str(work / "runs")
    config.train.strategy = "finetune"
    config.train.epochs = 0  # straight to phase 2: the epoch being measured
    config.train.finetune_epochs = epochs
    config.train.batch_size = batch
    config.train.early_stopping_patience = 100
    config.train.mixed_precision = precision
    config.train.jit_compile = jit
    config.head.units = [256]
    return config


def run_tl_app(config):
    from tl_app.training.finetune import train_finetune

    timer = epoch_timer()
    train_finetune(config, echo=None, callbacks=[timer])
    return timer


def run_plain_keras(config):
    """What a user writes by hand: tf.data from files, augmentation in map(), model.fit with class_weight."""
    import keras
    import tensorflow as tf

    from tl_app.data.augment import build_augmenter
    from tl_app.models.backbones import get_spec
    from tl_app.data.splits import class_weights
    from tl_app.data.scan import scan
    from tl_app.models.surgery import build_classifier

    size, batch = config.backbone.input_size, config.train.batch_size
    manifest = scan(config.data.root, config.data)  # the same split as tl-app's run
    train, val = manifest.split("train"), manifest.split("val")
    weights = class_weights(manifest, "balanced")
    spec = get_spec("resnet50")
    model = build_classifier(config, spec, size, manifest.num_classes, weights="none")
    base = model.get_layer("resnet50")
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith("conv5_") and not isinstance(layer, keras.layers.BatchNormalization)
    model.compile(keras.optimizers.Adam(config.train.learning_rate * config.train.finetune_lr_factor),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    augment = build_augmenter(config.augment, size, seed=0)

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side)
        image = tf.image.resize(tf.cast(image, tf.float32), (size, size), antialias=True)
        return image, tf.one_hot(label, manifest.num_classes)

    def files(records):
        return tf.data.Dataset.from_tensor_slices(([r.path for r in records], [r.label_index for r in records]))

    train_ds = (files(train).shuffle(len(train), seed=0).map(load, num_parallel_calls=tf.data.AUTOTUNE)
                .batch(batch).map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))
    val_ds = files(val).map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)
    timer = epoch_timer()
    model.fit(train_ds, validation_data=val_ds, epochs=config.train.finetune_epochs, class_weight=weights,
              callbacks=[timer], verbose=0)
    return timer, len(train), len(val)


def steady(seconds: list[float]) -> float:
    """Fastest epoch after the first (tracing) one: the least disturbed by other work on a shared machine."""
    return min(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="about a minute: small images, few photos")
    parser.add_argument("--size", type=int, default=None, help="input size (default 224; 96 with --quick)")
    parser.add_argument("--images", type=int, default=None, help="photos (default 288; 160 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run, the first is not timed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sweep", action="store_true", help="also fp32 vs mixed precision vs XLA (GPU)")
    args = parser.parse_args()
    import tensorflow as tf

    size = args.size or (96 if args.quick else 224)
    count = args.images or (160 if args.quick else 288)
    epochs = args.epochs or (4 if args.quick else 3)
    rounds = 1 if args.quick else 2
    gpu = bool(tf.config.list_physical_devices("GPU"))
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:  # photos and run folders go with it
        results = measure(args, Path(tmp), size, count, epochs, rounds, gpu)
    emit("finetune", results)


def measure(args, work: Path, size: int, count: int, epochs: int, rounds: int, gpu: bool) -> dict:
    root = write_photo_folder(work / "photos", count, classes=2)

    config = make_config(root, work, size, args.batch, epochs)
    plain_runs, tl_runs = [], []
    order = ["plain", "tl"] if rounds == 1 else ["plain", "tl", "tl", "plain"] * (rounds // 2)
    for which in order:  # ABBA: drift in machine load hits both sides alike
        if which == "plain":
            timer, n_train, n_val = run_plain_keras(config)
            plain_runs.append(timer)
        else:
            tl_runs.append(run_tl_app(config))
    plain_ips = n_train / min(steady(t.seconds) for t in plain_runs)
    tl_ips = n_train / min(steady(t.seconds) for t in tl_runs)
    ratio = tl_ips / plain_ips
    cpu_ratio = min(steady(t.cpu_seconds) for t in plain_runs) / min(steady(t.cpu_seconds) for t in tl_runs)
    print(f"device: {'GPU' if gpu else 'CPU only (no GPU on this machine)'}; resnet50 at {size}px, batch "
          f"{args.batch}, {n_train} training + {n_val} validation photos per epoch, conv5 unfrozen")
    print(f"plain keras model.fit : {plain_ips:7.2f} images/s  (epoch seconds per run: "
          f"{[[round(x, 2) for x in t.seconds] for t in plain_runs]})")
    print(f"tl-app fine-tuning    : {tl_ips:7.2f} images/s  (epoch seconds per run: "
          f"{[[round(x, 2) for x in t.seconds] for t in tl_runs]})")
    print(f"tl-app / plain keras  : {ratio:.3f}  (target >= 0.95; fastest steady epoch of each)")
    print(f"same, by process CPU time per epoch: {cpu_ratio:.3f}")
    results = {"size": size, "batch": args.batch, "train_images": n_train, "val_images": n_val, "gpu": gpu,
               "rounds": rounds, "plain_keras_images_per_s": round(plain_ips, 2),
               "tl_app_images_per_s": round(tl_ips, 2), "ratio": round(ratio, 3), "cpu_time_ratio": round(cpu_ratio, 3)}

    if args.sweep or gpu:
        sweep = {}
        for label, precision, jit in (("fp32", "none", False), ("mixed_bfloat16", "bfloat16", False),
                                      ("mixed_float16", "float16", False), ("fp32_xla", "none", True),
                                      ("mixed_float16_xla", "float16", True)):
            timer = run_tl_app(make_config(root, work, size, args.batch, epochs, precision, jit))
            sweep[label] = round(n_train / steady(timer.seconds), 2)
            print(f"tl-app {label:<18}: {sweep[label]:7.2f} images/s  ({sweep[label] / sweep['fp32']:.2f}x fp32)")
        results["precision_sweep_images_per_s"] = sweep
        results["precision_sweep_vs_fp32"] = {k: round(v / sweep["fp32"], 3) for k, v in sweep.items()}
    else:
        print("precision/XLA sweep skipped: no GPU here (pass --sweep to run it on CPU anyway)")
    return results


if __name__ == "__main__":
    main()
