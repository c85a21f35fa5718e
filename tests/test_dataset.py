"""The data layer on a folder holding every format and every kind of bad file."""

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tl_app.core.config import DataConfig
from tl_app.data.splits import class_weights
from tl_app.data.scan import scan
from tl_app.core.errors import DataError
from tl_app.data.pipeline import make_dataset

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def solid(colour, size=(24, 16), mode="RGB"):
    return Image.new(mode, size, colour)


def write_formats(folder):
    """One file per supported format/mode; the expected colour of each."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}

    def save(name, image, colour, **kw):
        image.save(folder / name, **kw)
        expected[name] = colour

    save("rgb.jpg", solid(RED), RED, quality=95)
    save("cmyk.jpg", solid(RED).convert("CMYK"), RED, quality=95)
    save("gray.jpg", solid(128, mode="L"), (128, 128, 128), quality=95)
    save("rgb.png", solid(GREEN), GREEN)
    save("gray.png", solid(200, mode="L"), (200, 200, 200))
    gray16 = Image.fromarray(np.full((16, 24), 65535, np.uint16))
    save("gray16.png", gray16, (255, 255, 255))
    save("palette.png", solid(BLUE).convert("P"), BLUE)
    rgba = Image.new("RGBA", (24, 16), (255, 0, 0, 0))  # fully transparent red
    save("rgba.png", rgba, (255, 255, 255))  # composited onto the white background
    frames = [solid(GREEN).convert("P"), solid(RED).convert("P")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    expected["anim.gif"] = GREEN  # first frame
    save("rgb.bmp", solid(BLUE), BLUE)
    save("rgb.webp", solid(GREEN), GREEN, lossless=True)
    save("rgb.tiff", solid(RED), RED)
    return expected


def write_rotated(path):
    """Stored 40x20 with left half red, right half blue, EXIF orientation 6 (rotate 90 CW)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(solid(RED, (20, 20)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


def write_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    (folder / "empty.jpg").write_bytes(b"")
    kinds["empty.jpg"] = "empty"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    kinds["truncated.jpg"] = "truncated"
    (folder / "notes.jpg").write_text("this is not an image")
    kinds["notes.jpg"] = "not an image"
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    data = bytearray(png.getvalue())
    data[2000:2400] = b"\x00" * 400  # corrupt the middle of the IDAT stream
    (folder / "corrupt.png").write_bytes(bytes(data))
    kinds["corrupt.png"] = "undecodable"
    Image.new("L", (400, 400), 0).save(folder / "bomb.png")  # above the test's pixel limit
    kinds["bomb.png"] = "too many pixels"
    os.symlink(folder / "does-not-exist.jpg", folder / "broken.jpg")
    kinds["broken.jpg"] = "broken link"
    os.mkfifo(folder / "pipe.jpg")
    kinds["pipe.jpg"] = "not a regular file"
    return kinds


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    colours = write_formats(root / "formats")
    write_rotated(root / "rotated" / "exif6.jpg")
    solid(RED).save(root / "rotated" / "plain.jpg")
    bad = write_bad_files(root / "bad")
    for i in range(3):
        solid(GREEN).save(root / "bad" / f"good_{i}.png")
    nested = root / "formats" / "sub" / "deeper"
    nested.mkdir(parents=True)
    solid(BLUE).save(nested / "nested.png")
    # hidden things that must be ignored entirely
    (root / "formats" / ".DS_Store").write_bytes(b"junk")
    (root / ".ipynb_checkpoints").mkdir()
    solid(RED).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._x.jpg").write_bytes(b"junk")
    (root / "formats" / ".hidden.png").write_bytes(b"junk")
    # a symlink loop inside a class
    os.symlink(root / "formats", root / "formats" / "sub" / "loop")
    # a loose file in the root
    (root / "README.txt").write_text("hello")
    return root, colours, bad


def test_every_file_is_used_or_skipped_with_a_reason(messy):
    root, colours, bad = messy
    manifest = scan(root, DataConfig(max_pixels=100_000))
    used = {r.relpath for r in manifest.records}
    skipped = {os.path.basename(s.path): s.reason for s in manifest.skipped}
    assert manifest.files_found == len(manifest.records) + len(manifest.skipped)
    assert {f"formats/{n}" for n in colours} <= used
    assert "formats/sub/deeper/nested.png" in used  # nested folders belong to the class
    for name, kind in bad.items():
        assert kind in skipped[name], (name, skipped.get(name))
    assert skipped["README.txt"] == "not inside a class folder"
    assert not any(".ipynb" in r.relpath or "MACOSX" in r.relpath or ".DS_Store" in r.relpath for r in manifest.records)
    assert manifest.classes == ["bad", "formats", "rotated"]


def test_decoded_pixels_have_the_right_colours_for_every_format(messy):
    root, colours, _ = messy
    manifest = scan(root, DataConfig(max_pixels=100_000))
    records = [r for r in manifest.records if r.label == "formats" and "/" not in r.relpath[len("formats/"):]]
    images, index = [], []
    for batch, idx in make_dataset(records, 32, "stretch", batch_size=64, with_index=True):
        images.append(batch.numpy())
        index.append(idx.numpy())
    images, index = np.concatenate(images), np.concatenate(index)
    assert len(images) == len(records)
    for image, i in zip(images, index):
        name = records[i].relpath.split("/")[-1]
        centre = image[12:20, 12:20].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(centre, colours[name], atol=12, err_msg=name)


def test_exif_orientation_is_applied(messy):
    root, _, _ = messy
    manifest = scan(root, DataConfig(max_pixels=100_000))
    record = next(r for r in manifest.records if r.relpath == "rotated/exif6.jpg")
    assert record.fast is False  # rotated photos take the orienting decoder
    (image,) = list(make_dataset([record], 40, "letterbox", batch_size=1))
    image = image.numpy()[0]
    # displayed upright the photo is tall: red on top, blue below (letterbox pads left/right)
    top, bottom = image[5, 20], image[35, 20]
    np.testing.assert_allclose(top, RED, atol=40)
    np.testing.assert_allclose(bottom, BLUE, atol=40)
    assert image[20, 2].max() < 5  # the pad columns are black: the image is taller than wide


def test_plain_jpeg_and_png_take_the_graph_decoder(messy):
    root, _, _ = messy
    manifest = scan(root, DataConfig(max_pixels=100_000))
    fast = {r.relpath.split("/")[-1] for r in manifest.records if r.fast}
    assert {"rgb.jpg", "gray.jpg", "rgb.png", "gray.png"} <= fast
    assert not fast & {"cmyk.jpg", "rgba.png", "palette.png", "anim.gif", "gray16.png", "exif6.jpg"}


def test_strict_mode_lists_the_bad_files(messy):
    root, _, bad = messy
    with pytest.raises(DataError) as err:
        scan(root, DataConfig(max_pixels=100_000, strict=True))
    for name in bad:
        assert name in str(err.value)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nope")


def test_unicode_class_names_sorted_deterministically(tmp_path):
    for name in ("zèbre", "Äpfel", "猫", "apple"):
        (tmp_path / name).mkdir()
        solid(RED).save(tmp_path / name / "a.png")
        solid(BLUE).save(tmp_path / name / "b.png")
    assert scan(tmp_path).classes == sorted(["zèbre", "Äpfel", "猫", "apple"])


def make_class_folder(root, n, prefix="img", classes=("a", "b")):
    rng = np.random.default_rng(len(prefix) + n)
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{prefix}_{i:03d}.png")


def splits_of(manifest):
    return {r.relpath: r.split for r in manifest.records}


def test_split_is_stable_when_images_are_added_and_when_the_folder_moves(tmp_path):
    root = tmp_path / "data"
    make_class_folder(root, 40)
    config = DataConfig(val_fraction=0.2, test_fraction=0.1)
    before = splits_of(scan(root, config))
    assert set(before.values()) == {"train", "val", "test"}
    make_class_folder(root, 25, prefix="new")
    after = splits_of(scan(root, config))
    assert {k: after[k] for k in before} == before
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(root, moved)
    assert splits_of(scan(moved, config)) == after


def test_split_fractions_are_roughly_respected_and_seed_changes_them(tmp_path):
    make_class_folder(tmp_path, 200)
    manifest = scan(tmp_path, DataConfig(val_fraction=0.25))
    share = len(manifest.split("val")) / len(manifest.records)
    assert 0.17 < share < 0.33
    other = scan(tmp_path, DataConfig(val_fraction=0.25, split_seed=1))
    assert splits_of(manifest) != splits_of(other)


def test_byte_identical_duplicates_never_straddle_splits(tmp_path):
    make_class_folder(tmp_path, 30)
    for i in range(30):
        shutil.copy(tmp_path / "a" / f"img_{i:03d}.png", tmp_path / "a" / f"zz_copy_{i:03d}.png")
    manifest = scan(tmp_path, DataConfig(val_fraction=0.3))
    split = splits_of(manifest)
    for i in range(30):
        assert split[f"a/img_{i:03d}.png"] == split[f"a/zz_copy_{i:03d}.png"]


def test_every_class_with_two_images_gets_a_validation_image(tmp_path):
    make_class_folder(tmp_path, 30, classes=("big",))
    make_class_folder(tmp_path, 2, prefix="tiny", classes=("small",))
    make_class_folder(tmp_path, 1, prefix="one", classes=("single",))
    manifest = scan(tmp_path, DataConfig(val_fraction=0.1))
    counts = manifest.counts()
    assert counts["small"]["val"] >= 1 and counts["small"]["train"] >= 1
    assert any("single" in w and "too few" in w for w in manifest.warnings)


def test_moving_a_duplicate_group_to_val_never_empties_training(tmp_path):
    """A class of {a, a's byte copy, b}: if b hashes into test, the a-group must stay in train."""
    import hashlib
    import io

    from tl_app.data.splits import split_score

    def colour_scoring(test) -> tuple:
        for k in range(256):
            buffer = io.BytesIO()
            solid((200, 10, k)).save(buffer, "PNG")
            if test(split_score(hashlib.sha256(buffer.getvalue()).hexdigest(), 0)):
                return (200, 10, k)
        raise AssertionError("no colour found")

    config = DataConfig(val_fraction=0.2, test_fraction=0.3)
    (tmp_path / "small").mkdir()
    solid(colour_scoring(lambda score: score >= 0.5)).save(tmp_path / "small" / "a.png")
    shutil.copy(tmp_path / "small" / "a.png", tmp_path / "small" / "zz_a.png")  # same content: same group
    solid(colour_scoring(lambda score: score < 0.3)).save(tmp_path / "small" / "b.png")
    make_class_folder(tmp_path, 10, classes=("big",))
    counts = scan(tmp_path, config).counts()["small"]
    assert counts == {"train": 2, "val": 0, "test": 1}


def test_split_folders_are_respected(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_class_folder(tmp_path / split, n, prefix=split)
    manifest = scan(tmp_path)
    assert manifest.layout == "split-folders"
    assert manifest.counts()["a"] == {"train": 6, "val": 2, "test": 3}
    assert all(r.split == r.relpath.split("/")[0] for r in manifest.records)


def test_class_weights_balanced_none_and_explicit(tmp_path):
    make_class_folder(tmp_path, 30, classes=("many",))
    make_class_folder(tmp_path, 10, prefix="few", classes=("few",))
    manifest = scan(tmp_path, DataConfig(val_fraction=0.0))
    balanced = class_weights(manifest, "balanced")
    n, k = 40, 2
    assert balanced[manifest.classes.index("few")] == pytest.approx(n / (k * 10))
    assert balanced[manifest.classes.index("many")] == pytest.approx(n / (k * 30))
    assert set(class_weights(manifest, "none").values()) == {1.0}
    assert class_weights(manifest, {"few": 5.0})[manifest.classes.index("few")] == 5.0
    assert any("imbalance" in w for w in manifest.warnings)


def test_scan_cache_reuses_probes_and_notices_changed_files(tmp_path, monkeypatch):
    from tl_app.data import scan as dataset_mod

    probed = []
    real_probe = dataset_mod.probe_file
    monkeypatch.setattr(dataset_mod, "probe_file", lambda path, *a: probed.append(str(path)) or real_probe(path, *a))
    make_class_folder(tmp_path / "data", 5)
    cache = tmp_path / "cache"
    first = scan(tmp_path / "data", cache_dir=cache)
    assert len(probed) == 10  # every file opened once
    target = tmp_path / "data" / "a" / "img_000.png"
    solid(RED, (9, 9)).save(target)
    os.utime(target, ns=(1, 1))  # a different mtime, whatever the clock says
    probed.clear()
    second = scan(tmp_path / "data", cache_dir=cache)
    assert probed == [str(target)]  # only the changed file is opened again
    old = {r.relpath: r.sha256 for r in first.records}
    new = {r.relpath: r.sha256 for r in second.records}
    assert old["a/img_000.png"] != new["a/img_000.png"]
    assert {k: v for k, v in old.items() if k != "a/img_000.png"} == {k: v for k, v in new.items() if k != "a/img_000.png"}


def test_inspect_json_for_scripts(cli, messy):
    root, _, bad = messy
    result = cli("datasets", "inspect", root, "--json", "--set", "data.max_pixels=100000")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    totals = doc["totals"]
    assert totals["found"] == totals["used"] + totals["skipped"]
    assert totals["skipped"] == len(bad) + 2  # + the loose README and the symlink loop (never followed)
    assert any(s["reason"].startswith("symlink loop") and s["path"].endswith("loop") for s in doc["skipped"])
    assert {c["name"] for c in doc["classes"]} == {"bad", "formats", "rotated"}
    assert all({"path", "reason"} <= set(s) for s in doc["skipped"])


def test_inspect_table_and_report_files(cli, messy, tmp_path):
    root, _, _ = messy
    result = cli("datasets", "inspect", root, "--report", tmp_path / "report", "--set", "data.max_pixels=100000")
    assert result.exit_code == 0, result.output
    assert "files found =" in result.output and "skipped" in result.output
    rows = json.loads((tmp_path / "report" / "skipped.json").read_text())
    assert any(r["reason"] == "broken link" for r in rows)
    assert (tmp_path / "report" / "skipped.csv").read_text().startswith("path,reason")
