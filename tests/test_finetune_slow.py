"""Fine-tuning correctness checks that take longer than the default run allows (pytest -m slow).

ResNet50 BatchNorm safety, class weights vs minority recall, resume after a real
kill, resume after a crash at each point, and the device/scale paths on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Your input ran out of data")]

REPO = Path(__file__).resolve().parents[1]


def finetune_config(config, **train):
    config.train.strategy = "finetune"
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def evaluate_val(model, run_dir, config):
    from tl_app.data.manifest import Manifest
    from tl_app.training.losses import make_loss
    from tl_app.data.pipeline import make_dataset

    manifest = Manifest.load(Path(run_dir) / "manifest.json")
    data = make_dataset(manifest.split("val"), config.backbone.input_size, config.data.resize_policy,
                        config.train.batch_size, num_classes=manifest.num_classes)
    model.compile(loss=make_loss(config.train), metrics=["accuracy"])
    return model.evaluate(data, verbose=0)


def test_resnet50_evaluate_matches_reported_validation_metrics(tiny_config):
    """The "fit said 87%, evaluate says 63%" trap: BatchNorm must stay in inference mode and frozen."""
    from tl_app.models.backbones import build_feature_model, get_spec
    from tl_app.training.finetune import train_finetune
    from tl_app.models.opener import load_run_model

    config = finetune_config(tiny_config, epochs=2, finetune_epochs=2, learning_rate=3e-3,
                             early_stopping_patience=10)
    summary = train_finetune(config, echo=None)
    run_dir = Path(summary["run_dir"])
    epochs = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert [e["phase"] for e in epochs] == [1, 1, 2, 2]
    metrics = summary["metrics"]
    best = next(e for e in epochs if e["epoch"] == metrics["best_epoch"])
    model = load_run_model(run_dir)
    loss, accuracy = evaluate_val(model, run_dir, config)
    assert loss == pytest.approx(best["val_loss"], rel=1e-4) and accuracy == pytest.approx(best["val_accuracy"])
    assert loss == pytest.approx(metrics["val_loss"], rel=1e-5)

    # BatchNorm statistics are exactly those the backbone started with; conv5 itself did train
    fresh = build_feature_model(get_spec("resnet50"), 32, "none", config.backbone.seed).get_layer("resnet50")
    trained = model.get_layer("resnet50")
    batchnorms = [layer for layer in trained.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(batchnorms) > 50
    for layer in batchnorms:
        for a, b in zip(layer.get_weights(), fresh.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    if metrics["best_phase"] == 2:
        conv = trained.get_layer("conv5_block3_3_conv").get_weights()[0]
        assert not np.array_equal(conv, fresh.get_layer("conv5_block3_3_conv").get_weights()[0])


def write_imbalanced(root: Path) -> Path:
    """Two colour-shifted classes that overlap: 60 common vs 8 rare training images; balanced val/test."""
    def write(split, name, count, centre, seed):
        rng = np.random.default_rng(seed)
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shift = rng.normal(centre, 20)
            pixels = np.array([128 + shift, 110, 128 - shift]) + rng.normal(0, 20, (32, 32, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i:03d}.png")

    for split, counts, seed in (("train", (60, 8), 1), ("val", (10, 10), 3), ("test", (40, 40), 5)):
        write(split, "common", counts[0], -25, seed)
        write(split, "rare", counts[1], 25, seed + 1)
    return root


def test_class_weights_raise_minority_recall(tiny_config, tmp_path):
    from tl_app.data.manifest import Manifest
    from tl_app.training.finetune import train_finetune
    from tl_app.data.pipeline import load_images
    from tl_app.models.opener import load_run_model

    root = write_imbalanced(tmp_path / "imbalanced")

    def rare_recall(weights: str) -> float:
        config = tiny_config.with_overrides({
            "data.root": str(root), "data.class_weights": weights, "train.name": f"cw-{weights}",
            "backbone.name": "vgg16", "backbone.layer": "block2_pool",  # shallow random features keep colour
            "train.epochs": 10, "train.finetune_epochs": 1, "train.unfreeze_layers": 2, "train.batch_size": 16,
            "train.early_stopping_patience": 50, "head.dropout": 0.0, "augment.horizontal_flip": False,
            "augment.rotation": 0.0, "augment.zoom": 0.0, "augment.translation": 0.0, "augment.contrast": 0.0,
            "augment.brightness": 0.0})
        config = finetune_config(config)
        summary = train_finetune(config, echo=None)
        manifest = Manifest.load(Path(summary["run_dir"]) / "manifest.json")
        test = manifest.split("test")
        predicted = load_run_model(summary["run_dir"]).predict(load_images(test, 32), verbose=0).argmax(1)
        truth = np.array([r.label_index for r in test])
        rare = manifest.classes.index("rare")
        return float(np.mean(predicted[truth == rare] == rare))

    unweighted, balanced = rare_recall("none"), rare_recall("balanced")
    assert balanced >= 0.5 and balanced >= unweighted + 0.3, (unweighted, balanced)


# A real crash: the process kills itself with SIGKILL at (phase, epoch, batch), so no `finally`, atexit or
# background writer gets to flush anything; only what was already on disk survives.
KILL_AT = """
import json, os, signal, sys
import keras
from tl_app.core.config import Config
from tl_app.training.finetune import train_finetune

