"""Multi-worker fine-tuning: two real worker processes on loopback, and Ray Train as launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tl_app.training.devices import is_chief, read_tf_config
from tl_app.engines.distributed import local_cluster, tf_config_for
from tl_app.core.errors import TlAppError

REPO = Path(__file__).resolve().parents[1]

# One worker: the real `tl-app train ... --distribute multi-worker` command, with a Keras
# callback added to the fine-tuning call that records every epoch's loss and this
# worker's final weights (the non-chief workers write no model of their own).
WORKER = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    import tl_app.api
    from tl_app.cli import main

    out = sys.argv[1]
    losses = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            losses.append(float(logs["loss"]))
            json.dump(losses, open(out + "/losses.json", "w"))

        def on_train_end(self, logs=None):
            np.savez(out + "/weights.npz", *[np.asarray(w) for w in self.model.get_weights()])

    train_finetune = tl_app.api.train_finetune
    tl_app.api.train_finetune = lambda config, echo=print, callbacks=None: train_finetune(
        config, echo=echo, callbacks=[Record()])
    main(sys.argv[2:])
""")


def test_local_cluster_gives_each_worker_its_place():
    configs = [json.loads(c) for c in local_cluster(2)]
    workers = configs[0]["cluster"]["worker"]
    assert len(set(workers)) == 2 and all(w.startswith("127.0.0.1:") for w in workers)
    assert [c["task"] for c in configs] == [{"type": "worker", "index": 0}, {"type": "worker", "index": 1}]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs)
    assert is_chief(configs[0]) and not is_chief(configs[1])
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}
    assert not is_chief(with_chief)


def test_missing_or_broken_tf_config_says_how_to_set_it():
    with pytest.raises(TlAppError, match="TF_CONFIG"):
        read_tf_config({})
    with pytest.raises(TlAppError, match="not valid"):
        read_tf_config({"TF_CONFIG": "{not json"})
    with pytest.raises(TlAppError, match="outside"):
        read_tf_config({"TF_CONFIG": tf_config_for(["a:1", "b:2"], 2)})
    assert read_tf_config({"TF_CONFIG": tf_config_for(["a:1", "b:2"], 1)})["task"]["index"] == 1


def last_json(text: str) -> dict:
    """The JSON summary the CLI prints (Ray may forward worker log lines around it)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.JSONDecoder().raw_decode("\n".join(lines[start:]))[0]


def train_args(config, runs_dir: Path) -> list[str]:
    return ["train", config.data.root, "--strategy", "finetune", "--backbone", "resnet50", "--weights", "none",
            "--input-size", "32", "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "8",
            "--set", "head.units=[16]", "--name", "mw", "--runs-dir", str(runs_dir), "--json"]


@pytest.mark.slow
def test_two_workers_on_loopback_end_with_identical_weights_and_falling_loss(tiny_config, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs, outs = [], []
    for index, tf_config in enumerate(local_cluster(2)):
        out = tmp_path / f"worker{index}"
        out.mkdir()
        args = train_args(tiny_config, out / "runs") + ["--distribute", "multi-worker"]
        env = {**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2"}
        log = open(out / "log.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), *args], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        outs.append(out)
    try:
        codes = [p.wait(timeout=900) for p in procs]
    except subprocess.TimeoutExpired:  # show how far each worker got, not only that time ran out
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0], "\n".join((o / "log.txt").read_text()[-3000:] for o in outs)

    weights = [np.load(o / "weights.npz") for o in outs]
    assert len(weights[0].files) == len(weights[1].files) > 0
    for name in weights[0].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])
    losses = [json.loads((o / "losses.json").read_text()) for o in outs]
    assert losses[0] == losses[1]  # one synchronised training, seen from both workers
    losses = losses[0]
    assert len(losses) == 3 and losses[-1] < losses[0]

    # only the chief (worker 0) writes the model, the history and the report
    chief_run, other_run = outs[0] / "runs" / "mw", outs[1] / "runs" / "mw"
    assert (chief_run / "model.keras").is_file() and (chief_run / "curves.png").is_file()
    assert not (other_run / "model.keras").exists() and not (other_run / "history.json").exists()
    history = json.loads((chief_run / "history.json").read_text())["epochs"]
    assert [round(e["loss"], 5) for e in history] == [round(v, 5) for v in losses]
    assert last_json((outs[0] / "log.txt").read_text())["run_dir"] == str(chief_run)


@pytest.mark.slow
def test_ray_train_runs_the_same_fine_tuning_on_two_workers(tiny_config, tmp_path, cli):
    import ray  # the ray extra: make test installs it

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    try:
        result = cli("train", tiny_config.data.root, "--strategy", "finetune", "--backbone", "resnet50",
                     "--weights", "none", "--input-size", 32, "--epochs", 2, "--finetune-epochs", 1,
                     "--batch-size", 8, "--set", "head.units=[16]", "--name", "ray-mw",
                     "--runs-dir", tmp_path / "runs", "--engine", "ray", "--num-workers", 2, "--json")
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    run_dir = Path(summary["run_dir"])
    assert run_dir == tmp_path / "runs" / "ray-mw" and (run_dir / "model.keras").is_file()
    losses = [e["loss"] for e in json.loads((run_dir / "history.json").read_text())["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "val_accuracy" in summary["metrics"]


def test_ray_workers_get_absolute_paths_but_weight_names_stay_names(tiny_config, tmp_path, monkeypatch):
    from tl_app.engines.distributed import ray_worker_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.weights.h5").write_bytes(b"x")
    for weights, expected in (("hed-vgg16", "hed-vgg16"), ("imagenet", "imagenet"), ("none", "none"),
                              ("mine.weights.h5", str(tmp_path / "mine.weights.h5"))):
        worker = ray_worker_config(tiny_config.with_overrides({"backbone.weights": weights, "train.runs_dir": "r"}))
        assert worker.backbone.weights == expected
        assert worker.train.runs_dir == str(tmp_path / "r") and worker.train.distribute == "multi-worker"
        assert worker.engine.name == "local"
