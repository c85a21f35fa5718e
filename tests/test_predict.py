"""tl-app predict: files, folders and globs; bad files reported; parity with the model; bounded memory."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from factories import reference_pixels  # noqa: E402

from tl_app.core.errors import ConfigError, ModelNotFoundError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def messy_folder(tmp_path, sample_dir):
    """Good images in nested folders, plus every kind of bad file."""
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    good = sorted(sample_dir.glob("*/*"))[:6]
    for i, path in enumerate(good):
        target = root / ("nested/deeper" if i % 3 == 2 else "nested" if i % 3 == 1 else ".") / path.name
        shutil.copy(path, target)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image")
    jpeg = next(p for p in good if p.suffix == ".jpg")
    (root / "nested" / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 3])
    (root / "readme.txt").write_text("ignored: not an image suffix")
    (root / ".hidden.png").write_bytes(good[0].read_bytes())
    return root, good


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_folders_files_and_globs_with_bad_files_listed_never_fatal(exported, messy_folder, tmp_path, cli):
    from tl_app.inference import iter_inputs

    root, good = messy_folder
    out = tmp_path / "preds.csv"
    extra = tmp_path / "single.png"
    shutil.copy(next(p for p in good if p.suffix == ".png"), extra)
    inputs = [root, extra, str(root / "**" / "*.jpg"), str(tmp_path / "glob*" / "*.png"), tmp_path / "missing.jpg"]
    result = cli("predict", exported["root"] / "shapes", *inputs, "--out", out, "--top-k", "2", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert [r["path"] for r in rows] == [path for path, _ in iter_inputs(inputs)]  # input order, bad rows too
    by_path = {Path(r["path"]).name: r for r in rows}
    predicted = [r for r in rows if not r["error"]]
    jpegs = sorted(p.name for p in good if p.suffix == ".jpg")
    assert len(jpegs) >= 3  # in root, nested and nested/deeper: the glob's ** recursion is exercised
    assert len(predicted) == len(good) + 1 + len(jpegs)  # the folder, the file, then the glob's matches again
    # the recursive glob: every .jpg below root, good or bad, once more; nothing else
    globbed = [Path(r["path"]).name for r in rows
               if Path(r["path"]).suffix == ".jpg" and root in Path(r["path"]).parents]
    assert sorted(globbed) == sorted((jpegs + ["empty.jpg", "truncated.jpg"]) * 2)
    assert len([r for r in rows if Path(r["path"]).name == "truncated.jpg" and r["error"]]) == 2
    for row in predicted:
        assert row["label_1"] in ("circles", "squares", "triangles") and row["label_2"]
        assert float(row["probability_1"]) >= float(row["probability_2"]) > 0
    assert by_path["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert "not an image" in by_path["notes.png"]["error"]
    assert by_path["truncated.jpg"]["error"]
    assert by_path["missing.jpg"]["error"] == "no such file or directory"
    assert "no file matches" in by_path["*.png"]["error"]
    assert ".hidden.png" not in by_path and "readme.txt" not in by_path
    assert "images/s" in result.output  # the progress bar (stderr is mixed into output)
    assert "could not be used" in result.output and "empty.jpg: empty file" in result.output


def test_jsonl_output_has_top_k_and_reasons(exported, messy_folder, tmp_path):
    from tl_app.inference import predict_paths

    root, good = messy_folder
    out = tmp_path / "preds.jsonl"
    summary = predict_paths(exported["version_dir"], [root], out=out, top_k=3, echo=None)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["predicted"] == len(good) and summary["bad"] == 3 and len(lines) == len(good) + 3
    ok = [line for line in lines if line["error"] is None]
    assert all(len(line["predictions"]) == 3 for line in ok)
    assert all(abs(sum(p["probability"] for p in line["predictions"]) - 1) < 1e-5 for line in ok)
    assert {Path(b["path"]).name for b in summary["bad_files"]} == {"empty.jpg", "notes.png", "truncated.jpg"}


def test_predict_agrees_with_the_in_memory_model_and_the_savedmodel_to_1e5(exported, keras_model, tmp_path):
    import tensorflow as tf

    from tl_app.inference import predict_paths

    pixels, records = reference_pixels(exported["run_dir"])
    expected = keras_model.predict(pixels, verbose=0)
    classes = ["circles", "squares", "triangles"]
    for model_path in (exported["root"] / "shapes", exported["run_dir"]):  # SavedModel path and Keras path
        out = tmp_path / f"{model_path.name}.jsonl"
        predict_paths(model_path, [r.path for r in records], out=out, top_k=3, batch_size=7, echo=None)
        got = {}
        for line in out.read_text().splitlines():
            row = json.loads(line)
            probs = np.zeros(3)
            for p in row["predictions"]:
                probs[classes.index(p["label"])] = p["probability"]
            got[row["path"]] = probs
        assert np.max(np.abs(np.stack([got[r.path] for r in records]) - expected)) <= 1e-5
    loaded = tf.saved_model.load(str(exported["version_dir"]))
    signature = loaded.signatures["serving_default"]
    served = signature(image_bytes=tf.constant([Path(r.path).read_bytes() for r in records]))["probabilities"]
    assert np.max(np.abs(served.numpy() - expected)) <= 1e-5


def test_rotated_transparent_and_gif_images_are_decoded_as_in_training(exported, keras_model, tmp_path):
    from tl_app.inference import predict_paths
    from tl_app.data.pipeline import load_images

    rng = np.random.default_rng(3)
    folder = tmp_path / "odd"
    folder.mkdir()
    pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(pixels).save(folder / "rotated.jpg", exif=exif)
    rgba = np.dstack([pixels, rng.integers(0, 255, (40, 56), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(pixels).convert("P").save(folder / "palette.gif")
    paths = sorted(folder.iterdir())
    expected = keras_model.predict(load_images(paths, 32, "center_crop"), verbose=0)  # Pillow, as training
    out = tmp_path / "odd.jsonl"
    summary = predict_paths(exported["version_dir"], [folder], out=out, top_k=3, echo=None)
    assert summary["predicted"] == 3 and summary["bad"] == 0
    classes = ["circles", "squares", "triangles"]
    rows = {json.loads(line)["path"]: json.loads(line)["predictions"] for line in out.read_text().splitlines()}
    for path, want in zip(paths, expected):
        got = np.zeros(3)
        for p in rows[str(path)]:
            got[classes.index(p["label"])] = p["probability"]
        assert np.max(np.abs(got - want)) <= 1e-5, path.name


def test_model_argument_forms_and_mistakes(exported, sample_dir, tmp_path):
    from tl_app.models.opener import open_model, read_model_info
    from tl_app.inference import predict_paths

    for path, kind, version in ((exported["root"] / "shapes", "savedmodel", 1),
                                (exported["version_dir"], "savedmodel", 1),
                                (exported["run_dir"], "keras", None)):
        predictor = open_model(path)
        assert (predictor.kind, predictor.version) == (kind, version)
        assert predictor.classes == ["circles", "squares", "triangles"] and predictor.input_size == 32
        assert predictor.background == (255, 255, 255)
        info = read_model_info(path)  # the same facts, from the model's files alone (the Ray driver's view)
        assert (info.source, info.classes, info.input_size, info.version, info.background) == (
            predictor.source, predictor.classes, predictor.input_size, predictor.version, predictor.background)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(exported["run_dir"], unfinished, copy_function=os.link,
                    ignore=shutil.ignore_patterns("model.keras"))
    with pytest.raises(ModelNotFoundError, match="did not finish training"):
        read_model_info(unfinished)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        open_model(tmp_path / "nope")
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(ModelNotFoundError, match="no exported model version"):
        open_model(tmp_path / "empty_model")
    with pytest.raises(ConfigError, match=".csv or .jsonl"):
        predict_paths(exported["version_dir"], [sample_dir], out=tmp_path / "x.xlsx", echo=None)
    with pytest.raises(ConfigError, match="top-k"):
        predict_paths(exported["version_dir"], [sample_dir], top_k=0, echo=None)


def link_copy(source: Path, target: Path, config_file: str, background: list[int]) -> Path:
    """A hard-linked copy of a run or an exported version whose saved configuration has another background."""
    shutil.copytree(source, target, copy_function=os.link)
    path = target / config_file
    data = json.loads(path.read_text())
    (data["config"] if config_file == "model_card.json" else data)["data"]["background"] = background
    path.unlink()  # a link to the shared model's file: replace it, never write through it
    path.write_text(json.dumps(data))
    return target


def test_transparent_images_are_composited_on_the_runs_background(exported, keras_model, tmp_path):
    from tl_app.core.errors import ConfigError
    from tl_app.models.opener import open_model
    from tl_app.inference import predict_paths
    from tl_app.data.pipeline import load_images

    rng = np.random.default_rng(5)
    folder = tmp_path / "transparent"
    folder.mkdir()
    pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)
    alpha = np.zeros((36, 36), np.uint8)
    alpha[8:28, 8:28] = 255  # an opaque square on a see-through canvas
    Image.fromarray(np.dstack([pixels, alpha]), "RGBA").save(folder / "cutout.png")
    Image.fromarray(np.dstack([pixels[..., 0], alpha]), "LA").save(folder / "gray.png")
    paths = sorted(folder.iterdir())
    black = keras_model.predict(load_images(paths, 32, "center_crop", (0, 0, 0)), verbose=0)
    white = keras_model.predict(load_images(paths, 32, "center_crop"), verbose=0)
    assert np.max(np.abs(black - white)) > 1e-4  # the background changes this model's answer
    version = link_copy(exported["version_dir"], tmp_path / "saved_models" / "shapes" / "1", "model_card.json",
                        [0, 0, 0])
    run = link_copy(exported["run_dir"], tmp_path / "run", "config.json", [0, 0, 0])
    classes = ["circles", "squares", "triangles"]
    for model in (version, run):  # the card's config (SavedModel) and the run's config.json (Keras)
        assert open_model(model).background == (0, 0, 0)
        out = tmp_path / f"{model.name}.jsonl"
        summary = predict_paths(model, [folder], out=out, top_k=3, echo=None)
        assert summary["predicted"] == 2
        for line, want in zip(out.read_text().splitlines(), black):
            got = np.zeros(3)
            for p in json.loads(line)["predictions"]:
                got[classes.index(p["label"])] = p["probability"]
            assert np.max(np.abs(got - want)) <= 1e-5, (model, line)
    broken = link_copy(exported["run_dir"], tmp_path / "bad-run", "config.json", [0, 0, 256])
    with pytest.raises(ConfigError, match="data.background must be three integers"):
        open_model(broken)


def test_symlink_loops_list_each_file_once(exported, sample_dir, tmp_path):
    from tl_app.inference import predict_paths

    root = tmp_path / "looped"
    (root / "sub").mkdir(parents=True)
    shutil.copy(next(sample_dir.glob("*/*.png")), root / "sub" / "a.png")
    shutil.copy(next(sample_dir.glob("*/*.jpg")), root / "b.jpg")
    (root / "empty").mkdir()
    os.symlink("..", root / "sub" / "up")  # sub/up -> root: without care, a.png and b.jpg ~40 times each
    os.symlink(".", root / "empty" / "self")  # empty/self -> empty
    for inputs in ([root], [root / "sub"]):
        out = tmp_path / "loop.csv"
        summary = predict_paths(exported["version_dir"], inputs, out=out, top_k=1, echo=None)
        assert sorted(Path(r["path"]).name for r in read_csv(out)) == ["a.png", "b.jpg"], inputs
        assert (summary["total"], summary["predicted"], summary["bad"]) == (2, 2, 0)


def test_bad_files_get_the_dataset_scans_reasons(exported, sample_dir, tmp_path):
    from tl_app.data.images import probe_file
    from tl_app.inference import MAX_PIXELS, predict_paths

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(folder / "portable.png", format="PPM")  # a format the scan skips
    jpeg = next(sample_dir.glob("*/*.jpg")).read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    os.symlink(folder / "gone.jpg", folder / "broken.jpg")
    os.mkfifo(folder / "pipe.jpg")
    out = tmp_path / "bad.csv"
    summary = predict_paths(exported["version_dir"], [folder], out=out, echo=None)
    rows = read_csv(out)
    assert (summary["predicted"], summary["bad"]) == (0, 6)
    reasons = {Path(r["path"]).name: r["error"] for r in rows}
    assert reasons["broken.jpg"] == "broken link" and reasons["pipe.jpg"] == "not a regular file"
    assert reasons["portable.png"] == "unsupported image format PPM"
    for row in rows:  # word for word what training's scan says about each file
        assert row["error"] == probe_file(row["path"], MAX_PIXELS).reason, row


@pytest.mark.slow
def test_memory_stays_bounded_for_many_inputs(exported, tmp_path):
    """RSS after 2000 images is within 150 MB of RSS after 200: images stream, rows are not kept."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2000):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    script = f"""