class KillAt(keras.callbacks.Callback):
    def __init__(self, phase, epoch, batch):
        super().__init__()
        self.target, self.phase, self.epoch = (phase, epoch, batch), 0, 0
    def on_train_begin(self, logs=None):
        self.phase += 1
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_begin(self, batch, logs=None):
        if (self.phase, self.epoch, batch) == self.target:
            os.kill(os.getpid(), signal.SIGKILL)

config = Config.from_dict(json.loads(sys.argv[1]))
train_finetune(config, echo=None, callbacks=[KillAt(*map(int, sys.argv[2:5]))])
"""


def assert_same_run(a: Path, b: Path) -> None:
    """Same epochs, losses, learning rates, final weights and final training state (optimiser included)."""
    from tl_app.training.callbacks import CheckpointStore
    from tl_app.models.opener import load_run_model

    ha = json.loads((a / "history.json").read_text())["epochs"]
    hb = json.loads((b / "history.json").read_text())["epochs"]
    assert [(e["epoch"], e["phase"]) for e in ha] == [(e["epoch"], e["phase"]) for e in hb]
    for x, y in zip(ha, hb):
        for key in ("loss", "val_loss", "learning_rate"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key
    for x, y in zip(load_run_model(a).get_weights(), load_run_model(b).get_weights()):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    (ma, va, oa), (mb, vb, ob) = CheckpointStore(a).load(), CheckpointStore(b).load()
    assert ma["global_epoch"] == mb["global_epoch"] and len(va) == len(vb) and len(oa) == len(ob) > 0
    for (_, x), (_, y) in zip(va, vb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(oa, ob):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_resume_after_a_crash_at_each_point_matches_the_uninterrupted_run(tiny_config):
    from tl_app.training.finetune import resume_finetune, train_finetune

    def config(name):
        c = tiny_config.with_overrides({"train.name": name, "backbone.name": "vgg16", "head.batch_norm": True,
                                        "train.optimizer": "sgd", "train.learning_rate": 0.01,
                                        "train.schedule": "plateau", "train.warmup_epochs": 1,
                                        "train.early_stopping_patience": 2})
        return finetune_config(c, epochs=2, finetune_epochs=2)

    full = Path(train_finetune(config("full"), echo=None)["run_dir"])
    # mid phase 1; at the phase boundary (phase 1 complete, nothing of phase 2); mid phase 2
    for i, point in enumerate([(1, 1, 0), (2, 0, 0), (2, 1, 2)]):
        crashed = config(f"crash{i}")
        killed = subprocess.run([sys.executable, "-c", KILL_AT, json.dumps(crashed.to_dict()), *map(str, point)],
                                cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        run_dir = Path(crashed.train.runs_dir) / f"crash{i}"
        assert not (run_dir / "model.keras").exists()  # it really was cut short
        summary = resume_finetune(run_dir, echo=None)
        assert summary["resumed"] and summary["metrics"]["epochs_trained"] == 4
        assert_same_run(full, Path(summary["run_dir"]))
    again = resume_finetune(full, echo=None)  # a finished run has nothing to resume
    assert again["resumed"] is False


def cli_train(args, env=None, **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "tl_app", "train", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_resume_after_kill_matches_the_uninterrupted_run(tiny_config, tmp_path):
    runs = tmp_path / "runs"
    common = [tiny_config.data.root, "--strategy", "finetune", "--backbone", "vgg16", "--weights", "none",
              "--input-size", 32, "--epochs", 3, "--finetune-epochs", 3, "--batch-size", 8, "--runs-dir", runs,
              "--seed", 5, "--set", "head.units=[16]", "--set", "train.deterministic=true",
              "--set", "train.early_stopping_patience=10", "--set", "train.schedule=cosine",
              "--set", f"features.cache_dir={tmp_path / 'cache' / 'features'}"]
    full = cli_train([*common, "--name", "full"])
    output = full.communicate(timeout=600)[0]
    assert full.returncode == 0, output[-3000:]

    killed = cli_train([*common, "--name", "killed"])
    checkpoints = runs / "killed" / "checkpoints"
    deadline = time.time() + 600
    while not (checkpoints / "epoch-0004.npz").exists():  # phase 2 has started and done one epoch
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[0][-3000:]
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert not (runs / "killed" / "model.keras").exists()  # it really was cut short

    resumed = cli_train(["--resume", runs / "killed"])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming" in output and "phase 2" in output
    assert_same_run(runs / "full", runs / "killed")


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_trains_on_cpu_and_saves_float32(tiny_config, precision):
    from tl_app.training.finetune import train_finetune
    from tl_app.models.opener import load_run_model

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["policy"] = self.model.dtype_policy.name
            seen["optimizer"] = type(self.model.optimizer).__name__

    config = finetune_config(tiny_config.with_overrides({"backbone.name": "vgg16"}), mixed_precision=precision,
                             epochs=1, finetune_epochs=1)
    summary = train_finetune(config, echo=None, callbacks=[Probe()])
    assert seen["policy"] == f"mixed_{precision}"
    assert seen["optimizer"] == ("LossScaleOptimizer" if precision == "float16" else "Adam")
    model = load_run_model(summary["run_dir"])
    assert model.dtype_policy.name == "float32" and model.get_layer("vgg16").dtype_policy.name == "float32"
    metrics = summary["metrics"]
    assert np.isfinite(metrics["val_loss"])
    assert metrics["val_loss"] == pytest.approx(metrics["reported_val_loss"], abs=0.05)  # float32 vs mixed


def test_mirrored_strategy_and_xla_train_on_cpu(tiny_config):
    import tensorflow as tf

    from tl_app.training.finetune import train_finetune

    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen["strategy"] = type(self.model.distribute_strategy).__name__
            seen["jit"] = self.model.jit_compile

    base = tiny_config.with_overrides({"backbone.name": "vgg16"})
    mirrored = train_finetune(finetune_config(base, distribute="mirrored"), echo=None, callbacks=[Probe()])
    assert seen == {"strategy": "MirroredStrategy", "jit": False}
    assert np.isfinite(mirrored["metrics"]["val_loss"])
    assert not tf.distribute.has_strategy()  # the mirrored scope did not leak: the default strategy again

    base = tiny_config.with_overrides({"backbone.name": "vgg16", "train.name": "xla"})
    xla = train_finetune(finetune_config(base, jit_compile=True), echo=None, callbacks=[Probe()])
    assert seen["jit"] is True and np.isfinite(xla["metrics"]["val_loss"])


def test_multi_worker_strategy_runs_as_a_single_local_worker(tiny_config, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    args = [tiny_config.data.root, "--strategy", "finetune", "--backbone", "vgg16", "--weights", "none",
            "--input-size", 32, "--epochs", 1, "--finetune-epochs", 1, "--batch-size", 8,
            "--distribute", "multi-worker", "--runs-dir", tmp_path / "runs", "--name", "mw", "--set", "head.units=[16]",
            "--set", f"features.cache_dir={tmp_path / 'cache' / 'features'}", "--json"]
    process = subprocess.run(
        [sys.executable, "-m", "tl_app", "train", *map(str, args)],
        cwd=REPO, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
    run_dir = tmp_path / "runs" / "mw"
    assert (run_dir / "model.keras").is_file()
    assert json.loads((run_dir / "run.json").read_text())["finetune"]["distribute"] == "multi-worker"


def test_two_classes_with_focal_loss_smoothing_and_explicit_weights(tiny_config, tmp_path):
    from tl_app.training.finetune import train_finetune
    from tl_app.models.opener import load_run_model
    from tl_app.models.artifacts import read_run_info

    root = tmp_path / "two"
    rng = np.random.default_rng(0)
    for name, colour, count in (("cats", (200, 60, 60), 14), ("dogs", (60, 60, 200), 10)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.array(colour) + rng.normal(0, 25, (40, 40, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    config = tiny_config.with_overrides({
        "data.root": str(root), "data.class_weights": {"cats": 1.0, "dogs": 2.0}, "backbone.name": "vgg16",
        "train.focal_gamma": 2.0, "train.label_smoothing": 0.1, "train.optimizer": "sgd", "train.nesterov": True,
        "train.learning_rate": 0.01, "train.schedule": "step", "train.step_every": 1})
    seen = []

    class LossProbe(keras.callbacks.Callback):  # what the compiled model really optimises, in both phases
        def on_train_begin(self, logs=None):
            loss = self.model.loss
            seen.append((type(loss).__name__, loss.get_config().get("gamma"), loss.get_config()["label_smoothing"]))

    summary = train_finetune(finetune_config(config, epochs=2, finetune_epochs=1), echo=None,
                             callbacks=[LossProbe()])
    assert seen == [("CategoricalFocalCrossentropy", 2.0, 0.1)] * 2
    assert read_run_info(summary["run_dir"])["class_weights"] == {"cats": 1.0, "dogs": 2.0}
    model = load_run_model(summary["run_dir"])
    assert model.output_shape == (None, 2)
    assert np.isfinite(summary["metrics"]["val_loss"]) and summary["metrics"]["epochs_trained"] == 3
