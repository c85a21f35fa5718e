"""Issue 17: a fully cached `tl-app extract` (and `index`, `embed`) never imports TensorFlow or Keras.

The real command computes the features here, then runs again in a subprocess
in which importing tensorflow, keras or tf_keras raises ImportError: the
cached re-run must still give the same features, and a run that has to
compute one must fail there (so the block is real).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner
from PIL import Image

from tl_app.cli import main

BLOCKED = ("tensorflow", "keras", "tf_keras")
BLOCKER = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked by the test: " + name)
        return None
sys.meta_path.insert(0, Blocker())
"""
CLI = "import sys; from tl_app.cli import main; main(prog_name='tl-app')"


def blocked_tl_app(args, tmp_path) -> subprocess.CompletedProcess:
    code = BLOCKER + CLI
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def write_images(root, names):
    rng = np.random.default_rng(len(names))
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(path)


def test_a_cached_extract_runs_without_tensorflow_and_an_uncached_one_needs_it(tmp_path):
    data = tmp_path / "photos"
    write_images(data, [f"{label}/{k}.png" for label in ("a", "b") for k in range(3)])
    args = ["extract", str(data), "--backbone", "vgg16", "--weights", "none", "--input-size", "32",
            "--cache-dir", str(tmp_path / "cache"), "--json"]

    first = CliRunner().invoke(main, args + ["--out", str(tmp_path / "first")])  # here: TensorFlow is loaded
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout[first.stdout.index("{"):])["computed"] == 6

    again = blocked_tl_app(args + ["--out", str(tmp_path / "again")], tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout[again.stdout.index("{"):])
    assert summary["cached"] == 6 and summary["computed"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "features.npy"),
                                  np.load(tmp_path / "first" / "features.npy"))
    assert (tmp_path / "again" / "index.csv").read_text() == (tmp_path / "first" / "index.csv").read_text()

    write_images(data, ["b/new.png"])  # one image the cache lacks: the backbone, hence TensorFlow, is needed
    needs_backbone = blocked_tl_app(args + ["--out", str(tmp_path / "more")], tmp_path)
    assert needs_backbone.returncode != 0
    assert "blocked by the test: tensorflow" in needs_backbone.stderr or "blocked by the test: keras" in \
        needs_backbone.stderr, needs_backbone.stderr[-2000:]


def test_a_cached_index_and_embed_run_without_tensorflow(tmp_path):
    data = tmp_path / "photos"
    write_images(data, [f"{label}/{k}.png" for label in ("a", "b") for k in range(3)])
    common = ["--backbone", "vgg16", "--weights", "none", "--input-size", "32", "--cache-dir", str(tmp_path / "cache")]

    first = CliRunner().invoke(main, ["index", str(data), "--out", str(tmp_path / "first"), "--json", *common])
    assert first.exit_code == 0, first.output  # here: TensorFlow is loaded, the features computed
    assert json.loads(first.stdout[first.stdout.index("{"):])["features"]["computed"] == 6

    again = blocked_tl_app(["index", str(data), "--out", str(tmp_path / "again"), "--json", *common], tmp_path)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout[again.stdout.index("{"):])
    assert summary["count"] == 6 and summary["features"]["cached"] == 6 and summary["features"]["computed"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "vectors.npy"),
                                  np.load(tmp_path / "first" / "vectors.npy"))

    for source, origin in ((data, "vgg16 features of"), (tmp_path / "again", "similarity index")):
        plot = tmp_path / f"map-{source.name}.png"
        embedded = blocked_tl_app(["embed", str(source), "--out", str(plot), "--json", *common], tmp_path)
        assert embedded.returncode == 0, embedded.stderr
        doc = json.loads(embedded.stdout[embedded.stdout.index("{"):])
        assert doc["count"] == 6 and doc["source"].startswith(origin) and plot.is_file()

    write_images(data, ["b/new.png"])  # one image the cache lacks: the backbone, hence TensorFlow, is needed
    for args in (["index", str(data), "--out", str(tmp_path / "more")], ["embed", str(data)]):
        needs_backbone = blocked_tl_app(args + common, tmp_path)
        assert needs_backbone.returncode != 0
        assert "blocked by the test: tensorflow" in needs_backbone.stderr or "blocked by the test: keras" in \
            needs_backbone.stderr, needs_backbone.stderr[-2000:]


def test_an_unknown_backbone_is_refused_before_tensorflow_loads(tmp_path):
    data = tmp_path / "photos"
    write_images(data, ["a/0.png", "b/0.png"])
    result = blocked_tl_app(["extract", str(data), "--backbone", "resnet5", "--cache-dir", str(tmp_path / "cache")],
                            tmp_path)
    assert result.returncode != 0
    assert "Unknown backbone 'resnet5'" in result.stderr and "Did you mean 'resnet50'" in result.stderr
    assert "Traceback" not in result.stderr and "blocked by the test" not in result.stderr