import os, psutil, glob
from tl_app.inference import predict_paths
from tl_app.models.opener import open_model
p = open_model({str(exported['version_dir'])!r})
files = sorted(glob.glob({str(folder)!r} + '/*.png'))
predict_paths(p, files[:200], out={str(tmp_path / 'a.csv')!r}, echo=None)
small = psutil.Process().memory_info().rss
s = predict_paths(p, files, out={str(tmp_path / 'b.csv')!r}, echo=None)
print(s['predicted'], (psutil.Process().memory_info().rss - small) / 1e6)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    count, growth = out.stdout.split()
    print(f"predict memory: RSS growth {float(growth):.1f} MB from 200 to 2000 images")
    assert int(count) == 2000
    assert float(growth) < 150, f"RSS grew by {growth} MB"


def test_the_pixel_limit_is_the_model_cards_data_max_pixels_unless_max_pixels_is_given(exported, sample_dir,
                                                                                       tmp_path, cli):
    version = tmp_path / "models" / "tiny" / "1"
    shutil.copytree(exported["version_dir"], version, ignore=shutil.ignore_patterns("*.tflite", "*.onnx"))
    card = json.loads((version / "model_card.json").read_text())
    card.setdefault("config", {}).setdefault("data", {})["max_pixels"] = 10_000  # as trained with that limit
    (version / "model_card.json").write_text(json.dumps(card))
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200), (200, 30, 30)).save(big)  # 40,000 pixels
    small = tmp_path / "small.png"
    Image.open(sorted(sample_dir.glob("*/*.png"))[0]).convert("RGB").resize((64, 64)).save(small)  # 4,096 pixels

    out = tmp_path / "card.csv"
    result = cli("predict", version.parent, big, small, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert "200x200 > 10000" in rows["big.png"]["error"], rows["big.png"]
    assert rows[small.name]["label_1"] and not rows[small.name]["error"]

    out = tmp_path / "given.csv"
    result = cli("predict", version.parent, big, small, "--out", out, "--quiet", "--max-pixels", "50000")
    assert result.exit_code == 0, result.output
    assert all(r["label_1"] and not r["error"] for r in read_csv(out))
    result = cli("predict", version.parent, big, "--max-pixels", "-1")
    assert result.exit_code != 0 and "max_pixels" in result.output and "Traceback" not in result.output
